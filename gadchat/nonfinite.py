"""The non-finite guard: a NaN/Inf loss or gradient norm stops a stage (nothing saved over the
last good checkpoint) or, with ``--trainer.on_nonfinite skip``, is counted where DeepSpeed
skipped that update."""

from __future__ import annotations

import logging

from gadchat import checkpoint
from gadchat.metrics_log import nonfinite_metrics

logger = logging.getLogger("gadchat")


class NonFiniteError(RuntimeError):
    """A NaN/Inf loss or gradient norm; the message names the step, the model and the quantity."""


def owner_of(metric: str) -> str:
    """The role a metric belongs to (rewards and advantages come from the discriminator)."""
    return "discriminator" if metric.startswith(("discriminator/", "reward/", "advantage/")) else metric.split("/", 1)[0]


class NonFiniteGuard:
    def __init__(self, engine, on_nonfinite: str, output_dir, rank: int):
        self.engine, self.skip_mode, self.output_dir, self.rank = engine, on_nonfinite == "skip", output_dir, rank

    def counters(self) -> dict:
        """``{role: (optimizer steps, steps DeepSpeed skipped)}`` of the trained roles, before a step."""
        return {name: (int(e.global_steps), int(getattr(e, "skipped_steps", 0)))
                for name, e in self.engine.trained_models().items()}

    def check(self, step: int, metrics: dict, before: dict, log_row) -> None:
        """Add each stepped role's gradient norm to ``metrics``, then check every value: a NaN/Inf
        loss or gradient norm raises :class:`NonFiniteError` (after ``log_row(step, metrics)``
        records the bad row) or, in skip mode, is counted in ``nonfinite/skipped_step`` when
        DeepSpeed skipped the update (ZeRO 1-3 skip a step whose gradient norm is not finite;
        ZeRO-0 cannot, so there it still stops)."""
        applied, skipped_by_deepspeed = set(), set()
        for name, (steps, skipped) in before.items():
            engine = self.engine.models[name]
            if int(engine.global_steps) == steps:
                continue  # no update this step (e.g. the actor before discriminator_warmup)
            norm = engine.get_global_grad_norm()
            if int(getattr(engine, "skipped_steps", 0)) > skipped:
                skipped_by_deepspeed.add(name)
                norm = float("inf") if norm is None else norm
            else:
                applied.add(name)
            if norm is not None:
                metrics[f"{name}/grad_norm"] = float(norm)
        bad = nonfinite_metrics(metrics)
        harmed = sorted({owner_of(key) for key in bad} & applied)  # roles whose non-finite update went through
        if self.skip_mode:
            metrics["nonfinite/skipped_step"] = float(bool(bad))
        if not bad:
            return
        what = ", ".join(f"{key.replace('/', ' ', 1)} = {value}" for key, value in sorted(bad.items()))
        if self.skip_mode and skipped_by_deepspeed and not harmed:
            if self.rank == 0:
                logger.warning("step %d: non-finite %s; DeepSpeed skipped the %s update (--trainer.on_nonfinite skip)",
                               step, what, " and ".join(sorted(skipped_by_deepspeed)))
            return
        log_row(step, metrics)  # the bad row (non-finite values written as null), for the record
        raise NonFiniteError(
            f"step {step}: non-finite {what}; {self._reason(harmed)}stopping without saving; the last good "
            f"checkpoint is {self._last_good()}. Lower --actor.lr / --discriminator.lr or the grad clip"
            + ("" if self.skip_mode else ", or pass --trainer.on_nonfinite skip to skip such steps"))

    def from_sampler(self, step: int, exc: RuntimeError) -> NonFiniteError:
        """The error for a step that raised on NaN/Inf values (e.g. transformers' sampler)."""
        return NonFiniteError(
            f"step {step + 1}: non-finite values in the actor or discriminator outputs "
            f"({str(exc).splitlines()[0][:200]}); stopping without saving; the last good checkpoint is "
            f"{self._last_good()}. Lower --actor.lr / --discriminator.lr or the grad clip")

    def _reason(self, harmed: list) -> str:
        if not self.skip_mode:
            return ""
        return f"the {' and '.join(harmed)} update was applied and cannot be undone, " if harmed else "no update was skipped, "

    def _last_good(self) -> str:
        last = checkpoint.latest_checkpoint(self.output_dir)
        return str(last) if last is not None else "none"
