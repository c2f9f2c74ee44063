"""Entry points shared by the step folders and the ``gadchat-train`` console script (parse the
configuration, run one stage) and the tools' argparse helpers."""

from __future__ import annotations

import argparse
import os
import sys


def bounded(kind, low, strict=False):
    """An argparse type: ``kind`` values >= low (> low when ``strict``), refused naming the bound."""
    def parse(text):
        value = kind(text)
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def prog(module: str, script: str) -> str:
    """A tool's name for its usage line: the console script's name (``script``) when it was run as
    that, else ``python -m module``."""
    return script if os.path.basename(sys.argv[0]) == script else f"python -m {module}"


def known_stages() -> dict:
    """The stages ``gadchat-train`` runs, ``{name: one-line summary}`` in pipeline order, from the
    stage registry (:mod:`gadchat.stages`)."""
    from gadchat.stages import RECIPES

    return {name: recipe.summary for name, recipe in RECIPES.items()}


def stage_description(stage: str) -> str:
    summary = known_stages().get(stage, "")
    return f"GAD-Chat {stage} stage" + (f": {summary}." if summary else "")


def run_stage(stage: str, argv=None) -> dict:
    from gadchat import runtime

    runtime.set_process_defaults()
    from gadchat.stages.configure import load_config
    from gadchat.trainer import StageTrainer

    cfg = load_config(argv, stage=stage, description=stage_description(stage)).check_paths()
    result = StageTrainer(cfg).run()  # the trainer holds the output folder's lock until it returns
    # Leave together (e.g. after the short "already finished" path right after a checkpoint load)
    # and close the process group.
    runtime.finish()
    return result


def main_for(stage: str, argv=None) -> None:
    """Run ``stage`` with the flags ``argv`` (default: the command line) and end the process:
    configuration, data and checkpoint errors exit 2 with one line, a diverged run exits 3, a
    stop signal exits 128+N after its checkpoint. Every exit goes through
    :func:`runtime.exit_process` (no interpreter teardown, where a finished gloo rank can abort)."""
    import traceback

    from gadchat import runtime
    from gadchat.checkpoint import CheckpointError
    from gadchat.nonfinite import NonFiniteError
    from gadchat.run_lock import FolderBusyError
    from gadchat.stop_signal import StopRequested

    code = 0
    try:
        run_stage(stage, argv)
    except StopRequested as exc:
        # SIGTERM/SIGINT: every rank stopped at the same step boundary (checkpoint saved there).
        say(f"stopped: {exc}")
        code = exc.exit_code
    except NonFiniteError as exc:
        # Training diverged: the step, the model and the quantity; nothing was saved over the last checkpoint.
        say(f"error: {exc}")
        code = 3
    except (ValueError, FileNotFoundError, CheckpointError, FolderBusyError) as exc:
        # Configuration, data and checkpoint problems: one clear line naming the culprit.
        say(f"error: {exc}")
        code = 2
    except SystemExit as exc:  # argparse: --help (0) or a bad flag (2, its message already printed)
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:  # sys.exit("message"): the message, exit 1 (as Python does)
            say(str(exc.code))
            code = 1
    except BaseException:  # a bug: the traceback, as an uncaught exception would print it
        traceback.print_exc()
        code = 1
    runtime.exit_process(code)


def say(line: str) -> None:
    """One line to stderr in a single write: the ranks share the launcher's pipe, and a line written
    in one call under the pipe's atomic size is never interleaved with another rank's."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


TRAIN_PROG = "gadchat-train"


def _is_local_rank(token: str) -> bool:
    return token.split("=", 1)[0] in ("--local_rank", "--local-rank")


def split_launcher_args(argv: list) -> tuple:
    """``(launcher_args, rest)``: the ``--local_rank=N`` (or ``--local_rank N``, ``--local-rank``)
    that a launcher puts before the script's own arguments (the ``deepspeed`` launcher does, unless
    ``--no_local_rank``), and what follows them. The stage is the first word of ``rest``."""
    launcher, position = [], 0
    while position < len(argv) and _is_local_rank(argv[position]):
        takes_value = "=" not in argv[position] and position + 1 < len(argv)
        launcher += argv[position : position + 1 + takes_value]
        position += 1 + takes_value
    return launcher, list(argv[position:])


def train_usage() -> str:
    stages = known_stages()
    width = max(map(len, stages), default=0)
    listed = "\n".join(f"  {name:<{width}}  {summary}".rstrip() for name, summary in stages.items())
    return (
        f"usage: {TRAIN_PROG} STAGE [--config FILE] [--section.field VALUE ...]\n\n"
        "Run one GAD-Chat training stage in this process. Under a launcher every rank runs it, e.g.\n"
        f"  deepspeed --num_gpus 2 $(which {TRAIN_PROG}) gad --trainer.init_from outputs/warmup\n\n"
        f"stages:\n{listed}\n\n"
        f"`{TRAIN_PROG} STAGE --help` lists every flag of the stage with its doc and default.\n"
    )


def train_main(argv=None) -> int:
    """``gadchat-train STAGE [--section.field VALUE ...]``: one stage, in this process."""
    argv = list(sys.argv[1:] if argv is None else argv)
    launcher, rest = split_launcher_args(argv)
    if not rest or rest[0] in ("-h", "--help"):
        if rest:
            print(train_usage(), end="")
            return 0
        print(train_usage(), end="", file=sys.stderr)
        print(f"{TRAIN_PROG}: error: name a stage ({', '.join(known_stages())})", file=sys.stderr)
        return 2
    stage, flags = rest[0], rest[1:]
    if stage not in known_stages():
        print(f"usage: {TRAIN_PROG} STAGE [--section.field VALUE ...]", file=sys.stderr)
        print(f"{TRAIN_PROG}: error: unknown stage {stage!r} (known: {', '.join(known_stages())})", file=sys.stderr)
        return 2
    if "-h" in flags or "--help" in flags:
        from gadchat.stages.configure import build_parser

        parser = build_parser(stage_description(stage), stage)  # the parser load_config builds
        parser.prog = f"{TRAIN_PROG} {stage}"
        parser.print_help()
        return 0
    main_for(stage, flags + launcher)
    return 0
