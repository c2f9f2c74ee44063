"""The stage loop: whatever stage runs (its recipe in :mod:`gadchat.stages`), build the roles it
declares, load the teacher data, resume, run ``recipe.step`` step after step with the non-finite
guard, checkpoint, export.

Token-means inside a step are taken over the rank's whole batch (each micro-batch contributes its
share), and DeepSpeed averages the gradients over the ranks.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from gadchat import checkpoint, roles, runtime
from gadchat.config import GADConfig, save_config
from gadchat.data import PromptSchedule, load_teacher_data
from gadchat.engine import HybridEngine
from gadchat.metrics_log import MetricsLogger
from gadchat.nonfinite import NonFiniteGuard
from gadchat.stages import recipe
from gadchat.stages.base import StageContext, StepResult, stage_seed

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
        # Before anything is built or written: refuse to start over a run unless --trainer.overwrite.
        self.clear_output_dir = checkpoint.check_output_dir(cfg)
        stage_roles = self.recipe.roles(cfg)
        sources = roles.role_sources(stage_roles, cfg, checkpoint.handoff_paths(cfg, stage_roles))
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
        self.checkpoints = checkpoint.CheckpointManager(cfg, self.engine, self.rank, self.world_size,
                                                        num_rows=len(self.examples), total_steps=self.total_steps)
        self.guard = NonFiniteGuard(self.engine, cfg.trainer.on_nonfinite, self.output_dir, self.rank)
        self.context = StageContext(cfg, self.engine, self.tokenizer, self.rank, self.world_size)
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
        cfg, t = self.cfg, self.cfg.trainer
        if self.rank == 0:
            if self.clear_output_dir:
                logger.warning("--trainer.overwrite: removing the previous run in %s", self.output_dir)
                checkpoint.clear_previous_run(self.output_dir)
            self.output_dir.mkdir(parents=True, exist_ok=True)
        runtime.barrier()
        self.start_step = self.checkpoints.maybe_resume()
        if self.rank == 0:  # only once the resume was accepted: a refused one leaves config.json alone
            save_config(cfg, self.output_dir / "config.json")
        self.metrics = MetricsLogger(self.output_dir, enabled=self.rank == 0, tensorboard=t.tensorboard,
                                     progress=t.progress_bar, total=self.total_steps, start=self.start_step,
                                     stage=t.stage)
        if self.start_step >= self.total_steps:
            if self.rank == 0:
                logger.info("stage %s already finished at step %d/%d in %s; nothing to do (use a new "
                            "--trainer.output_dir or raise --trainer.max_steps to train further)",
                            t.stage, self.start_step, self.total_steps, self.output_dir)
            if t.export_hf and not checkpoint.export_complete(self.output_dir):
                self.checkpoints.export_final()  # the run died between its last checkpoint and the export's end
            self.metrics.close()
            return {"finished": True, "step": self.start_step}
        if t.log_param_digest and self.start_step == 0:
            self.metrics.log(0, self.param_digests(), advance=False)
        last = {}
        for step in range(self.start_step, self.total_steps):
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
                self.metrics.log(step + 1, metrics)
            else:
                self.metrics.advance()
            if t.save_every and (step + 1) % t.save_every == 0 and step + 1 < self.total_steps:
                self.checkpoints.save(step + 1)
        self.checkpoints.save(self.total_steps)
        if t.export_hf:
            self.checkpoints.export_final()
        self.metrics.close()
        return last

    def param_digests(self) -> dict:
        """``digest/<role>``: a sum over every weight of each role (which models moved)."""
        return {f"digest/{name}": self.engine.param_digest(engine)
                for name, engine in self.engine.models.items() if name != "teacher"}
