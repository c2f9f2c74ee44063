"""The models a stage works with, declared by name: a stage recipe lists the roles it needs and
whether each trains; the hybrid engine builds, checkpoints and exports exactly those.

=================  ===============  ==========================================================
role               model            weights come from
=================  ===============  ==========================================================
``actor``          causal LM        ``trainer.init_from``'s final actor, else ``model.actor_path``
``reference``      causal LM        the actor's starting weights (frozen: the KL anchor)
``discriminator``  score head       ``init_from``'s final discriminator, else
                                    ``model.discriminator_path``, else the actor's start
``teacher``        causal LM        ``model.teacher_path`` (a teacher we hold: white-box)
=================  ===============  ==========================================================

A trained role gets an AdamW optimizer from its config section (``actor`` or ``discriminator``)
and is saved in every checkpoint; a frozen role is rebuilt from its source at every start. The
``exported`` roles are written to ``output_dir/final/<role>`` as Hugging Face folders (the next
stage's ``init_from``).
"""

from __future__ import annotations

from dataclasses import dataclass

CAUSAL_LM, SCORER = "causal_lm", "scorer"
ROLE_NAMES = ("actor", "reference", "discriminator", "teacher")


@dataclass(frozen=True)
class Role:
    """One model of a stage: its name, what kind of model it is, and whether it trains."""

    name: str
    kind: str
    trains: bool
    exported: bool
    optimizer_section: str = ""
    """The config section with this role's lr, betas, weight decay and grad clip (trained roles)."""

    def __post_init__(self):
        if self.name not in ROLE_NAMES:
            raise ValueError(f"unknown role {self.name!r} (roles: {', '.join(ROLE_NAMES)})")
        if self.trains and not self.optimizer_section:
            raise ValueError(f"role {self.name!r} trains but names no optimizer section")


def actor() -> Role:
    return Role("actor", CAUSAL_LM, trains=True, exported=True, optimizer_section="actor")


def reference() -> Role:
    return Role("reference", CAUSAL_LM, trains=False, exported=False, optimizer_section="actor")


def discriminator(trains: bool = True, kind: str = SCORER) -> Role:
    """The paper's discriminator (a score head, ``SCORER``) or, with ``kind=CAUSAL_LM``, the
    likelihood-ratio discriminator of the gad_lr stage (a language model ``q`` scored against a baseline)."""
    return Role("discriminator", kind, trains=trains, exported=True, optimizer_section="discriminator")


def teacher() -> Role:
    return Role("teacher", CAUSAL_LM, trains=False, exported=False)


def role_sources(roles: dict, cfg, handoff: dict) -> dict:
    """``{role: model folder or hub id}`` for ``roles``; ``handoff`` holds the previous stage's
    exported folders by role (``trainer.init_from``), which win over the configured paths."""
    m = cfg.model
    start = handoff.get("actor") or m.actor_path
    if "discriminator" in roles and handoff.get("discriminator") and \
            exported_kind(handoff["discriminator"]) != roles["discriminator"].kind:
        handoff = {k: v for k, v in handoff.items() if k != "discriminator"}  # a score head cannot start a q, nor back
    sources = {"actor": start, "reference": start,
               "discriminator": handoff.get("discriminator") or m.discriminator_path or start,
               "teacher": m.teacher_path}
    missing = [name for name in roles if not sources[name]]
    if missing:
        raise ValueError(f"the {' and '.join(missing)} role needs a model: --model.{missing[0]}_path is empty")
    return {name: sources[name] for name in roles}


def exported_kind(folder: str) -> str:
    """``CAUSAL_LM`` or ``SCORER``: what an exported role folder holds, from its config's architectures."""
    import json
    from pathlib import Path

    try:
        architectures = json.loads((Path(folder) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return SCORER
    return CAUSAL_LM if any(name.endswith("ForCausalLM") for name in architectures) else SCORER
