"""The non-finite guard: a NaN/Inf loss or gradient norm stops a stage (nothing saved over the
last good checkpoint) or, with ``--trainer.on_nonfinite skip``, is counted where DeepSpeed
skipped that update.

"The last good checkpoint" it names is checked, not assumed: every checkpoint records whether its
weights were all finite (counted over every weight when it was saved) and whether its step's
metrics were, and the spike detector watches each loss, gradient norm and the trained models'
weight RMS: a value above ``--trainer.spike_threshold`` times the median of the previous steps
is logged as a warning, and a checkpoint saved at or after a spike that came shortly before the
NaN is not called good."""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque

from gadchat import checkpoint
from gadchat.metrics_log import nonfinite_metrics

logger = logging.getLogger("gadchat")


class NonFiniteError(RuntimeError):
    """A NaN/Inf loss or gradient norm; the message names the step, the model and the quantity."""


def owner_of(metric: str) -> str:
    """The role a metric belongs to (rewards and advantages come from the discriminator)."""
    return "discriminator" if metric.startswith(("discriminator/", "reward/", "advantage/")) else metric.split("/", 1)[0]


SPIKE_WINDOW = 20
"""Steps of history the spike detector compares with, and how recent a spike must be to disqualify
the checkpoints after it when a NaN comes."""


def watched(key: str) -> bool:
    """The metrics the spike detector watches: losses, gradient norms, weight RMS."""
    return key.endswith(("loss", "grad_norm", "weight_rms"))


class SpikeDetector:
    """A watched value above ``threshold`` times the median of its previous values (at least three,
    or one for the weight RMS, which moves slowly) is a spike; ``threshold`` 0 turns it off."""

    def __init__(self, threshold: float, window: int = SPIKE_WINDOW):
        self.threshold, self.window = threshold, window
        self.history: dict = {}
        self.spikes: list = []
        """``(step, text)`` of every spike seen in this run, oldest first."""

    def observe(self, step: int, metrics: dict) -> list:
        """The spikes of ``step`` as texts (and remembered); non-finite values are the guard's business."""
        found = []
        for key, value in sorted(metrics.items()):
            if not watched(key) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            past = self.history.setdefault(key, deque(maxlen=self.window))
            needed = 1 if key.endswith("weight_rms") else 3
            if self.threshold > 0 and len(past) >= needed:
                median = statistics.median(abs(v) for v in past)
                if median > 0 and abs(value) > self.threshold * median:
                    found.append(f"{key.replace('/', ' ', 1)} jumped to {value:.4g} at step {step} "
                                 f"({abs(value) / median:.3g}x the median {median:.4g} of the {len(past)} steps before)")
            past.append(float(value))
        self.spikes += [(step, text) for text in found]
        return found

    def recent(self, step: int) -> list:
        """The spikes of the last ``window`` steps before ``step``."""
        return [(s, text) for s, text in self.spikes if step - self.window <= s <= step]


class NonFiniteGuard:
    def __init__(self, engine, on_nonfinite: str, output_dir, rank: int, spike_threshold: float = 0.0):
        self.engine, self.skip_mode, self.output_dir, self.rank = engine, on_nonfinite == "skip", output_dir, rank
        self.spikes = SpikeDetector(spike_threshold)
        self.step_finite = True
        """Whether the last checked step's metrics were all finite (recorded in its checkpoint)."""

    def weight_health(self) -> dict:
        """``{role: {"rms", "nonfinite"}}`` of the trained models' weights, counted now (every rank
        must call it: ZeRO-3 sums over the shards)."""
        health = {}
        for name, engine in self.engine.trained_models().items():
            sums = self.engine.weight_sums(engine)
            health[name] = {"rms": math.sqrt(sums["sum_sq"] / max(sums["numel"], 1)), "nonfinite": sums["nonfinite"]}
        return health

    def checkpoint_health(self, step: int) -> dict:
        """What the step-``step`` checkpoint records (every rank must call it): whether every weight
        of the trained models is finite (counted now), whether the step's metrics were, and the
        spikes of the steps just before it."""
        weights = self.weight_health()
        return {"weights_finite": all(h["nonfinite"] == 0 for h in weights.values()),
                "metrics_finite": self.step_finite,
                "spikes": [text for _, text in self.spikes.recent(step)],
                "weight_rms": {name: h["rms"] for name, h in weights.items()}}

    def start(self, step: int) -> None:
        """The weights' RMS before the first step, as the spike detector's first reference."""
        self.spikes.observe(step, {f"{name}/weight_rms": h["rms"] for name, h in self.weight_health().items()})

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
        for name, health in self.weight_health().items():
            metrics[f"{name}/weight_rms"] = float("nan") if health["nonfinite"] else health["rms"]
        bad = nonfinite_metrics(metrics)
        self.step_finite = not bad
        for text in self.spikes.observe(step, metrics):
            if self.rank == 0:
                logger.warning("spike: %s", text)
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
            f"step {step}: non-finite {what}; {self._reason(harmed)}stopping without saving; "
            f"{self._last_good(step)}. Lower --actor.lr / --discriminator.lr or the grad clip"
            + ("" if self.skip_mode else ", or pass --trainer.on_nonfinite skip to skip such steps"))

    def from_sampler(self, step: int, exc: RuntimeError) -> NonFiniteError:
        """The error for a step that raised on NaN/Inf values (e.g. transformers' sampler)."""
        return NonFiniteError(
            f"step {step + 1}: non-finite values in the actor or discriminator outputs "
            f"({str(exc).splitlines()[0][:200]}); stopping without saving; {self._last_good(step + 1)}. Lower --actor.lr / --discriminator.lr or the grad clip")

    def _reason(self, harmed: list) -> str:
        if not self.skip_mode:
            return ""
        return f"the {' and '.join(harmed)} update was applied and cannot be undone, " if harmed else "no update was skipped, "

    def _last_good(self, step: int) -> str:
        """Which checkpoint to go back to: the newest whose recorded weights and step metrics were
        finite, saved before any spike of the steps just before ``step``; with the spikes named."""
        recent = self.spikes.recent(step)
        before = recent[0][0] if recent else None
        good = checkpoint.last_good_checkpoint(self.output_dir, before_step=before)
        text = f"the last good checkpoint is {good if good is not None else 'none (start over from the initial models)'}"
        if recent:
            text += f" (before the spike: {recent[0][1]})"
        return text
