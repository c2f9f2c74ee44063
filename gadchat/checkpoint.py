"""Resumable checkpoints, the hand-off between stages, and the final export
(:mod:`gadchat.hf_export` writes the folders, :mod:`gadchat.safe_load` reads files without running code).

Layout of a stage's ``output_dir``::

    .gadchat.lock                      held by the running stage (gadchat.run_lock); gone once it ends
    config.json  metrics.jsonl  tensorboard/
    checkpoints/latest                 -> name of the newest complete checkpoint (written last, atomically)
    checkpoints/step_00000040/
        actor/  discriminator/                DeepSpeed engine checkpoints (weights, optimizer, ZeRO shards)
        actor_hf/  discriminator_hf/          config + tokenizer, so the folder exports offline on its own
        rng_rank{r}.pt                 Python / NumPy / torch RNG states of every rank
        trainer_state.json             stage, step, data geometry, model signature, health (written last)
    final/actor/  final/discriminator/        Hugging Face folders (safetensors, tokenizer, chat template)
    final/COMPLETE                     written last: the export is whole

A checkpoint is complete only once ``latest`` names it, so a kill while one is written leaves the
previous one in force. Its ``health`` records whether every trained weight was finite when it was
saved (counted), whether its step's metrics were, and the spikes just before it: the non-finite
guard only calls a checkpoint good on that record (:func:`last_good_checkpoint`). Only the newest ``trainer.keep_last`` are kept. The final export is written
to ``final.partial/`` and renamed to ``final/`` once ``COMPLETE`` is in it, so a ``final/`` folder
is never torn.

Loading runs no code: every ``.pt`` file is read with ``torch.load(weights_only=True)`` (tensors,
plain containers and three DeepSpeed state classes), DeepSpeed's own loader included (its
``checkpoint_engine.load`` is replaced per engine); the offline ZeRO-2/3 consolidation, which
DeepSpeed unpickles itself, only runs after every file passed the same check.
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
from gadchat.checkpoint_files import (COMPLETE, LATEST, STATE_FILE, checkpoint_root, disk_error,  # noqa: F401
                                      export_complete, final_dir, last_good_checkpoint, latest_checkpoint, read_state,
                                      require_free_space, write_atomic)
from gadchat.hf_export import export_live
from gadchat.lora import adapter_state_dict, lora_config, lora_record, same_digest, save_adapter_folder
from gadchat.roles import CAUSAL_LM, SCORER
from gadchat.safe_load import (CheckpointError, _safe_checkpoint_engine, safe_torch_load,  # noqa: F401  (re-exported)
                               verify_loadable_without_code, weight_file_problem)

logger = logging.getLogger("gadchat")

RUN_MARKERS = ("metrics.jsonl", "checkpoints", "final", "final.partial", "tensorboard", "config.json")
"""What a stage writes into its output_dir (``--trainer.overwrite true`` removes them)."""
CHECKPOINT_BYTES_PER_PARAM = 16
"""fp32 weights + two Adam moments (12) plus the low-precision copy and slack: a checkpoint's size."""
LIKELIHOOD_RATIO_FILE = "likelihood_ratio.json"
"""Beside an exported language-model discriminator (gad_lr): how it scores (baseline, temperature)."""


# ----------------------------------------------------------------------------------------------
# hand-off between stages


def handoff_paths(cfg, roles: dict) -> dict:
    """``{role: folder}`` of ``trainer.init_from``'s exported final models, for the roles this
    stage declares (empty without ``init_from``); a declared role the previous stage did not export
    starts from its configured source, with a warning for a discriminator."""
    if not cfg.trainer.init_from:
        return {}
    source = final_dir(cfg.trainer.init_from)
    if not export_complete(cfg.trainer.init_from):
        raise CheckpointError(
            f"trainer.init_from={cfg.trainer.init_from}: no complete export at {source} (no {source / COMPLETE}; "
            "did that stage finish with --trainer.export_hf true? rerun it to finish its export)")
    found = {name: str(source / name) for name in roles if (source / name / "config.json").exists()}
    if "discriminator" in roles and "discriminator" not in found:
        logger.warning("trainer.init_from=%s has no discriminator; the %s stage starts from a fresh one",
                       cfg.trainer.init_from, cfg.trainer.stage)
    return found


# ----------------------------------------------------------------------------------------------
# the output dir: no silent overwrite


def previous_run_files(output_dir) -> list:
    """Pure: the files of an earlier run in ``output_dir`` (metrics, checkpoints, export)."""
    out = Path(output_dir)
    return [name for name in ("metrics.jsonl", "checkpoints", "final", "final.partial") if (out / name).exists()]


def starts_fresh(cfg) -> bool:
    """Whether this run starts at step 0 in its output_dir (resume none, auto with no checkpoint
    there, or a checkpoint folder outside it)."""
    t = cfg.trainer
    if t.resume == "none":
        return True
    if t.resume == "auto":
        return latest_checkpoint(t.output_dir) is None
    own = Path(t.output_dir).resolve()
    return own not in Path(t.resume).resolve().parents and Path(t.resume).resolve() != own


def check_output_dir(cfg) -> bool:
    """Refuse (CheckpointError, nothing written) to start fresh into an output_dir holding a run
    unless ``trainer.overwrite``; returns True when the old run must be cleared first."""
    out = Path(cfg.trainer.output_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--trainer.output_dir {out} is a file, not a folder")
    found = previous_run_files(out)
    if not found or not starts_fresh(cfg):
        return False
    if cfg.trainer.overwrite:
        return True
    how = ("--trainer.resume none starts over" if cfg.trainer.resume == "none"
           else "there is no checkpoint to resume from")
    raise CheckpointError(
        f"--trainer.output_dir {out} already holds a run ({', '.join(found)}) and {how}; pass "
        "--trainer.overwrite true to replace it, or choose another --trainer.output_dir")


def clear_previous_run(output_dir) -> None:
    """Remove what an earlier run wrote (``RUN_MARKERS``), so nothing stale is left beside the new run."""
    out = Path(output_dir)
    for name in RUN_MARKERS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


# ----------------------------------------------------------------------------------------------
# reading checkpoints


def resume_source(cfg) -> Path | None:
    """The checkpoint folder ``trainer.resume`` names (None: start at step 0)."""
    mode = cfg.trainer.resume
    if mode == "none":
        return None
    if mode == "auto":
        return latest_checkpoint(cfg.trainer.output_dir)
    step_dir = latest_checkpoint(mode)
    if step_dir is None:
        raise CheckpointError(f"trainer.resume={mode}: no checkpoint there (no {LATEST} file or {STATE_FILE})")
    return step_dir


def check_files_before_loading(cfg, sources: dict, handoff: dict) -> None:
    """Before any model loads: every local model folder's weight files and the resume checkpoint's
    files are whole (CheckpointError naming the file and the flag that points at it)."""
    for name, source in sources.items():
        problem = weight_file_problem(source) if source and not str(source).startswith("builtin:") else None
        if problem:
            flag = (f"--trainer.init_from {cfg.trainer.init_from}" if handoff.get(name) == source
                    else f"--model.{'actor' if name == 'reference' else name}_path {source}")
            raise CheckpointError(f"{flag}: {problem}")
    step_dir = resume_source(cfg)
    if step_dir is not None:
        try:
            verify_loadable_without_code(step_dir)
        except CheckpointError as exc:
            raise CheckpointError(f"--trainer.resume {cfg.trainer.resume}: cannot resume from {step_dir}: {exc}") from None


def model_signature(module, trainable_only: bool = False) -> dict:
    """Parameter count and shapes digest, to tell a mismatched checkpoint before DeepSpeed does."""
    numel, shapes = 0, []
    for name, param in module.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        shape = tuple(getattr(param, "ds_shape", param.shape))
        numel += int(torch.Size(shape).numel())
        shapes.append(f"{name}:{list(shape)}")
    import hashlib

    return {"numel": numel, "shapes_sha1": hashlib.sha1("\n".join(shapes).encode()).hexdigest()}


# ----------------------------------------------------------------------------------------------
# the trainer's checkpoints


class CheckpointManager:
    """Resumable checkpoints of a stage's trained roles, and the final export of its exported roles."""

    def __init__(self, cfg, engine, rank: int, world_size: int, num_rows: int, total_steps: int,
                 carried: dict | None = None):
        self.cfg, self.engine, self.rank, self.world_size = cfg, engine, rank, world_size
        self.num_rows, self.total_steps = num_rows, total_steps
        self.carried = {} if carried is None else carried  # the recipe's state between steps (StageContext.carried)
        self.output_dir = Path(cfg.trainer.output_dir)
        self.root = checkpoint_root(self.output_dir)
        # The frozen base of each LoRA role, as a weight digest (a collective: every rank, here).
        self._base_digests = {name: engine.param_digest(model, frozen_only=True)
                              for name, model in self._engines().items() if engine.lora_section(name)}

    def _engines(self):
        """The engines whose state a checkpoint holds: the trained roles (a frozen role, such as
        the reference or a frozen discriminator, is re-loaded from its source at every start)."""
        return self.engine.trained_models()

    def _state(self, step: int) -> dict:
        return {
            "stage": self.cfg.trainer.stage,
            "step": step,
            "total_steps": self.total_steps,
            "world_size": self.world_size,
            "seed": self.cfg.trainer.seed,
            "num_rows": self.num_rows,
            "prompts_per_step": self.cfg.trainer.prompts_per_step,
            "zero_stage": self.cfg.deepspeed.zero_stage,
            "models": {name: model_signature(e.module) for name, e in self._engines().items()},
            "lora": self._lora_state(),
        }

    def _lora_state(self) -> dict:
        """``{role: {"rank": r, "alpha", "targets", "base_digest"}}`` of the trained roles: a LoRA
        checkpoint holds the adapter (and a discriminator's head) only, the frozen base is rebuilt
        from its source at every start and must be the one the adapter was trained on."""
        out = {}
        for name in self._engines():
            section = self.engine.lora_section(name)
            out[name] = lora_record(section)
            if section:
                out[name].update(base_digest=self._base_digest(name), base=self.engine.model_paths[name],
                                 dtype=str(self.engine.dtype).replace("torch.", ""))
        return out

    def _base_digest(self, name: str) -> float:
        """``sum(w) + sum(w^2)`` (float64, all ranks) over the frozen weights of a LoRA role."""
        return self._base_digests[name]

    def _saves_frozen(self, name: str) -> bool:
        return self.engine.lora_section(name) is None

    def checkpoint_bytes(self) -> int:
        """Estimated size of one checkpoint, all ranks together (saved parameter count x 16 bytes: a
        LoRA role saves its trainable parameters only)."""
        return sum(model_signature(e.module, trainable_only=not self._saves_frozen(name))["numel"]
                   for name, e in self._engines().items()) * CHECKPOINT_BYTES_PER_PARAM

    def save(self, step: int, health: dict | None = None) -> Path:
        """Write the step-``step`` checkpoint; ``health`` (the guard's count of non-finite weights
        and whether the step's metrics were finite) goes into its trainer_state.json. A write that
        fails on any rank (a full disk) ends every rank with one line naming the folder."""
        step_dir = self.root / f"step_{step:08d}"
        with self.engine.timer("checkpoint"):
            require_free_space(self.root, self.checkpoint_bytes(), f"the step-{step} checkpoint")
            error = None
            try:
                if self.rank == 0:
                    if step_dir.exists():  # a torn earlier attempt at this step
                        shutil.rmtree(step_dir)
                    step_dir.mkdir(parents=True)
                runtime.barrier()
                for name, engine in self._engines().items():
                    engine.save_checkpoint(str(step_dir), tag=name, save_latest=False,
                                           exclude_frozen_parameters=not self._saves_frozen(name))
                torch.save(runtime.rng_state(), step_dir / f"rng_rank{self.rank}.pt")
                if self.engine.actor_ema is not None:
                    torch.save(self.engine.actor_ema.state_dict(), step_dir / f"ema_rank{self.rank}.pt")
                torch.save(self.carried, step_dir / f"carried_rank{self.rank}.pt")
                if self.rank == 0:
                    self._save_hf_metadata(step_dir)
            except (OSError, RuntimeError) as exc:
                error = disk_error(step_dir, f"the step-{step} checkpoint", exc)
            runtime.raise_together(error, CheckpointError)
            _fault_injection_point("checkpoint_written_before_latest", step)
            try:
                if self.rank == 0:
                    write_atomic(step_dir / STATE_FILE, json.dumps({**self._state(step), "health": health or {}}, indent=2))
                    write_atomic(self.root / LATEST, step_dir.name)
                    self._rotate()
            except OSError as exc:
                error = disk_error(step_dir, f"the step-{step} checkpoint", exc)
            runtime.raise_together(error, CheckpointError)
        return step_dir

    def _save_hf_metadata(self, step_dir: Path):
        for name in self._engines():
            folder = step_dir / f"{name}_hf"
            folder.mkdir(exist_ok=True)
            module = self.engine.hf_module(name)
            module.config.save_pretrained(folder)
            if name == "actor" and getattr(module, "generation_config", None) is not None:
                module.generation_config.save_pretrained(folder)
            self.engine.tokenizer.save_pretrained(folder)

    def _rotate(self):
        keep = max(1, self.cfg.trainer.keep_last)
        steps = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        current = (self.root / LATEST).read_text().strip()
        for old in steps[:-keep]:
            if old.name != current:
                shutil.rmtree(old, ignore_errors=True)

    def maybe_resume(self) -> int:
        """Load the checkpoint ``trainer.resume`` asks for; returns the step to start at."""
        t = self.cfg.trainer
        step_dir = resume_source(self.cfg)
        if step_dir is None:
            if t.init_from and t.init_optimizer_states:
                self._load_optimizer_states_from(t.init_from)
            elif t.init_from and t.init_full_precision and self.engine.dtype != torch.float32:
                self._load_master_weights_from(t.init_from)
            return 0
        state = read_state(step_dir)
        self._check_compatible(step_dir, state)
        self._load_engines(step_dir)
        rng_file = step_dir / f"rng_rank{self.rank}.pt"
        if not rng_file.exists():
            raise CheckpointError(f"{rng_file} is missing: the checkpoint was written by fewer ranks")
        apply_state_file(rng_file, " is not an RNG state of this version", runtime.set_rng_state)
        if self.engine.actor_ema is not None:
            self._load_ema(step_dir / f"ema_rank{self.rank}.pt")
        self._load_carried(step_dir / f"carried_rank{self.rank}.pt")
        if self.rank == 0:
            logger.info("resumed %s from %s at step %d/%d", state["stage"], step_dir, state["step"], self.total_steps)
        return int(state["step"])

    def _load_carried(self, path: Path) -> None:
        """The recipe's state between steps, as saved. A checkpoint of an older version has none:
        the recipe then starts it empty (said in a warning)."""
        self.carried.clear()
        if not path.exists():
            logger.warning("%s is missing (a checkpoint of an older version): the stage's state between steps "
                           "starts empty", path)
            return
        def restore(state):
            if not isinstance(state, dict):
                raise TypeError(f"a {type(state).__name__}, not a dict")
            self.carried.update(state)

        apply_state_file(path, ": not a stage state of this version", restore)

    def _load_ema(self, path: Path) -> None:
        if not path.exists():
            raise CheckpointError(f"{path} is missing: --actor.ema_decay is on, and the checkpoint was written "
                                  "without an EMA (or by fewer ranks); resume with --actor.ema_decay 0")
        apply_state_file(path, ": not an EMA of this run's actor",
                         lambda state: self.engine.actor_ema.load_state_dict(state, path))

    def _shard_problems(self, state: dict) -> list:
        """Why DeepSpeed could not load a checkpoint's ZeRO shards into this run's engines as they
        are: another rank count, another ZeRO stage, another model."""
        problems = self._lora_problems(state)
        if problems:
            return problems  # the model shapes then differ too; the LoRA flags say why
        if state.get("world_size") != self.world_size:
            problems.append(f"it was written by {state.get('world_size')} ranks, this run has {self.world_size}")
        if state.get("zero_stage") != self.cfg.deepspeed.zero_stage:
            problems.append(f"zero_stage was {state.get('zero_stage')}, this run has {self.cfg.deepspeed.zero_stage}")
        for name, engine in self._engines().items():
            saved = state.get("models", {}).get(name)
            if saved and saved != model_signature(engine.module):
                problems.append(f"the {name} model differs ({saved['numel']} parameters saved, "
                                f"{model_signature(engine.module)['numel']} now, or different shapes)")
        return problems

    def _lora_problems(self, state: dict) -> list:
        """A checkpoint written with another LoRA setting (or full fine-tuning), or whose adapter
        was trained on another base model, named by the flag that differs."""
        problems = []
        saved_all = state.get("lora", {})
        for name in self._engines():
            section = self.engine.lora_section(name)
            mine = lora_record(section)
            saved = {k: v for k, v in saved_all.get(name, {"rank": 0}).items() if k in ("rank", "alpha", "targets")}
            if saved != mine:
                flag = self.engine.roles[name].optimizer_section
                said = "full fine-tuning" if not saved.get("rank") else f"LoRA {saved}"
                now = "full fine-tuning" if not mine.get("rank") else f"LoRA {mine}"
                problems.append(f"--{flag}.lora_rank/lora_alpha/lora_target_modules: the {name} checkpoint was written "
                                f"with {said}, this run has {now}")
            elif section and "base_digest" in saved_all.get(name, {}) and \
                    not same_digest(saved_all[name]["base_digest"], self._base_digest(name)):
                problems.append(f"the {name}'s frozen base differs from the one its adapter was trained on (weight "
                                f"digest {saved_all[name]['base_digest']!r} saved, {self._base_digest(name)!r} now): "
                                f"the run must start from the same model ({self.engine.model_paths.get(name)})")
        return problems

    def _check_compatible(self, step_dir: Path, state: dict):
        cfg = self.cfg
        problems = []
        if state.get("stage") != cfg.trainer.stage:
            problems.append(f"it is a {state.get('stage')!r} checkpoint, this run is the {cfg.trainer.stage!r} stage")
        problems += self._shard_problems(state)
        for key, mine in (("num_rows", self.num_rows), ("prompts_per_step", cfg.trainer.prompts_per_step),
                          ("seed", cfg.trainer.seed)):
            if state.get(key) != mine:
                problems.append(f"{key} was {state.get(key)}, this run has {mine}")
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

    def _load_master_weights_from(self, previous_output_dir):
        """The full-precision hand-off: the previous stage's fp32 master weights (its final ZeRO
        checkpoint, which holds the same weights as its export before rounding) with fresh Adam
        moments. A checkpoint DeepSpeed cannot load as it is (another rank count or ZeRO stage,
        another model) leaves the export's weights in place, with a warning that says why."""
        step_dir = latest_checkpoint(previous_output_dir)
        if step_dir is None:
            problems = ["it has no checkpoint"]
        else:
            state = read_state(step_dir)
            problems = self._shard_problems(state)
            if state.get("step") != state.get("total_steps"):
                problems.append(f"its last checkpoint is step {state.get('step')} of {state.get('total_steps')}, "
                                "not the exported final step")
        if problems:
            if self.rank == 0:
                logger.warning("trainer.init_full_precision: %s: %s; this stage starts from the exported %s weights",
                               previous_output_dir, "; ".join(problems), str(self.engine.dtype).replace("torch.", ""))
            return
        self._load_engines(step_dir, skip_missing=True)
        loaded = [name for name in self._engines() if (step_dir / name).is_dir()]
        for name in loaded:
            fresh_optimizer_moments(self._engines()[name])
        if self.rank == 0:
            logger.info("full-precision hand-off: fp32 master weights of %s from %s, fresh optimizer moments",
                        ", ".join(loaded), step_dir)

    def _load_engines(self, step_dir: Path, skip_missing: bool = False):
        """Weights and optimizer states of every trained engine from ``step_dir`` (``skip_missing``:
        engines the checkpoint lacks, e.g. a SeqKD checkpoint's discriminator, keep their own),
        then this run's hyper-parameters; the rollout engine is re-synced before its next use."""
        for name, engine in self._engines().items():
            if skip_missing and not (step_dir / name).is_dir():
                continue
            _safe_checkpoint_engine(engine)
            try:
                path, _ = engine.load_checkpoint(str(step_dir), tag=name, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True,
                                                 load_module_strict=self._saves_frozen(name))
            except CheckpointError:
                raise
            except (RuntimeError, EOFError, OSError, KeyError, ValueError, AssertionError) as exc:
                raise CheckpointError(f"{step_dir / name}: the {name} checkpoint is truncated or corrupt "
                                      f"({type(exc).__name__}: {str(exc)[:300]})") from exc
            if path is None:
                raise CheckpointError(f"{step_dir / name}: DeepSpeed found no {name} checkpoint there")
        self._apply_configured_hyperparameters()
        self.engine.mark_actor_updated()

    def _apply_configured_hyperparameters(self):
        """Loaded optimizer states carry the learning rate, betas and weight decay they were saved
        with; this run's configuration wins (a GAD stage must not inherit the warm-up's LR)."""
        for name, engine in self._engines().items():
            section = self.engine.optimizer_section(name)
            betas = parse_betas(section.betas)
            for group in engine.optimizer.param_groups:
                group["lr"], group["weight_decay"] = section.lr, section.weight_decay
                if "betas" in group:
                    group["betas"] = betas

    # ------------------------------------------------------------------------------------------

    def export_final(self) -> Path:
        """Hugging Face folders of the actor (and discriminator), written to ``final.partial/``,
        marked ``COMPLETE`` and renamed to ``final/``: a kill at any point leaves no torn ``final/``."""
        out = final_dir(self.output_dir)
        partial = out.with_name(out.name + ".partial")
        engine = self.engine
        modules = engine.exported_modules()
        with engine.timer("export"):
            copies = [*modules.values(), *([modules["actor"]] if engine.actor_ema is not None else [])]
            needed = sum(model_signature(m)["numel"] for m in copies) * torch.finfo(engine.dtype).bits // 8
            require_free_space(self.output_dir, needed, "the final export")
            if self.rank == 0 and partial.exists():
                shutil.rmtree(partial)
            runtime.barrier()
            for name, module in modules.items():
                export_live(module, partial / name, engine.tokenizer, zero3=engine.zero3)
                if engine.lora_section(name):
                    self._export_adapter(name, module, partial / f"{name}_adapter")
                if name == "discriminator" and engine.roles[name].kind == CAUSAL_LM and self.rank == 0:
                    write_atomic(partial / name / LIKELIHOOD_RATIO_FILE, json.dumps(self._likelihood_ratio_record(), indent=1))
                if name == "actor" and engine.actor_ema is not None:
                    with engine.actor_ema.swapped_in():
                        export_live(module, partial / "actor_ema", engine.tokenizer, zero3=engine.zero3)
                _fault_injection_point(f"export_wrote_{name}", 0)
            error = None
            try:
                if self.rank == 0:
                    write_atomic(partial / COMPLETE, "\n".join(modules) + "\n")
                    if out.exists():
                        shutil.rmtree(out)
                    os.replace(partial, out)
            except OSError as exc:
                error = disk_error(partial, "the final export", exc)
            runtime.raise_together(error, CheckpointError)
        return out

    def _likelihood_ratio_record(self) -> dict:
        """How the exported language-model discriminator ``q`` scores (gad_lr): its baseline and
        the temperature of both log-probs, so a user can score answers as the stage did."""
        d, t = self.cfg.discriminator, self.cfg.rollout.temperature
        scaled = self.cfg.actor.temperature_scaled_logprobs and t > 0
        return {"score": "sum_t log q(y_t | x, y_<t) - sum_t log b(y_t | x, y_<t) over the answer's tokens",
                "baseline": d.baseline,
                "baseline_model": "final/actor (the policy at the end; during training the policy that drew each "
                                  "batch)" if d.baseline == "pi_old" else str(self.engine.model_paths.get("actor")),
                "logits_temperature": t if scaled else 1.0}

    def _export_adapter(self, name: str, module, out: Path) -> None:
        """A LoRA role's adapter (and a discriminator's head) as PEFT's folder, beside its merged export."""
        scorer = self.engine.roles[name].kind == SCORER
        state = adapter_state_dict(module, self.engine.zero3, extra=("score.weight",) if scorer else ())
        error = None
        if self.rank == 0:
            try:
                save_adapter_folder(state, lora_config(self.engine.lora_section(name), seqcls=scorer), out,
                                    base_model=self.engine.model_paths[name])
            except OSError as exc:
                error = disk_error(out, "the final export", exc)
        runtime.raise_together(error, CheckpointError)


def apply_state_file(path: Path, refusal: str, apply) -> None:
    """``apply`` what a per-rank state file of a checkpoint holds (loaded by ``safe_torch_load``); a
    file that does not fit raises CheckpointError as ``{path}{refusal} (the error)``."""
    try:
        apply(safe_torch_load(path))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}{refusal} ({type(exc).__name__}: {exc})") from exc


def fresh_optimizer_moments(engine) -> None:
    """Forget a DeepSpeed engine's optimizer state (Adam's moments and step count) as if it had
    never stepped: torch's AdamW and DeepSpeed's CPU Adam create it again at the next step. The
    fp32 master weights, which ZeRO keeps outside that state, stay."""
    wrapper = engine.optimizer
    for optimizer in (getattr(wrapper, "optimizer", wrapper), getattr(wrapper, "backup_optimizer", None)):
        if optimizer is not None:
            optimizer.state.clear()


def _fault_injection_point(name: str, step: int) -> None:
    """For crash tests: ``GADCHAT_KILL_AT=name:step`` makes the process SIGKILL itself here."""
    if os.environ.get("GADCHAT_KILL_AT") == f"{name}:{step}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def pause_for_tests() -> None:
    """For stop and lock tests: ``GADCHAT_TEST_STEP_PAUSE=seconds`` sleeps at every step boundary
    (the run takes longer, its numbers do not change)."""
    seconds = float(os.environ.get("GADCHAT_TEST_STEP_PAUSE", "0") or 0)
    if seconds > 0:
        import time

        time.sleep(seconds)
