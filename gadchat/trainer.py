"""The stage loop: whatever stage runs (its recipe in :mod:`gadchat.stages`), build the roles it
declares, load the teacher data, resume, run ``recipe.step`` step after step with the non-finite
guard, checkpoint, export.

The run holds its output folder's lock (:mod:`gadchat.run_lock`) from before anything is read or
written until it ends, checks every weight file it will load before any model loads, and stops
every rank together at a step boundary on SIGTERM/SIGINT (:mod:`gadchat.stop_signal`). A write
that fails on one rank (a full disk) ends every rank with the same line.

Token-means inside a step are taken over the rank's whole batch (each micro-batch contributes its
share), and DeepSpeed averages the gradients over the ranks.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

from gadchat import checkpoint, roles, runtime
from gadchat.checkpoint_files import disk_error
from gadchat.config import GADConfig, config_differences, save_config
from gadchat.data import PromptSchedule, load_teacher_data
from gadchat.engine import HybridEngine
from gadchat.metrics_log import MetricsLogger
from gadchat.nonfinite import NonFiniteGuard
from gadchat.run_lock import FolderBusyError, FolderLock
from gadchat.stages import recipe
from gadchat.stages.base import StageContext, StepResult, stage_seed
from gadchat.stop_signal import StopRequested, StopWatch

logger = logging.getLogger("gadchat")
TOKENS = "throughput/tokens"  # the step's tokens, averaged over the ranks with the metrics, then popped


class StageTrainer:
    """Runs one stage: builds the engine over the recipe's roles, data and logger, resumes, loops,
    checkpoints, exports."""

    def __init__(self, cfg: GADConfig):
        self.cfg = cfg
        self.recipe = recipe(cfg.trainer.stage)
        self.rank, self.world_size, _ = runtime.init_distributed()
        logging.basicConfig(level=logging.INFO if self.rank == 0 else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        runtime.seed_everything(cfg.trainer.seed)
        self.output_dir = Path(cfg.trainer.output_dir)
        self.stop = StopWatch()
        self.metrics = None
        self.lock = self._lock_output_dir()
        try:
            self._build(cfg)
        except BaseException:
            self.release()
            raise

    def _lock_output_dir(self) -> FolderLock | None:
        """One run per output folder: rank 0 takes its lock, or every rank raises FolderBusyError
        naming the holder, before anything is read or written."""
        lock, error = None, None
        if self.rank == 0:
            try:
                lock = FolderLock(self.output_dir, f"the {self.cfg.trainer.stage} stage").acquire()
            except FolderBusyError as exc:
                error = exc
            except OSError as exc:
                error = disk_error(self.output_dir, "the lock file", exc)
        runtime.raise_together(error, FolderBusyError)
        return lock

    def release(self) -> None:
        """Close the metrics files (tensorboard's writer thread included) and the folder lock: the
        process may end without the interpreter's teardown (:func:`runtime.exit_process`)."""
        if self.metrics is not None:
            self.metrics.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _build(self, cfg: GADConfig) -> None:
        # Before anything is built or written: refuse to start over a run unless --trainer.overwrite.
        self.clear_output_dir = checkpoint.check_output_dir(cfg)
        stage_roles = self.recipe.roles(cfg)
        handoff = checkpoint.handoff_paths(cfg, stage_roles)
        sources = roles.role_sources(stage_roles, cfg, handoff)
        checkpoint.check_files_before_loading(cfg, sources, handoff)
        if self.rank == 0:
            logger.info("stage %s: %s", cfg.trainer.stage, "; ".join(
                f"{name} {'trains' if role.trains else 'frozen'} from {sources[name]}" for name, role in stage_roles.items()))
        self.engine = HybridEngine(cfg, self.rank, self.world_size, stage_roles, sources)
        self.tokenizer = self.engine.tokenizer
        self.examples, report = load_teacher_data(cfg.data, self.tokenizer)
        if self.rank == 0:
            logger.info("teacher data %s: %s", cfg.data.train_files, report.summary())
            for text in report.examples_of_skips:
                logger.warning("skipped: %s", text)
        self.schedule = PromptSchedule(len(self.examples), cfg.trainer.prompts_per_step, self.world_size, self.rank,
                                       stage_seed(cfg.trainer.seed, cfg.trainer.stage), cfg.data.shuffle)
        self.total_steps = self.schedule.total_steps(cfg.trainer.epochs, cfg.trainer.max_steps)
        carried = {}  # the recipe's state between steps: the context's, saved by the checkpoints
        self.checkpoints = checkpoint.CheckpointManager(cfg, self.engine, self.rank, self.world_size,
                                                        num_rows=len(self.examples), total_steps=self.total_steps,
                                                        carried=carried)
        self.guard = NonFiniteGuard(self.engine, cfg.trainer.on_nonfinite, self.output_dir, self.rank,
                                    cfg.trainer.spike_threshold)
        self.context = StageContext(cfg, self.engine, self.tokenizer, self.rank, self.world_size, carried)
        self.start_step = 0
        if self.recipe.uses_rollout(cfg):
            self.engine.build_rollout()
        init_times = self.engine.timer.timings()  # every rank: the step metrics must share their keys
        ds = cfg.deepspeed
        if self.world_size == 1 and ds.zero_stage == 3 and not (ds.offload_param or ds.offload_optimizer):
            logger.warning("ZeRO-3 on a single rank without offload partitions nothing and costs about 20% "
                           "per step (benchmarks/RESULTS.md); --deepspeed.zero_stage 0 is the faster choice here")
        if self.rank == 0:
            logger.info("engine ready: rollout=%s, ZeRO stage %d, %d rank(s), dtype %s; %s",
                        self.engine.backend, cfg.deepspeed.zero_stage, self.world_size, self.engine.dtype,
                        ", ".join(f"{k}={v:.1f}{'GiB' if k.startswith('mem/') else 's'}"
                                  for k, v in init_times.items()))

    def step_fn(self, step: int, batch: list) -> StepResult:
        """This rank's result of one step of the stage on ``batch``."""
        return self.recipe.step(self.context, step, batch)

    # ------------------------------------------------------------------------------------------

    def run(self) -> dict:
        try:
            return self._run()
        finally:
            self.release()

    def _run(self) -> dict:
        cfg, t = self.cfg, self.cfg.trainer
        if self.rank == 0:
            if self.clear_output_dir:
                logger.warning("--trainer.overwrite: removing the previous run in %s", self.output_dir)
                checkpoint.clear_previous_run(self.output_dir)
            self.output_dir.mkdir(parents=True, exist_ok=True)
        runtime.barrier()
        self.start_step = self.checkpoints.maybe_resume()
        if self.start_step >= self.total_steps:
            return self._finished()
        # Only once the resume was accepted: a refused one leaves config.json alone.
        self._write_together("config.json and metrics.jsonl", self._open_run_files)
        if t.log_param_digest and self.start_step == 0:
            self.metrics.log(0, self.param_digests(), advance=False)
        self.guard.start(self.start_step)
        self.saved = (None, None)  # (step, folder) of the last checkpoint this run wrote
        last = {}
        for step in range(self.start_step, self.total_steps):
            checkpoint.pause_for_tests()
            self._stop_if_asked(step)
            started = time.perf_counter()
            batch = [self.examples[i] for i in self.schedule.rank_indices(step)]
            counters = self.guard.counters()
            try:
                result = self.step_fn(step, batch)
            except RuntimeError as exc:  # e.g. transformers' sampler on NaN/Inf probabilities
                if not re.search(r"\b(nan|inf)\b", str(exc), re.IGNORECASE):
                    raise
                raise self.guard.from_sampler(step, exc) from exc
            local = dict(result.metrics)
            if t.log_param_digest:
                local.update(self.param_digests())
            if t.verify_rollout_sync:
                local.update(self.engine.rollout_sync_check([e.prompt_ids for e in batch], cfg.rollout.max_new_tokens))
            local.update(self.engine.timer.timings())
            local["time/step"] = time.perf_counter() - started
            digests = {k: local.pop(k) for k in list(local) if k.startswith("digest/")}
            metrics = runtime.all_reduce_mean({**local, TOKENS: result.tokens})  # one collective
            tokens = metrics.pop(TOKENS) * self.world_size
            metrics.update(digests)  # already global sums
            metrics["epoch"] = self.schedule.epoch_of(step + 1)
            metrics["throughput/tokens_per_s"] = tokens / max(metrics["time/step"], 1e-9)
            self.guard.check(step + 1, metrics, counters, self.metrics.log)
            last = metrics
            if (step + 1) % t.log_every == 0 or step + 1 == self.total_steps:
                self._write_together("metrics.jsonl", lambda: self.metrics.log(step + 1, metrics))
            else:
                self.metrics.advance()
            if t.save_every and (step + 1) % t.save_every == 0 and step + 1 < self.total_steps:
                self.save(step + 1)
        self.save(self.total_steps)
        if t.export_hf:
            self.checkpoints.export_final()
        return last  # run() closes the metrics files (release)

    def save(self, step: int):
        self.saved = (step, self.checkpoints.save(step, self.guard.checkpoint_health(step)))
        return self.saved[1]

    def _open_run_files(self) -> None:
        t = self.cfg.trainer
        if self.rank == 0:
            save_config(self.cfg, self.output_dir / "config.json")
        self.metrics = MetricsLogger(self.output_dir, enabled=self.rank == 0, tensorboard=t.tensorboard,
                                     progress=t.progress_bar, total=self.total_steps, start=self.start_step,
                                     stage=t.stage)

    def _write_together(self, what: str, write) -> None:
        """Run ``write`` (rank 0 writes files); a failed write (a full disk) ends every rank with
        one line naming the folder, not a traceback on one rank and a lost peer on the others."""
        error = None
        try:
            write()
        except OSError as exc:
            error = disk_error(self.output_dir, what, exc)
        runtime.raise_together(error, checkpoint.CheckpointError)

    def _finished(self) -> dict:
        """A rerun of a finished stage: nothing is trained and its folder stays byte-identical
        (config.json included); the flags that differ from the finished run's are named."""
        t = self.cfg.trainer
        if self.rank == 0:
            logger.info("stage %s already finished at step %d/%d in %s; nothing to do (use a new "
                        "--trainer.output_dir or raise --trainer.max_steps to train further)",
                        t.stage, self.start_step, self.total_steps, self.output_dir)
            try:
                saved = json.loads((self.output_dir / "config.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                saved = None
            changes = config_differences(saved, self.cfg) if isinstance(saved, dict) else []
            if changes:
                logger.warning("these flags differ from the finished run's config.json and were not applied "
                               "(the folder is left as it was): %s", "; ".join(changes))
        if t.export_hf and not checkpoint.export_complete(self.output_dir):
            self.checkpoints.export_final()  # the run died between its last checkpoint and the export's end
        return {"finished": True, "step": self.start_step}

    def _stop_if_asked(self, step: int) -> None:
        """At the boundary before ``step``: when any rank got SIGTERM/SIGINT (or lost its
        launcher), every rank saves a checkpoint here (``--trainer.save_on_signal``) and stops."""
        signum = self.stop.stop_now()
        if not signum:
            return
        import signal

        name = signal.Signals(signum).name
        saved = ""
        if self.saved[0] == step:  # a save_every checkpoint was just written at this step
            saved = f"; saved {self.saved[1]}"
        elif self.cfg.trainer.save_on_signal and step > self.start_step:
            saved = f"; saved {self.save(step)}"
        elif step > 0 and checkpoint.latest_checkpoint(self.output_dir) is not None:
            saved = f"; the latest checkpoint is {checkpoint.latest_checkpoint(self.output_dir)}"
        raise StopRequested(
            f"stopped by {name} at step {step}/{self.total_steps} of the {self.cfg.trainer.stage} stage in "
            f"{self.output_dir}{saved}; rerun the same command (--trainer.resume auto) to continue from there",
            signum)

    def param_digests(self) -> dict:
        """``digest/<role>``: a sum over every weight of each role (which models moved)."""
        return {f"digest/{name}": self.engine.param_digest(engine)
                for name, engine in self.engine.models.items() if name != "teacher"}
