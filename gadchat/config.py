"""The one configuration layer shared by every training step, application and benchmark.

Typed dataclasses, one section per component (model, data, rollout, actor, discriminator, trainer,
deepspeed). Every field is a command-line flag ``--section.field VALUE``; an optional YAML file
(``--config run.yaml``, same nesting) supplies values first, flags override it. A user's own
DeepSpeed JSON (``--deepspeed.config_file``) is accepted and completed with the batch fields the
trainer owns. Defaults are the published GAD recipe (docs/algorithm.md section 6, arXiv 2511.10643
section 4) except where a field says otherwise; each step's ``main.py`` only picks its stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from gadchat.config_docs import help_text

DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


@dataclass
class ModelConfig:
    actor_path: str = "builtin:tiny"
    """Student: a hub id or local folder loadable by AutoModelForCausalLM. ``builtin:tiny`` builds a
    tiny random Qwen2 with a tokenizer trained on the shipped data (CPU default)."""
    discriminator_path: str = ""
    """Discriminator backbone; empty = initialise from the student (the paper's choice)."""
    teacher_path: str = ""
    """A teacher model we hold (white-box): folder, hub id or ``builtin:`` name, sharing the
    student's tokenizer. Stages that declare a ``teacher`` role load it frozen (ZeRO-3 like the
    reference). In the warm-up and GAD stages it is read only, to log what the discriminator's
    reward follows (``diag/...``: correlation with the teacher's likelihood and with ``log p_T -
    log p_S``, length, EOS; teacher NLL and reverse KL of the rollouts) and for
    ``--trainer.oracle_reward``. Empty = no teacher role."""
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
    eval_prompt_key: str = ""
    """Prompt field of ``eval_files``; empty = ``prompt_key``, except for the shipped default eval
    file, which is always read with the published keys."""
    eval_response_key: str = ""
    """Teacher-response field of ``eval_files``; empty as for ``eval_prompt_key``."""
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
    eval_split: float = 0.0
    """0 < f < 1: hold out a deterministic fraction f of ``train_files`` (by a hash of each row's
    prompt) as the evaluation split; training never sees it and evaluation uses it instead of
    ``eval_files``. 0 = off."""


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
    hf_gather_weights: bool = True
    """rollout.backend hf under ZeRO-3: gather the actor's full weights once per generate call
    (DeepSpeed's unwrap_model_for_generation, as TRL's ds3_gather_for_generation) instead of per
    layer at every decoded token. Costs one full copy of the actor per GPU while generating; false
    for an actor that does not fit whole on one GPU."""


LORA_DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class LoraFields:
    """LoRA of a trained role (the actor, the discriminator); the same fields in both sections."""

    lora_rank: int = 0
    """LoRA rank r of this role's adapter (PEFT): the base weights stay frozen and only the low-rank
    matrices A, B (and a discriminator's score head) train. 0 = full fine-tuning (the published
    recipe). A LoRA actor's reference is the actor with its adapter switched off (no separate model);
    the rollout engine gets the merged weights W + (alpha/r) B A; exports are merged Hugging Face
    folders plus the adapter in PEFT's format (``final/<role>_adapter``)."""
    lora_alpha: float = 0.0
    """LoRA alpha: the update is scaled by alpha / r. 0 = 2 x lora_rank (scale 2)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input while training (0 keeps rollouts and updates on the same function)."""
    lora_target_modules: str = LORA_DEFAULT_TARGETS
    """Comma-separated module names that get an adapter (matched as name suffixes, PEFT's rule), or
    ``all-linear``. The attention and MLP projections of Qwen2.5 and Llama by default; the embedding
    and the LM head (tied in small Qwen models) are refused."""

    @property
    def lora_scaling_alpha(self) -> float:
        return self.lora_alpha or 2.0 * self.lora_rank


@dataclass
class ActorConfig(LoraFields):
    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: str = "0.9,0.999"
    grad_clip: float = 0.2
    micro_batch_size: int = 8
    """Sequences per forward/backward pass (gradient accumulation covers the rest of the batch)."""
    micro_batch_tokens: int = 0
    """> 0: form the actor's micro-batches (SFT, KL, policy, reference, old and teacher log-probs) by
    this token budget instead of ``micro_batch_size``: rows sorted by length, each micro-batch's
    padded size (rows x longest row) within the budget, the same count on every rank; the loss stays
    the exact batch token-mean. 0 = fixed ``micro_batch_size`` rows."""
    clip_eps: float = 0.2
    kl_coef: float = 0.001
    """k3 KL to the frozen reference; 0 disables the reference model entirely."""
    entropy_coef: float = 0.0
    ppo_epochs: int = 1
    mini_batches: int = 1
    """Optimizer steps per batch and epoch in the GAD stage (1 = on-policy, ratio exactly 1)."""
    logprob_chunk_tokens: int = 512
    """Log-probs and entropy from the final hidden states and the LM head, this many response tokens
    at a time (float32, each chunk recomputed in the backward), so the full [micro_batch, tokens,
    vocab] logits are never built (152k vocab: GBs per micro-batch). 0 = plain path (full logits)."""
    temperature_scaled_logprobs: bool = True
    """Actor, old and reference log-probs (and entropy) of the student samples on logits /
    rollout.temperature, the distribution the samples were drawn from (as verl's actor); the PPO
    ratio, policy gradient and k3 KL are then those of the sampling policy. False = raw logits."""
    sft_temperature_scaled: bool = False
    """Also divide the logits by rollout.temperature in the SFT loss on teacher text (SeqKD and
    warm-up); off by default: plain cross-entropy on the teacher response."""
    reward_form: str = "token"
    """gad_lr stage: ``token`` = each sampled token's advantage is its own reward ``log q(y_t) -
    log pi_old(y_t)`` (the per-token form of ``opd``); ``sequence`` = the sum over the answer,
    GRPO-normalised per prompt group and broadcast over its tokens (GAD's form, for comparison)."""
    sft_coef: float = 0.0
    """gad_lr and spin stages: add this x the token-mean cross-entropy on the batch's teacher answers
    to the actor's loss (InstructGPT's PPO-ptx term, keeping the SFT signal on). 0 = off."""
    dpo_beta: float = 0.1
    """spin stage: the DPO temperature beta of SPIN's loss (Chen et al. 2024 use 0.1)."""
    ema_decay: float = 0.0
    """> 0: keep an exponential moving average of the actor's trained weights (the adapter's under
    LoRA), ``ema <- d * ema + (1 - d) * w`` after every actor optimizer step from the start weights,
    checkpointed and exported as ``final/actor_ema`` (DeepSpeed-Chat's ``--enable_ema`` uses d =
    0.992). 0 = off."""
    reference_refresh_every: int = 0
    """spin stage: every N steps the reference becomes a copy of the current actor (SPIN's
    iterations, the opponent refreshed); 0 = the reference stays the stage's start model.
    ``trainer.save_every`` must then be a multiple of N (exact resume)."""


@dataclass
class DiscriminatorConfig(LoraFields):
    """The discriminator: the model DeepSpeed-Chat and verl call the critic (one name here: flags
    ``--discriminator.*``, metrics ``discriminator/*``, checkpoint and export folders ``discriminator``)."""

    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: str = "0.9,0.999"
    grad_clip: float = 0.2
    micro_batch_prompts: int = 1
    """Prompts per forward/backward pass; each brings its teacher sequence and its n samples."""
    micro_batch_tokens: int = 0
    """> 0: micro-batches of rows by this token budget (teacher sequences and samples each sorted
    by length, rows x longest row within the budget) instead of ``micro_batch_prompts``; the
    Bradley-Terry gradient stays exact at the cost of one more forward over the teacher rows. 0 = off."""
    freeze: bool = False
    """GAD-stage ablation: keep the discriminator fixed (off-policy reward, reward-hackable)."""
    head_init_std: float = 0.0
    """Std of the score head's normal init; 0 = 1/sqrt(hidden_size + 1), as transformers' Linear."""
    pooling: str = "last"
    """How the head's per-position outputs become ``D(x, y)``. ``last``: at the last valid token,
    the EOS (the paper's discriminator, default). ``sum`` / ``mean``: summed / averaged over the
    response tokens (an experimental option: a sequence log-ratio ``log p_T - log p_S`` is a sum over
    tokens; measured in benchmarks/RESULTS.md). An exported discriminator pools at the last token
    whatever this says: re-score with gadchat for ``sum`` / ``mean``."""
    baseline: str = "pi_old"
    """gad_lr stage (the likelihood-ratio discriminator ``D = sum_t log q(y_t) - sum_t log b(y_t)``,
    ``q`` a causal LM): the baseline ``b``. ``pi_old`` = the actor that drew the samples (the
    Bradley-Terry optimum is then ``q = p_T``, the teacher itself); ``reference`` = the frozen start
    model (its optimum ``q`` is ``p_T ref / pi``, not the teacher)."""
    bradley_terry_coef: float = 1.0
    """gad_lr stage: weight of the Bradley-Terry loss (teacher answer over each sample) in the
    language-model discriminator's update; 0 with ``sft_coef`` > 0 = ``q`` learns the teacher's text only."""
    sft_coef: float = 0.0
    """gad_lr stage: add this x the token-mean cross-entropy of ``q`` on the teacher answers to its update."""
    updates_per_step: int = 1
    """gad_lr stage: discriminator optimizer steps per actor step on the same batch."""
    length_normalised: bool = False
    """gad_lr stage: ``D`` is the token-mean of ``log q - log b`` over the answer instead of its sum, so
    the Bradley-Terry loss cannot separate the two sides by length alone (its optimum is then no
    longer ``q = p_T``); the actor's per-token reward is unchanged."""
    replay_steps: int = 0
    """gad_lr stage: ``q``'s Bradley-Terry loss also covers the teacher answers and samples of the
    last N steps, with the baselines scored then (a history of past samples, so that ``q`` does not
    only chase the current policy; Shrivastava et al., CVPR 2017); the loss is the mean over the
    N + 1 batches, and ``q``'s compute grows N + 1 times. Each rank keeps its own history, saved in
    the checkpoint. 0 = off."""


@dataclass
class TrainerConfig:
    stage: str = "warmup"
    prompts_per_step: int = 256
    """Global batch of prompts per step, split evenly over the ranks."""
    epochs: float = 1.0
    max_steps: int = 0
    """0 = as many steps as ``epochs`` allow."""
    discriminator_warmup: int = 10
    """The actor updates (warm-up: SFT; GAD: policy gradient) only once step >= discriminator_warmup;
    the discriminator trains from step 0. The official GAD recipe and verl call it
    trainer.critic_warmup, accepted as an alias (flag and YAML)."""
    seed: int = 42
    output_dir: str = "outputs/run"
    init_from: str = ""
    """A previous stage's output folder: its final actor (and discriminator) start this stage."""
    init_optimizer_states: bool = False
    """With init_from: also take the previous stage's Adam moments from its last ZeRO checkpoint."""
    init_full_precision: bool = True
    """With init_from in a bf16/fp16 run: start from the fp32 master weights in the previous
    stage's last ZeRO checkpoint, not from its exported bf16/fp16 weights (Adam moments start
    fresh unless init_optimizer_states). Needs that checkpoint to be its final step, written with
    as many ranks and the same ZeRO stage; otherwise the export is used, with a warning."""
    save_every: int = 0
    """Save a resumable checkpoint every N steps (0 = only at the end)."""
    keep_last: int = 2
    resume: str = "auto"
    """auto = continue from output_dir's latest checkpoint when there is one; none; or a folder."""
    log_every: int = 1
    eval_every: int = 0
    """SeqKD: every N steps, the forward NLL of the eval split's teacher answers (``eval/forward_nll``)
    and ROUGE-L of greedy rollouts on it (``eval/rouge_l``); 0 = off. With ``save_every`` the same N,
    ``inference.export --best-by eval/forward_nll`` exports the best checkpoint."""
    eval_prompts: int = 16
    tensorboard: bool = True
    progress_bar: bool = True
    log_param_digest: bool = False
    """Log ``digest/actor`` and ``digest/discriminator`` (sums over all weights) each step: which models moved."""
    oracle_reward: bool = False
    """GAD stage, diagnostic upper bound only (white-box, not GAD): replace the discriminator's reward
    by the teacher's sequence log-ratio ``log p_T(y|x) - log p_S(y|x)`` computed with
    ``--model.teacher_path`` (the Bayes-optimal discriminator; GRPO on it minimises the
    reverse KL). Shows what the policy-gradient stage reaches when the reward points at the teacher."""
    verify_rollout_sync: bool = False
    """After each weight push, check that vLLM's greedy output equals the actor's own (slow; a debug aid)."""
    export_hf: bool = True
    """Write Hugging Face folders of the final actor (and discriminator) into output_dir/final."""
    overwrite: bool = False
    """Starting fresh into an output_dir that already holds a run (metrics, checkpoints or final) is
    refused unless this is true; then the old run's files are removed first."""
    on_nonfinite: str = "error"
    """A NaN/Inf loss or gradient norm: error = stop (nothing saved over the last good checkpoint);
    skip = go on when DeepSpeed skipped that update (ZeRO 1-3 do), counted in ``nonfinite/skipped_steps``."""
    spike_threshold: float = 10.0
    """A loss, gradient norm or weight RMS above this many times the median of its previous steps
    is a spike: a warning, and the NaN guard names no checkpoint saved at or after a spike that
    came in the 20 steps before the NaN. 0 = off."""
    save_on_signal: bool = True
    """SIGTERM / SIGINT (a preempted job, ``kill`` of the launcher, Ctrl-C): every rank stops at the
    next step boundary and, when true, saves a checkpoint there first; resume continues exactly."""


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
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def check_paths(self) -> "GADConfig":
        """Local paths the run reads (model folders, DeepSpeed JSON, output dir), checked before any
        engine is built; raises ValueError naming the flag."""
        problems = path_problems(self)
        if problems:
            raise ValueError("invalid configuration: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


CHOICES = (
    ("rollout.backend", ("auto", "vllm", "hf")),
    ("discriminator.pooling", ("last", "sum", "mean")),
    ("data.overlong", ("skip", "error")),
    ("deepspeed.zero_stage", (0, 1, 2, 3)),
    ("model.dtype", DTYPES),
    ("trainer.on_nonfinite", ("error", "skip")),
    ("discriminator.baseline", ("pi_old", "reference")),
    ("actor.reward_form", ("token", "sequence")),
)
"""Fields with a fixed set of values."""
RANGES = (  # (flag, low, high or None, low excluded); high is inclusive
    ("rollout.temperature", 0, None, True), ("rollout.top_p", 0, 1, True), ("rollout.max_new_tokens", 1, None, False),
    ("rollout.vllm_gpu_memory_utilization", 0, 1, True), ("rollout.vllm_cpu_kvcache_gib", 0, None, True),
    ("rollout.tensor_parallel_size", 1, None, False), ("rollout.sync_bucket_mb", 0, None, True),
    ("rollout.hf_micro_batch_size", 1, None, False),
    ("actor.weight_decay", 0, None, False), ("actor.grad_clip", 0, None, False),
    ("discriminator.weight_decay", 0, None, False), ("discriminator.grad_clip", 0, None, False),
    ("actor.micro_batch_size", 1, None, False), ("actor.clip_eps", 0, None, True), ("actor.kl_coef", 0, None, False),
    ("actor.entropy_coef", 0, None, False), ("actor.ppo_epochs", 1, None, False), ("actor.mini_batches", 1, None, False),
    ("discriminator.micro_batch_prompts", 1, None, False), ("discriminator.micro_batch_tokens", 0, None, False),
    ("actor.micro_batch_tokens", 0, None, False), ("discriminator.head_init_std", 0, None, False),
    ("data.max_prompt_tokens", 1, None, False), ("data.max_response_tokens", 1, None, False),
    ("data.max_rows", 0, None, False),
    ("trainer.prompts_per_step", 1, None, False), ("trainer.epochs", 0, None, True), ("trainer.max_steps", 0, None, False),
    ("trainer.discriminator_warmup", 0, None, False), ("trainer.save_every", 0, None, False),
    ("trainer.keep_last", 1, None, False), ("trainer.log_every", 1, None, False), ("trainer.eval_every", 0, None, False),
    ("trainer.eval_prompts", 1, None, False), ("trainer.spike_threshold", 0, None, False),
    ("discriminator.bradley_terry_coef", 0, None, False), ("discriminator.sft_coef", 0, None, False),
    ("discriminator.updates_per_step", 1, None, False), ("discriminator.replay_steps", 0, None, False),
    ("actor.sft_coef", 0, None, False),
    ("actor.dpo_beta", 0, None, True), ("actor.reference_refresh_every", 0, None, False),
    ("actor.ema_decay", 0, 0.999999, False),
    *((f"{section}.{name}", 0, high, False) for section in ("actor", "discriminator")
      for name, high in (("lora_rank", None), ("lora_alpha", None), ("lora_dropout", 0.999))),
)
"""Numeric fields that must be finite and within a range."""
NON_EMPTY = (("model.actor_path", "a hub id or a folder"), ("data.train_files", "one or more files"),
             ("trainer.output_dir", "a folder"), ("trainer.resume", "auto, none or a checkpoint folder"))
"""Text fields that must name something."""


def _value(cfg: "GADConfig", flag: str):
    section, name = flag.split(".", 1)
    return getattr(getattr(cfg, section), name)


def _range_problem(flag: str, value, low, high, low_open: bool) -> str | None:
    """``--flag must be ..., got X`` when ``value`` is not a finite number within the range, else None."""
    if _finite(value) and (value > low if low_open else value >= low) and (high is None or value <= high):
        return None
    rule = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
    return f"--{flag} must be {rule}, got {value!r}"


def _betas_ok(text) -> bool:
    try:
        betas = parse_betas(text)
    except ValueError:
        return False
    return len(betas) == 2 and all(0 <= b < 1 for b in betas)


def value_problems(cfg: "GADConfig", trained_sections=("actor", "discriminator")) -> list:
    """Pure: the flags of ``cfg`` whose values are out of range, as ``--flag must ..., got X`` texts.
    ``trained_sections``: the optimizer sections of the roles the stage trains (their ``lr`` is
    checked). The stage's own rules (its name, GAD's ``n >= 2``, ...) are the stage layer's
    (:func:`gadchat.stages.configure.validate`)."""
    problems = [f"--{flag} must be one of {', '.join(map(str, options))}, got {_value(cfg, flag)!r}"
                for flag, options in CHOICES if _value(cfg, flag) not in options]
    problems += [f"--{flag} must be {rule}, got {_value(cfg, flag)!r}"
                 for flag, rule in NON_EMPTY if not str(_value(cfg, flag)).strip()]
    if cfg.trainer.oracle_reward and not cfg.model.teacher_path:
        problems.append("--trainer.oracle_reward must be false unless --model.teacher_path names the teacher whose "
                        f"log-ratio is the reward, got {cfg.trainer.oracle_reward!r}")
    if not (isinstance(cfg.rollout.n, int) and cfg.rollout.n >= 1):
        problems.append(f"--rollout.n must be >= 1, got {cfg.rollout.n!r}")
    lr_ranges = tuple((f"{name}.lr", 0, None, False) for name in trained_sections)  # 0: weights held (probes)
    problems += [text for flag, low, high, low_open in lr_ranges + RANGES
                 if (text := _range_problem(flag, _value(cfg, flag), low, high, low_open))]
    problems += [f"--{name}.betas must be two comma-separated numbers in [0, 1), e.g. 0.9,0.999, got "
                 f"{getattr(cfg, name).betas!r}" for name in ("actor", "discriminator")
                 if not _betas_ok(getattr(cfg, name).betas)]
    scorer = cfg.discriminator
    if _finite(scorer.bradley_terry_coef) and _finite(scorer.sft_coef) and not (scorer.bradley_terry_coef > 0
                                                                                 or scorer.sft_coef > 0):
        problems.append("--discriminator.bradley_terry_coef must be > 0 unless --discriminator.sft_coef > 0 (the "
                        f"discriminator needs a loss), got {scorer.bradley_terry_coef!r}")
    problems += [problem for name in ("actor", "discriminator") if (problem := lora_problem(getattr(cfg, name), name))]
    split = cfg.data.eval_split
    if not (_finite(split) and (split == 0 or 0 < split < 1)):
        problems.append(f"--data.eval_split must be 0 (off) or a fraction > 0 and < 1, got {split!r}")
    return problems


def lora_problem(section, name: str) -> str:
    """Pure: why ``--<name>.lora_*`` cannot be used as given, or ``""``."""
    if not (isinstance(section.lora_rank, int) and section.lora_rank > 0):
        return ""
    targets = [t.strip() for t in str(section.lora_target_modules).split(",") if t.strip()]
    if not targets:
        return f"--{name}.lora_target_modules must name modules (e.g. {LORA_DEFAULT_TARGETS}) or all-linear, got ''"
    refused = [t for t in targets if t.split(".")[-1] in ("embed_tokens", "lm_head", "score", "wte")]
    if refused:
        return (f"--{name}.lora_target_modules: {', '.join(refused)} cannot take an adapter here (the embedding and "
                "the LM head are tied in small Qwen models and pushed whole to vLLM; a discriminator's score head "
                f"trains in full with LoRA anyway), got {section.lora_target_modules!r}")
    return ""


def looks_like_local_path(text: str) -> bool:
    """True for values that can only be a local path (absolute, ``./``, ``../``, ``~``, or more than
    one ``/``); a hub id is ``name`` or ``org/name``."""
    text = str(text)
    return text.startswith(("/", "./", "../", "~", ".\\")) or text.count("/") > 1 or text in (".", "..")


def path_problems(cfg: "GADConfig") -> list:
    problems = []
    for flag, value in (("model.actor_path", cfg.model.actor_path), ("model.discriminator_path", cfg.model.discriminator_path),
                        ("model.tokenizer_path", cfg.model.tokenizer_path),
                        ("model.teacher_path", cfg.model.teacher_path)):
        if value and not value.startswith("builtin:") and looks_like_local_path(value):
            path = Path(value).expanduser()
            if not path.exists():
                problems.append(f"--{flag} {value}: no such folder (a local model folder or a hub id org/name)")
            elif not path.is_dir():
                problems.append(f"--{flag} {value}: is a file, not a model folder")
    if cfg.trainer.init_from and not Path(cfg.trainer.init_from).is_dir():
        problems.append(f"--trainer.init_from {cfg.trainer.init_from}: no such folder")
    if cfg.deepspeed.config_file:
        try:
            problem = deepspeed_json_problem(read_deepspeed_json(cfg.deepspeed.config_file))
            if problem:
                problems.append(f"--deepspeed.config_file {cfg.deepspeed.config_file}: {problem}")
        except ValueError as exc:
            problems.append(str(exc))
    out = Path(cfg.trainer.output_dir)
    if out.exists() and not out.is_dir():
        problems.append(f"--trainer.output_dir {out}: is a file, not a folder")
    else:
        parent = next((p for p in out.absolute().parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            problems.append(f"--trainer.output_dir {out}: {parent} is a file, not a folder")
    return problems


def read_deepspeed_json(ds_file: str) -> dict:
    """The JSON object of ``--deepspeed.config_file``; ValueError naming the flag when the file is
    missing, not JSON or not an object."""
    path = Path(ds_file)
    if not path.is_file():
        raise ValueError(f"--deepspeed.config_file {ds_file}: no such file")
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--deepspeed.config_file {ds_file}: not valid JSON ({exc})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"--deepspeed.config_file {ds_file}: expected a JSON object, got {type(loaded).__name__}")
    return loaded


def _key_path(tree, key, value, prefix: str = "") -> str | None:
    """The dotted path in the JSON ``tree`` of the first ``key`` holding ``value``."""
    if isinstance(tree, dict):
        for name, child in tree.items():
            here = f"{prefix}.{name}" if prefix else str(name)
            if name == key and (child == value or value is None):
                return here
            found = _key_path(child, key, value, here)
            if found:
                return found
    return None


def deepspeed_json_problem(user: dict) -> str | None:
    """Pure (but imports DeepSpeed): why DeepSpeed's own schema refuses a user's DeepSpeed JSON,
    as ``field.path: reason (got value)``, with the batch fields the trainer sets itself; None when
    it is accepted."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    from deepspeed.runtime.config import DeepSpeedConfig as DeepSpeedSchema

    config = {k: v for k, v in user.items()
              if k not in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")}
    config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    try:
        DeepSpeedSchema(config)
    except Exception as exc:  # pydantic's ValidationError, DeepSpeed's asserts and ValueErrors
        errors = getattr(exc, "errors", None)
        if callable(errors):
            first = errors()[0]
            loc = [str(part) for part in first.get("loc", ())]
            path = (_key_path(user, loc[-1], first.get("input")) if loc else None) or ".".join(loc) or "?"
            return f"{path}: {first.get('msg', exc)} (got {first.get('input')!r}; DeepSpeed's {exc.title})"
        return f"refused by DeepSpeed: {' '.join(str(exc).split())[:300]}"
    return None


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def parse_betas(text: str) -> tuple:
    """``"0.9,0.999"`` (the ``betas`` field of the actor and discriminator sections) as AdamW's tuple."""
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


ALIASES = {"trainer.critic_warmup": "trainer.discriminator_warmup"}
"""Published names (the official GAD recipe, verl) accepted for our fields, as flags and in YAML."""


def _field_name(section_name: str, key: str, values: dict, source: str) -> str:
    """The field ``key`` of a section's ``values`` stands for (an alias names its field)."""
    target = ALIASES.get(f"{section_name}.{key}")
    if target is None:
        return key
    field_name = target.split(".", 1)[1]
    if field_name in values:
        raise ValueError(f"{source}: {section_name}.{key} and {target} name the same field; give one")
    return field_name


def apply_overrides(cfg: GADConfig, overrides: dict, source: str) -> GADConfig:
    """Set ``{section: {field: value}}`` on ``cfg`` (an alias of :data:`ALIASES` sets its field);
    unknown keys are errors naming ``source``."""
    sections = dict(_sections(cfg))
    for section_name, values in (overrides or {}).items():
        if section_name not in sections:
            raise ValueError(f"{source}: unknown section {section_name!r} (known: {sorted(sections)})")
        if not isinstance(values, dict):
            raise ValueError(f"{source}: section {section_name!r} must be a mapping")
        obj = sections[section_name]
        known = {f.name: f for f in dataclasses.fields(obj)}
        for key, value in values.items():
            key = _field_name(section_name, key, values, source)
            if key not in known:
                raise ValueError(f"{source}: unknown field {section_name}.{key}")
            kind = _field_type(type(obj), known[key])
            setattr(obj, key, _coerce(kind, value, f"{source}: {section_name}.{key}"))
    return cfg


def build_parser(description: str = "GAD-Chat training", defaults: GADConfig | None = None) -> argparse.ArgumentParser:
    """Every field as ``--section.field``, its help the field's doc and its default (from
    ``defaults``: a stage's published defaults, :func:`gadchat.stages.configure.build_parser`)."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)  # --trainer.over is no --trainer.overwrite
    parser.add_argument("--config", default="", help="YAML file with the same sections as the flags")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    defaults = defaults if defaults is not None else GADConfig()
    for section_name, obj in _sections(defaults):
        group = parser.add_argument_group(section_name)
        for f in dataclasses.fields(obj):
            kind = _field_type(type(obj), f)
            name = f"{section_name}.{f.name}"
            group.add_argument(
                f"--{name}", *(f"--{alias}" for alias, target in ALIASES.items() if target == name),
                dest=name,
                type=_parse_bool if kind is bool else kind,
                default=None,
                help=f"{help_text(type(obj), f.name)} (default: {getattr(obj, f.name)!r})".lstrip(),
            )
    return parser


def parse_config(argv, stage: str | None, parser: argparse.ArgumentParser, stage_defaults) -> GADConfig:
    """Pure parsing, unvalidated: the dataclass defaults, then ``stage_defaults(name)`` (the chosen
    stage's published values, ``{section: {field: value}}``), then ``--config`` YAML, then flags.
    The stage is ``stage`` (an entry point's), else ``--trainer.stage``, else the YAML's, else
    ``warmup``. Validation and the stage layer: :func:`gadchat.stages.configure.load_config`."""
    args = parser.parse_args(argv)
    cfg = GADConfig()
    from_yaml = {}
    if args.config:
        import yaml

        path = Path(args.config)
        if not path.exists():
            raise FileNotFoundError(f"--config: no such file {path}")
        try:
            with open(path, encoding="utf-8-sig") as handle:
                from_yaml = yaml.safe_load(handle) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ValueError(f"--config {path}{where}: not valid YAML ({problem})") from None
        except (UnicodeDecodeError, IsADirectoryError) as exc:
            raise ValueError(f"--config {path}: cannot be read as UTF-8 text ({exc})") from None
        if not isinstance(from_yaml, dict):
            raise ValueError(f"{path}: expected a mapping of sections, got {type(from_yaml).__name__}")
    yaml_trainer = from_yaml.get("trainer")
    yaml_stage = yaml_trainer.get("stage") if isinstance(yaml_trainer, dict) else None
    yaml_stage = yaml_stage if isinstance(yaml_stage, str) else None
    chosen_stage = stage or getattr(args, "trainer.stage") or yaml_stage or "warmup"
    apply_overrides(cfg, stage_defaults(chosen_stage), f"stage defaults ({chosen_stage})")
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
    return cfg


def save_config(cfg: GADConfig, path: str | Path) -> None:
    """``config.json``, written whole or not at all (a full disk leaves no partial file)."""
    from gadchat.checkpoint_files import write_atomic

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(path), json.dumps(cfg.to_dict(), indent=2))


def config_differences(saved: dict, cfg: GADConfig) -> list:
    """Pure: ``--section.field saved -> now`` for every field of ``cfg`` whose value differs from
    ``saved`` (a run's config.json)."""
    changes = []
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            before = (saved.get(section) or {}).get(key, "(absent)")
            if before != value:
                changes.append(f"--{section}.{key} {before!r} -> {value!r}")
    return changes


def config_from_dict(values: dict) -> GADConfig:
    return apply_overrides(GADConfig(), values, "saved config")
