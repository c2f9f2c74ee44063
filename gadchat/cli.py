"""Entry points shared by the step folders (parse the configuration, run one stage) and the tools' argparse helpers."""

from __future__ import annotations

import argparse
import sys

from gadchat import runtime


def bounded(kind, low, strict=False):
    """An argparse type: ``kind`` values >= low (> low when ``strict``), refused naming the bound."""
    def parse(text):
        value = kind(text)
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def run_stage(stage: str, argv=None) -> dict:
    runtime.set_process_defaults()
    from gadchat.config import load_config
    from gadchat.trainer import StageTrainer

    cfg = load_config(argv, stage=stage, description=f"GAD-Chat {stage} stage").check_paths()
    return StageTrainer(cfg).run()


def main_for(stage: str) -> None:
    from gadchat.checkpoint import CheckpointError
    from gadchat.trainer import NonFiniteError

    try:
        run_stage(stage)
    except NonFiniteError as exc:
        # Training diverged: the step, the model and the quantity; nothing was saved over the last checkpoint.
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(3)
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        # Configuration, data and checkpoint problems: one clear line naming the culprit.
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
