"""Resumable checkpoints, the hand-off between stages, and Hugging Face export.

Layout of a stage's ``output_dir``::

    config.json  metrics.jsonl  tensorboard/
    checkpoints/latest                 -> name of the newest complete checkpoint (written last, atomically)
    checkpoints/step_00000040/
        actor/  critic/                DeepSpeed engine checkpoints (weights, optimizer, ZeRO shards)
        actor_hf/  critic_hf/          config + tokenizer, so the folder exports offline on its own
        rng_rank{r}.pt                 Python / NumPy / torch RNG states of every rank
        trainer_state.json             stage, step, data geometry, model signature (written last)
    final/actor/  final/critic/        Hugging Face folders (safetensors, tokenizer, chat template)

A checkpoint is complete only once ``latest`` names it, so a kill while one is written leaves the
previous one in force. Only the newest ``trainer.keep_last`` are kept.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from gadchat import runtime
from gadchat.config import parse_betas

logger = logging.getLogger("gadchat")

LATEST = "latest"
STATE_FILE = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not match the run; the message says which."""


# ----------------------------------------------------------------------------------------------
# hand-off between stages


def final_dir(output_dir) -> Path:
    return Path(output_dir) / "final"


def handoff_paths(cfg) -> tuple:
    """Model folders a stage starts from: ``trainer.init_from``'s exported final actor and
    discriminator, or the configured model paths."""
    if not cfg.trainer.init_from:
        return None, None
    source = final_dir(cfg.trainer.init_from)
    actor = source / "actor"
    if not (actor / "config.json").exists():
        raise CheckpointError(
            f"trainer.init_from={cfg.trainer.init_from}: no exported actor at {actor} "
            "(did that stage finish with --trainer.export_hf true?)")
    critic = source / "critic"
    critic_path = str(critic) if (critic / "config.json").exists() else None
    if cfg.trainer.stage == "gad" and critic_path is None:
        logger.warning("trainer.init_from=%s has no discriminator; the GAD stage starts from a fresh one",
                       cfg.trainer.init_from)
    return str(actor), critic_path


# ----------------------------------------------------------------------------------------------
# reading checkpoints


def checkpoint_root(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(path) -> Path | None:
    """The checkpoint named by ``latest`` in ``path`` (an output dir, its checkpoints/ folder, or a
    step folder itself); None when there is none yet."""
    path = Path(path)
    if (path / STATE_FILE).exists():
        return path
    for root in (path / "checkpoints", path):
        pointer = root / LATEST
        if pointer.exists():
            name = pointer.read_text().strip()
            step_dir = root / name
            if not (step_dir / STATE_FILE).exists():
                raise CheckpointError(f"{pointer} names {name!r}, but {step_dir / STATE_FILE} is missing: "
                                      "the checkpoint folder was removed or truncated")
            return step_dir
    return None


def read_state(step_dir) -> dict:
    path = Path(step_dir) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} is missing: {step_dir} is not a complete checkpoint") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is corrupt ({exc.msg})") from exc


def model_signature(module) -> dict:
    """Parameter count and shapes digest, to tell a mismatched checkpoint before DeepSpeed does."""
    numel, shapes = 0, []
    for name, param in module.named_parameters():
        shape = tuple(getattr(param, "ds_shape", param.shape))
        numel += int(torch.Size(shape).numel())
        shapes.append(f"{name}:{list(shape)}")
    import hashlib

    return {"numel": numel, "shapes_sha1": hashlib.sha1("\n".join(shapes).encode()).hexdigest()}


# ----------------------------------------------------------------------------------------------
# the trainer's checkpoints


class CheckpointManager:
    def __init__(self, trainer):
        self.trainer = trainer
        self.root = checkpoint_root(trainer.output_dir)

    def _engines(self):
        """The engines whose state a checkpoint holds: the trained ones (a frozen discriminator
        is re-loaded from its source at every start, like the reference)."""
        engine = self.trainer.engine
        out = {"actor": engine.actor}
        if engine.critic is not None and engine.critic_trainable:
            out["critic"] = engine.critic
        return out

    def _state(self, step: int) -> dict:
        tr = self.trainer
        return {
            "stage": tr.cfg.trainer.stage,
            "step": step,
            "total_steps": tr.total_steps,
            "world_size": tr.world_size,
            "seed": tr.cfg.trainer.seed,
            "num_rows": len(tr.examples),
            "prompts_per_step": tr.cfg.trainer.prompts_per_step,
            "zero_stage": tr.cfg.deepspeed.zero_stage,
            "models": {name: model_signature(e.module) for name, e in self._engines().items()},
        }

    def save(self, step: int) -> Path:
        tr = self.trainer
        step_dir = self.root / f"step_{step:08d}"
        with tr.engine.timer("checkpoint"):
            if tr.rank == 0:
                if step_dir.exists():  # a torn earlier attempt at this step
                    shutil.rmtree(step_dir)
                step_dir.mkdir(parents=True)
            runtime.barrier()
            for name, engine in self._engines().items():
                engine.save_checkpoint(str(step_dir), tag=name, save_latest=False)
            torch.save(runtime.rng_state(), step_dir / f"rng_rank{tr.rank}.pt")
            if tr.rank == 0:
                self._save_hf_metadata(step_dir)
            runtime.barrier()
            _fault_injection_point("checkpoint_written_before_latest", step)
            if tr.rank == 0:
                _write_atomic(step_dir / STATE_FILE, json.dumps(self._state(step), indent=2))
                _write_atomic(self.root / LATEST, step_dir.name)
                self._rotate()
            runtime.barrier()
        return step_dir

    def _save_hf_metadata(self, step_dir: Path):
        engine = self.trainer.engine
        for name, e in self._engines().items():
            folder = step_dir / f"{name}_hf"
            folder.mkdir(exist_ok=True)
            module = e.module.seqcls if name == "critic" else e.module
            module.config.save_pretrained(folder)
            if name == "actor" and getattr(module, "generation_config", None) is not None:
                module.generation_config.save_pretrained(folder)
            engine.tokenizer.save_pretrained(folder)

    def _rotate(self):
        keep = max(1, self.trainer.cfg.trainer.keep_last)
        steps = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        current = (self.root / LATEST).read_text().strip()
        for old in steps[:-keep]:
            if old.name != current:
                shutil.rmtree(old, ignore_errors=True)

    def maybe_resume(self) -> int:
        """Load the checkpoint ``trainer.resume`` asks for; returns the step to start at."""
        tr = self.trainer
        mode = tr.cfg.trainer.resume
        if mode == "none":
            step_dir = None
        elif mode == "auto":
            step_dir = latest_checkpoint(tr.output_dir)
        else:
            step_dir = latest_checkpoint(mode)
            if step_dir is None:
                raise CheckpointError(f"trainer.resume={mode}: no checkpoint there (no {LATEST} file or {STATE_FILE})")
        if step_dir is None:
            if tr.cfg.trainer.init_from and tr.cfg.trainer.init_optimizer_states:
                self._load_optimizer_states_from(tr.cfg.trainer.init_from)
            return 0
        state = read_state(step_dir)
        self._check_compatible(step_dir, state)
        self._load_engines(step_dir)
        rng_file = step_dir / f"rng_rank{tr.rank}.pt"
        if not rng_file.exists():
            raise CheckpointError(f"{rng_file} is missing: the checkpoint was written by fewer ranks")
        runtime.set_rng_state(torch.load(rng_file, weights_only=False))
        if tr.rank == 0:
            logger.info("resumed %s from %s at step %d/%d", state["stage"], step_dir, state["step"], tr.total_steps)
        return int(state["step"])

    def _check_compatible(self, step_dir: Path, state: dict):
        tr = self.trainer
        problems = []
        if state.get("stage") != tr.cfg.trainer.stage:
            problems.append(f"it is a {state.get('stage')!r} checkpoint, this run is the {tr.cfg.trainer.stage!r} stage")
        if state.get("world_size") != tr.world_size:
            problems.append(f"it was written by {state.get('world_size')} ranks, this run has {tr.world_size}")
        for key, mine in (("num_rows", len(tr.examples)), ("prompts_per_step", tr.cfg.trainer.prompts_per_step),
                          ("seed", tr.cfg.trainer.seed), ("zero_stage", tr.cfg.deepspeed.zero_stage)):
            if state.get(key) != mine:
                problems.append(f"{key} was {state.get(key)}, this run has {mine}")
        for name, engine in self._engines().items():
            saved = state.get("models", {}).get(name)
            if saved and saved != model_signature(engine.module):
                problems.append(f"the {name} model differs ({saved['numel']} parameters saved, "
                                f"{model_signature(engine.module)['numel']} now, or different shapes)")
        for name in self._engines():
            if not (step_dir / name).is_dir():
                problems.append(f"{step_dir / name} is missing")
        if problems:
            raise CheckpointError(f"cannot resume from {step_dir}: " + "; ".join(problems))

    def _load_optimizer_states_from(self, previous_output_dir):
        step_dir = latest_checkpoint(previous_output_dir)
        if step_dir is None:
            raise CheckpointError(f"trainer.init_optimizer_states: {previous_output_dir} has no checkpoint")
        self._load_engines(step_dir, skip_missing=True)

    def _load_engines(self, step_dir: Path, skip_missing: bool = False):
        """Weights and optimizer states of every trained engine from ``step_dir`` (``skip_missing``:
        engines the checkpoint lacks, e.g. a SeqKD checkpoint's discriminator, keep their own),
        then this run's hyper-parameters; the rollout engine is re-synced before its next use."""
        for name, engine in self._engines().items():
            if skip_missing and not (step_dir / name).is_dir():
                continue
            try:
                path, _ = engine.load_checkpoint(str(step_dir), tag=name, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
            except (RuntimeError, EOFError, OSError, KeyError, ValueError, AssertionError) as exc:
                raise CheckpointError(f"{step_dir / name}: the {name} checkpoint is truncated or corrupt "
                                      f"({type(exc).__name__}: {str(exc)[:300]})") from exc
            if path is None:
                raise CheckpointError(f"{step_dir / name}: DeepSpeed found no {name} checkpoint there")
        self._apply_configured_hyperparameters()
        self.trainer.engine.mark_actor_updated()

    def _apply_configured_hyperparameters(self):
        """Loaded optimizer states carry the learning rate, betas and weight decay they were saved
        with; this run's configuration wins (a GAD stage must not inherit the warm-up's LR)."""
        cfg = self.trainer.cfg
        for name, engine in self._engines().items():
            section = cfg.actor if name == "actor" else cfg.critic
            betas = parse_betas(section.betas)
            for group in engine.optimizer.param_groups:
                group["lr"], group["weight_decay"] = section.lr, section.weight_decay
                if "betas" in group:
                    group["betas"] = betas

    # ------------------------------------------------------------------------------------------

    def export_final(self) -> Path:
        out = final_dir(self.trainer.output_dir)
        engine = self.trainer.engine
        with engine.timer("export"):
            export_live(engine.actor.module, out / "actor", engine.tokenizer, zero3=engine.zero3)
            if engine.critic is not None:
                export_live(engine.critic.module.seqcls, out / "critic", engine.tokenizer, zero3=engine.zero3)
        return out


def _fault_injection_point(name: str, step: int) -> None:
    """For crash tests: ``GADCHAT_KILL_AT=name:step`` makes the process SIGKILL itself here."""
    if os.environ.get("GADCHAT_KILL_AT") == f"{name}:{step}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# export


def gathered_state_dict(module, zero3: bool) -> dict:
    """Full CPU state dict of ``module`` on rank 0 (every rank must call it under ZeRO-3)."""
    import deepspeed

    state = {}
    for name, param in module.named_parameters():
        if zero3:
            with deepspeed.zero.GatheredParameters([param]):
                if runtime.is_rank0():
                    state[name] = param.data.detach().cpu().clone()
        elif runtime.is_rank0():
            state[name] = param.data.detach().cpu().clone()
    for name, buffer in module.named_buffers():
        if runtime.is_rank0() and buffer is not None:
            state.setdefault(name, buffer.detach().cpu().clone())
    return state


def _save_hf_folder(model_like, state: dict, out: Path, tokenizer) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model_like.save_pretrained(out, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(out)


def export_live(module, out: Path, tokenizer, zero3: bool) -> None:
    """Save a training module (actor, or the discriminator's sequence-classification model) as a
    Hugging Face folder, gathered to rank 0."""
    state = gathered_state_dict(module, zero3)
    if runtime.is_rank0():
        persistent = set(module.state_dict().keys())
        state = {k: v for k, v in state.items() if k in persistent}
        _save_hf_folder(module, state, Path(out), tokenizer)
    runtime.barrier()


def export_from_checkpoint(checkpoint_path, out_dir, which: str = "actor", dtype: str = "float32") -> Path:
    """Offline export of one model from a DeepSpeed checkpoint folder (ZeRO 0-3), CPU only."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    step_dir = latest_checkpoint(checkpoint_path)
    if step_dir is None:
        raise CheckpointError(f"{checkpoint_path}: no checkpoint found (no {LATEST} file or {STATE_FILE})")
    engine_dir = step_dir / which
    meta = step_dir / f"{which}_hf"
    if not engine_dir.is_dir() or not (meta / "config.json").exists():
        raise CheckpointError(f"{step_dir} holds no {which} checkpoint ({engine_dir} or {meta}/config.json missing)")
    state = _consolidated_weights(step_dir, which)
    prefix = "seqcls." if which == "critic" else ""
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    config = AutoConfig.from_pretrained(meta)
    cls = AutoModelForSequenceClassification if which == "critic" else AutoModelForCausalLM
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    with torch.device("meta"):
        model = cls.from_config(config)
    expected = set(model.state_dict().keys())
    missing = [k for k in expected if k not in state and not _is_tied(config, k)]
    if missing:
        raise CheckpointError(f"{engine_dir}: the checkpoint lacks {len(missing)} weights of the model, e.g. {missing[:3]}")
    state = {k: v.to(torch_dtype) for k, v in state.items() if k in expected}
    model = model.to_empty(device="cpu")
    model.load_state_dict(state, strict=False)
    if _is_tied(config, "lm_head.weight"):
        model.tie_weights()
    out = Path(out_dir)
    _save_hf_folder(model, state, out, AutoTokenizer.from_pretrained(meta))
    if (meta / "generation_config.json").exists():
        shutil.copy(meta / "generation_config.json", out / "generation_config.json")
    return out


def _is_tied(config, key: str) -> bool:
    return key == "lm_head.weight" and getattr(config, "tie_word_embeddings", False)


def _consolidated_weights(step_dir: Path, which: str) -> dict:
    state = read_state(step_dir)
    engine_dir = step_dir / which
    if state.get("zero_stage", 0) >= 2:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            return get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=which)
        except (FileNotFoundError, ValueError, RuntimeError, EOFError, KeyError) as exc:
            raise CheckpointError(f"{engine_dir}: cannot read the ZeRO shards ({exc})") from exc
    files = sorted(engine_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{engine_dir}: no mp_rank_*_model_states.pt file")
    try:
        saved = torch.load(files[0], map_location="cpu", weights_only=False)
    except (EOFError, RuntimeError) as exc:
        raise CheckpointError(f"{files[0]} is truncated or corrupt ({exc})") from exc
    return {k: v.float() for k, v in saved["module"].items()}
