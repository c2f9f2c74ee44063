"""What a stage is: a recipe over declared roles.

A recipe names the roles it needs and whether each trains (:mod:`gadchat.roles`), its published
defaults, its configuration rules, the stage it starts from in the pipeline, and a ``step()`` that
reads top to bottom as the algorithm: plain loops over micro-batches calling the pure loss
functions of :mod:`gadchat.losses`. A step sees the running stage through a :class:`StageContext`
(engine, configuration, tokenizer, rank) and returns a :class:`StepResult`. The stage loop
(:class:`gadchat.trainer.StageTrainer`) builds, checkpoints and exports whatever roles the recipe
declares; nothing outside a recipe branches on a stage name. A new stage is a recipe file, a step
folder ``training/<step_folder>/`` and one line in :mod:`gadchat.stages` (the registry).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from gadchat import roles as role_kinds
from gadchat.data import eval_data_config, load_teacher_data


def stage_seed(seed: int, stage: str) -> int:
    """Seed of a stage's prompt order and rollout sampling, derived from ``(seed, stage)``: each
    stage counts its steps from 0, and with the bare seed the GAD stage would replay the warm-up's
    prompt order and sampling seeds step for step."""
    return zlib.crc32(f"{stage}:{int(seed)}".encode())


def rollout_seed(seed: int, stage: str, step: int, rank: int) -> int:
    """The sampling seed of one rank's rollout at ``step`` (a pure function: exact resume)."""
    return stage_seed(seed, stage) * 1_000_003 + step * 1009 + rank


@dataclass
class StepResult:
    """What one step of a recipe returns on this rank."""

    metrics: dict[str, float]
    """This rank's metrics (averaged over the ranks by the stage loop)."""
    tokens: float
    """Tokens this rank processed in the step (for the throughput)."""


class StageContext:
    """What a recipe's step may use of the running stage: the engine (its roles and rollout), the
    configuration, the tokenizer, this rank's place, the rollout seeds, the state it carries between
    steps and the held-out examples of the optional ROUGE-L evaluation (read on first use)."""

    def __init__(self, cfg, engine, tokenizer, rank: int = 0, world_size: int = 1, carried: dict | None = None):
        self.cfg, self.engine, self.tokenizer = cfg, engine, tokenizer
        self.rank, self.world_size = rank, world_size
        self.carried = {} if carried is None else carried
        """What a recipe carries from one step to the next on this rank (``gad_lr``'s replay history):
        tensors, lists and dicts, saved in every checkpoint and restored on resume."""
        self._eval_examples = None

    def rollout_seed(self, step: int) -> int:
        """This rank's sampling seed at ``step`` of the stage."""
        return rollout_seed(self.cfg.trainer.seed, self.cfg.trainer.stage, step, self.rank)

    @property
    def eval_examples(self) -> list:
        """The first ``trainer.eval_prompts`` held-out teacher examples: the held-out part of
        ``data.train_files`` under ``data.eval_split``, else ``data.eval_files``."""
        if self._eval_examples is None:
            data = self.cfg.data
            held_out = data.eval_split > 0
            self._eval_examples, _ = load_teacher_data(eval_data_config(data), self.tokenizer,
                                                       spec=None if held_out else data.eval_files,
                                                       max_rows=self.cfg.trainer.eval_prompts, part="eval")
        return self._eval_examples


class Recipe:
    name: str = ""
    """The stage's name: ``--trainer.stage``, ``training/launch.sh STAGE``, checkpoint states."""
    step_folder: str = ""
    """Its folder under ``training/`` (``main.py`` and the deployment scripts)."""
    summary: str = ""
    """One line for ``--help`` and the docs."""
    defaults: dict = {}
    """Published per-stage values that differ from the dataclass defaults: ``{section: {field: value}}``."""
    init_from_stage: str | None = None
    """The stage whose ``final/`` export this one starts from in the pipeline (``None``: from the
    configured model)."""
    teacher_model: str = ""
    """How the stage uses a teacher model (``--model.teacher_path``): ``""`` not at all,
    ``"optional"`` read only when one is given (the ``diag/`` metrics), ``"required"`` (it trains
    on the teacher's log-probs)."""

    def roles(self, cfg) -> dict:
        """``{name: Role}`` of the models this stage builds with ``cfg``."""
        raise NotImplementedError

    def frozen_roles(self, cfg) -> dict:
        """The frozen roles a stage adds to its trained ones: the reference when ``actor.kl_coef``
        > 0 (the k3 KL), the teacher as :attr:`teacher_model` says."""
        out = {"reference": role_kinds.reference()} if cfg.actor.kl_coef > 0 else {}
        if self.teacher_model == "required" or (self.teacher_model == "optional" and cfg.model.teacher_path):
            out["teacher"] = role_kinds.teacher()
        return out

    def uses_rollout(self, cfg) -> bool:
        """Whether the stage samples from the student (builds the rollout engine)."""
        return True

    def config_problems(self, cfg) -> list:
        """This stage's rules on ``cfg``, as ``--flag must ...`` texts (empty when it is fine)."""
        return []

    def step(self, ctx: StageContext, step: int, batch: list) -> StepResult:
        """One training step on this rank's ``batch`` of teacher examples."""
        raise NotImplementedError
