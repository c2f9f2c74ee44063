"""A stage's configuration: the schema, parsing and ranges of :mod:`gadchat.config`, plus what the
stage layer adds: the chosen stage's published defaults (applied before the YAML and the flags),
its name checked against the registry, the learning rates of the roles it trains, and its own rules
(:meth:`gadchat.stages.base.Recipe.config_problems`)."""

from __future__ import annotations

from gadchat import config
from gadchat.config import GADConfig
from gadchat.stages import RECIPES


def stage_defaults(name: str) -> dict:
    """The published per-stage values of ``name`` (empty for an unknown name: refused by :func:`validate`)."""
    return RECIPES[name].defaults if name in RECIPES else {}


def stage_problems(cfg: GADConfig) -> list:
    """Pure: every problem of ``cfg`` as ``--flag must ...`` texts, the value ranges and the stage's rules."""
    recipe = RECIPES.get(cfg.trainer.stage)
    if recipe is None:
        return [f"--trainer.stage must be one of {', '.join(RECIPES)}, got {cfg.trainer.stage!r}",
                *config.value_problems(cfg, ())]
    trained = {role.optimizer_section for role in recipe.roles(cfg).values() if role.trains}
    return config.value_problems(cfg, trained) + recipe.config_problems(cfg) + lora_stage_problems(cfg, trained)


def lora_stage_problems(cfg: GADConfig, trained: set) -> list:
    """Pure: LoRA settings no stage can honour. Every stage starts a fresh adapter on the model it
    starts from, so a previous stage's optimizer state cannot carry over (a stage's own LoRA rules
    are in its recipe's ``config_problems``)."""
    lora = [name for name in sorted(trained) if getattr(cfg, name).lora_rank > 0]
    problems = []
    if lora and cfg.trainer.init_optimizer_states:
        problems.append(f"--trainer.init_optimizer_states must be false with --{lora[0]}.lora_rank "
                        f"{getattr(cfg, lora[0]).lora_rank}: a stage starts a fresh adapter on the previous stage's "
                        "merged export, whose optimizer state belongs to other parameters")
    return problems


def validate(cfg: GADConfig) -> GADConfig:
    """Every value with a range or a choice and the stage's rules, checked before anything is built;
    the error lists all problems on one line, each naming its flag."""
    problems = stage_problems(cfg)
    if problems:
        raise ValueError("invalid configuration: " + "; ".join(problems))
    return cfg


def build_parser(description: str = "GAD-Chat training", stage: str | None = None):
    """Every field as ``--section.field``, its default the stage's published one where it has one."""
    defaults = None
    if stage:
        defaults = config.apply_overrides(GADConfig(), stage_defaults(stage), f"stage defaults ({stage})")
    return config.build_parser(description, defaults)


def load_config(argv=None, stage: str | None = None, description: str = "GAD-Chat training") -> GADConfig:
    """Defaults, then the stage's published defaults, then ``--config`` YAML, then flags; validated."""
    return validate(config.parse_config(argv, stage, build_parser(description, stage), stage_defaults))
