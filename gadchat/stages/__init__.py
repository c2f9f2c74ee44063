"""The stage registry: stage name -> recipe (roles, defaults, step), step folder and launcher.

Adding a stage: write its recipe (a :class:`gadchat.stages.base.Recipe`), give it a step folder
``training/<step_folder>/`` (``main.py`` calling ``gadchat.cli.main_for(NAME)`` and the
deployment scripts), and list it here (docs/adding_a_stage.md). The configuration,
``training/launch.sh``, the pipeline, the known-teacher benchmark, the bad-input table, the stage
parity and phase benchmarks and the tests read the stages from this registry; a stage that starts
from another's export declares it (``init_from_stage``).
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


def handoff_chain(name: str) -> list:
    """``name`` after the stages it starts from, in the order they run: each stage's
    ``init_from_stage`` first (``gad`` -> ``["warmup", "gad"]``)."""
    chain = [recipe(name).name]
    while recipe(chain[0]).init_from_stage:
        chain.insert(0, recipe(chain[0]).init_from_stage)
    return chain


def step_main(name: str) -> Path:
    """``training/<step_folder>/main.py`` of a stage in this checkout."""
    return REPO / "training" / recipe(name).step_folder / "main.py"
