"""The one configuration layer shared by every training step, application and benchmark.

Typed dataclasses, one section per component (model, data, rollout, actor, critic, trainer,
deepspeed). Every field is a command-line flag ``--section.field VALUE``; an optional YAML file
(``--config run.yaml``, same nesting) supplies values first, flags override it. A user's own
DeepSpeed JSON (``--deepspeed.config_file``) is accepted and completed with the batch fields the
trainer owns. Defaults are the published GAD recipe (DESIGN.md section 2, arXiv 2511.10643
section 4) except where a field says otherwise; each step's ``main.py`` only picks its stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

STAGES = ("seqkd", "warmup", "gad")


@dataclass
class ModelConfig:
    actor_path: str = "builtin:tiny"
    """Student: a hub id or local folder loadable by AutoModelForCausalLM. ``builtin:tiny`` builds a
    tiny random Qwen2 with a tokenizer trained on the shipped data (CPU default)."""
    critic_path: str = ""
    """Discriminator backbone; empty = initialise from the student (the paper's choice)."""
    tokenizer_path: str = ""
    """Empty = the actor's folder."""
    attn_implementation: str = "auto"
    """auto = flash_attention_2 where installed on a GPU, sdpa otherwise."""
    dtype: str = "auto"
    """auto = bfloat16 on GPU, float32 on CPU; or float32 / bfloat16 / float16."""
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    train_files: str = "data/alpaca_eval_gpt4o/train.jsonl"
    """Comma-separated JSON lines / parquet files or folders, or a datasets name (``hf:NAME``)."""
    eval_files: str = "data/alpaca_eval_gpt4o/test.jsonl"
    train_split: str = "train"
    prompt_key: str = "content"
    """A list of chat messages, or a string taken as a single user turn."""
    response_key: str = "teacher_response"
    system_prompt: str = ""
    """Prepended as a system turn to prompts that have none."""
    max_prompt_tokens: int = 2048
    max_response_tokens: int = 1536
    overlong: str = "skip"
    """Rows whose prompt or teacher response exceed the limits: skip (counted and reported) or error."""
    skip_malformed: bool = False
    """False: a malformed row stops the run naming file, row and field. True: counted and skipped."""
    max_rows: int = 0
    """Use only the first N valid rows (0 = all); for quick runs."""
    shuffle: bool = True


@dataclass
class RolloutConfig:
    backend: str = "auto"
    """auto = vllm where installed, hf otherwise; or force vllm / hf."""
    n: int = 8
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 1536
    vllm_gpu_memory_utilization: float = 0.35
    vllm_cpu_kvcache_gib: float = 1.0
    tensor_parallel_size: int = 1
    sync_bucket_mb: float = 256.0
    """Actor parameters are gathered from ZeRO-3 and pushed to vLLM in buckets of this size."""
    enforce_eager: bool = True
    vllm_sleep: bool = False
    """GPU only: vLLM sleeps (weights offloaded to CPU memory, KV cache freed) while DeepSpeed trains,
    and wakes before each rollout; frees GPU memory for the training engines."""
    hf_micro_batch_size: int = 64


@dataclass
class ActorConfig:
    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: str = "0.9,0.999"
    grad_clip: float = 0.2
    micro_batch_size: int = 8
    """Sequences per forward/backward pass (gradient accumulation covers the rest of the batch)."""
    clip_eps: float = 0.2
    kl_coef: float = 0.001
    """k3 KL to the frozen reference; 0 disables the reference model entirely."""
    entropy_coef: float = 0.0
    ppo_epochs: int = 1
    mini_batches: int = 1
    """Optimizer steps per batch and epoch in the GAD stage (1 = on-policy, ratio exactly 1)."""


@dataclass
class CriticConfig:
    """The discriminator (the critic of the RLHF vocabulary)."""

    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: str = "0.9,0.999"
    grad_clip: float = 0.2
    micro_batch_prompts: int = 1
    """Prompts per forward/backward pass; each brings its teacher sequence and its n samples."""
    freeze: bool = False
    """GAD-stage ablation: keep the discriminator fixed (off-policy reward, reward-hackable)."""
    head_init_std: float = 0.0
    """Std of the score head's normal init; 0 = 1/sqrt(hidden_size + 1), as transformers' Linear."""


@dataclass
class TrainerConfig:
    stage: str = "warmup"
    prompts_per_step: int = 256
    """Global batch of prompts per step, split evenly over the ranks."""
    epochs: float = 1.0
    max_steps: int = 0
    """0 = as many steps as ``epochs`` allow."""
    critic_warmup: int = 10
    """Warm-up stage: the actor's SFT update runs only once step >= critic_warmup."""
    seed: int = 42
    output_dir: str = "outputs/run"
    init_from: str = ""
    """A previous stage's output folder: its final actor (and discriminator) start this stage."""
    init_optimizer_states: bool = False
    save_every: int = 0
    """Save a resumable checkpoint every N steps (0 = only at the end)."""
    keep_last: int = 2
    resume: str = "auto"
    """auto = continue from output_dir's latest checkpoint when there is one; none; or a folder."""
    log_every: int = 1
    eval_every: int = 0
    """SeqKD: every N steps, greedy rollouts on the eval split scored by ROUGE-L (0 = off)."""
    eval_prompts: int = 16
    tensorboard: bool = True
    progress_bar: bool = True
    log_param_digest: bool = False
    """Log ``digest/actor`` and ``digest/critic`` (sums over all weights) each step: which models moved."""
    verify_rollout_sync: bool = False
    """After each weight push, check that vLLM's greedy output equals the actor's own (slow; a debug aid)."""
    export_hf: bool = True
    """Write Hugging Face folders of the final actor (and discriminator) into output_dir/final."""


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 3
    offload_optimizer: bool = False
    offload_param: bool = False
    config_file: str = ""
    """A user's DeepSpeed JSON; its zero/precision settings win, batch sizes are set by the trainer."""


@dataclass
class GADConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def validate(self) -> "GADConfig":
        t, r = self.trainer, self.rollout
        problems = []
        if t.stage not in STAGES:
            problems.append(f"trainer.stage must be one of {STAGES}, got {t.stage!r}")
        if r.backend not in ("auto", "vllm", "hf"):
            problems.append(f"rollout.backend must be auto, vllm or hf, got {r.backend!r}")
        if self.data.overlong not in ("skip", "error"):
            problems.append(f"data.overlong must be skip or error, got {self.data.overlong!r}")
        if self.deepspeed.zero_stage not in (0, 1, 2, 3):
            problems.append(f"deepspeed.zero_stage must be 0-3, got {self.deepspeed.zero_stage}")
        if t.prompts_per_step < 1 or r.n < 1:
            problems.append("trainer.prompts_per_step and rollout.n must be >= 1")
        if self.actor.mini_batches < 1 or self.actor.ppo_epochs < 1:
            problems.append("actor.mini_batches and actor.ppo_epochs must be >= 1")
        if problems:
            raise ValueError("invalid configuration:\n  " + "\n  ".join(problems))
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Published per-stage defaults that differ from the dataclass defaults (DESIGN.md section 2).
STAGE_DEFAULTS: dict[str, dict[str, dict]] = {
    "seqkd": {"actor": {"lr": 5e-6, "kl_coef": 0.0}, "trainer": {"epochs": 3.0, "critic_warmup": 0}},
    "warmup": {"trainer": {"critic_warmup": 10}},
    "gad": {"trainer": {"critic_warmup": 0, "epochs": 2.0}},
}


def parse_betas(text: str) -> tuple:
    """``"0.9,0.999"`` (the ``betas`` field of the actor and critic sections) as AdamW's tuple."""
    return tuple(float(b) for b in str(text).split(","))


def _field_type(owner, f: dataclasses.Field):
    hints = typing.get_type_hints(owner)
    return hints[f.name]


def _parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _coerce(kind, value, where: str):
    try:
        if kind is bool:
            return value if isinstance(value, bool) else _parse_bool(value)
        if kind in (int, float) and isinstance(value, bool):
            raise TypeError("a boolean is not a number")
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError("not a whole number")
        return kind(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        raise ValueError(f"{where}: cannot read {value!r} as {kind.__name__}") from exc


def _sections(cfg: GADConfig):
    for section in dataclasses.fields(cfg):
        yield section.name, getattr(cfg, section.name)


def apply_overrides(cfg: GADConfig, overrides: dict, source: str) -> GADConfig:
    """Set ``{section: {field: value}}`` on ``cfg``; unknown keys are errors naming ``source``."""
    sections = dict(_sections(cfg))
    for section_name, values in (overrides or {}).items():
        if section_name not in sections:
            raise ValueError(f"{source}: unknown section {section_name!r} (known: {sorted(sections)})")
        if not isinstance(values, dict):
            raise ValueError(f"{source}: section {section_name!r} must be a mapping")
        obj = sections[section_name]
        known = {f.name: f for f in dataclasses.fields(obj)}
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"{source}: unknown field {section_name}.{key}")
            kind = _field_type(type(obj), known[key])
            setattr(obj, key, _coerce(kind, value, f"{source}: {section_name}.{key}"))
    return cfg


def build_parser(description: str = "GAD-Chat training") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="", help="YAML file with the same sections as the flags")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    defaults = GADConfig()
    for section_name, obj in _sections(defaults):
        group = parser.add_argument_group(section_name)
        for f in dataclasses.fields(obj):
            kind = _field_type(type(obj), f)
            group.add_argument(
                f"--{section_name}.{f.name}",
                dest=f"{section_name}.{f.name}",
                type=_parse_bool if kind is bool else kind,
                default=None,
                help=f"(default: {getattr(obj, f.name)!r})",
            )
    return parser


def load_config(argv=None, stage: str | None = None, description: str = "GAD-Chat training") -> GADConfig:
    """Defaults, then the stage's published defaults, then ``--config`` YAML, then flags."""
    parser = build_parser(description)
    args = parser.parse_args(argv)
    cfg = GADConfig()
    from_yaml = {}
    if args.config:
        import yaml

        path = Path(args.config)
        if not path.exists():
            raise FileNotFoundError(f"--config: no such file {path}")
        with open(path, encoding="utf-8") as handle:
            from_yaml = yaml.safe_load(handle) or {}
        if not isinstance(from_yaml, dict):
            raise ValueError(f"{path}: expected a mapping of sections, got {type(from_yaml).__name__}")
    yaml_trainer = from_yaml.get("trainer")
    yaml_stage = yaml_trainer.get("stage") if isinstance(yaml_trainer, dict) else None
    yaml_stage = yaml_stage if isinstance(yaml_stage, str) else None
    chosen_stage = stage or getattr(args, "trainer.stage") or yaml_stage or "warmup"
    apply_overrides(cfg, STAGE_DEFAULTS.get(chosen_stage, {}), f"stage defaults ({chosen_stage})")
    cfg.trainer.stage = chosen_stage
    if args.config:
        apply_overrides(cfg, from_yaml, str(path))
        if stage:
            cfg.trainer.stage = stage
    flags: dict[str, dict] = {}
    for dest, value in vars(args).items():
        if "." in dest and value is not None:
            section_name, key = dest.split(".", 1)
            flags.setdefault(section_name, {})[key] = value
    apply_overrides(cfg, flags, "command line")
    if stage and cfg.trainer.stage != stage:
        raise ValueError(f"this entry point runs the {stage!r} stage; got --trainer.stage {cfg.trainer.stage}")
    return cfg.validate()


def save_config(cfg: GADConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(cfg.to_dict(), handle, indent=2)


def config_from_dict(values: dict) -> GADConfig:
    return apply_overrides(GADConfig(), values, "saved config")
