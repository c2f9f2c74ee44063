"""What a stage is: a recipe over declared roles.

A recipe names the roles it needs and whether each trains (:mod:`gadchat.roles`), its published
defaults, its configuration rules, and a ``step()`` that reads top to bottom as the algorithm:
plain loops over micro-batches calling the pure loss functions of :mod:`gadchat.losses`. The stage
loop (:class:`gadchat.trainer.StageTrainer`) builds, checkpoints and exports whatever roles the
recipe declares; nothing outside a recipe branches on a stage name. A new stage is a recipe file,
a step folder ``training/<step_folder>/`` and one line in :mod:`gadchat.stages` (the registry).
"""

from __future__ import annotations


class Recipe:
    name: str = ""
    """The stage's name: ``--trainer.stage``, ``training/launch.sh STAGE``, checkpoint states."""
    step_folder: str = ""
    """Its folder under ``training/`` (``main.py`` and the deployment scripts)."""
    summary: str = ""
    """One line for ``--help`` and the docs."""
    defaults: dict = {}
    """Published per-stage values that differ from the dataclass defaults: ``{section: {field: value}}``."""

    def roles(self, cfg) -> dict:
        """``{name: Role}`` of the models this stage builds with ``cfg``."""
        raise NotImplementedError

    def uses_rollout(self, cfg) -> bool:
        """Whether the stage samples from the student (builds the rollout engine)."""
        return True

    def config_problems(self, cfg) -> list:
        """This stage's rules on ``cfg``, as ``--flag must ...`` texts (empty when it is fine)."""
        return []

    def step(self, run, step: int, batch: list) -> dict:
        """One training step on this rank's ``batch`` of teacher examples; returns this rank's
        metrics (``tokens`` = tokens processed, for the throughput)."""
        raise NotImplementedError
