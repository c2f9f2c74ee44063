"""The stage registry: stage name -> recipe (roles, defaults, step), step folder and launcher.

Adding a stage: write its recipe (a :class:`gadchat.stages.base.Recipe`), give it a step folder
``training/<step_folder>/`` (``main.py`` calling ``gadchat.cli.main_for(NAME)`` and the
deployment scripts), and list it here. The configuration, ``training/launch.sh``, the pipeline
and the tests read the stages from this registry.
"""

from __future__ import annotations

from pathlib import Path

from gadchat.stages.base import Recipe
from gadchat.stages.gad import GAD
from gadchat.stages.gad_lr import GADLikelihoodRatio
from gadchat.stages.opd import OPD
from gadchat.stages.seqkd import SeqKD
from gadchat.stages.spin import SPIN
from gadchat.stages.warmup import Warmup

RECIPES: dict = {recipe.name: recipe for recipe in (SeqKD(), Warmup(), GAD(), OPD(), GADLikelihoodRatio(), SPIN())}
STAGES = tuple(RECIPES)
REPO = Path(__file__).resolve().parents[2]


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown stage {name!r} (stages: {', '.join(RECIPES)})")
    return RECIPES[name]


def step_main(name: str) -> Path:
    """``training/<step_folder>/main.py`` of a stage in this checkout."""
    return REPO / "training" / recipe(name).step_folder / "main.py"
