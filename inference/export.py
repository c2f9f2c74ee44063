"""Export a training checkpoint to Hugging Face folders, offline and on CPU.

    python -m inference.export --checkpoint outputs/run --out exported/          # latest checkpoint
    python -m inference.export --checkpoint outputs/run/checkpoints/step_00000040 --out exported/ --which actor
    python -m inference.export --checkpoint outputs/seqkd --best-by eval/forward_nll --out best/ --as-init-from

Reads the DeepSpeed checkpoint (ZeRO 0-3; ZeRO-2/3 shards are consolidated to fp32 with DeepSpeed's
zero_to_fp32) and writes ``OUT/actor`` (AutoModelForCausalLM, loadable by vLLM) and ``OUT/discriminator``
(AutoModelForSequenceClassification with one label: the discriminator as a reward model whose
score equals the training score) with tokenizer and chat template. No GPU needed. Every file is
checked to hold only tensors and DeepSpeed's plain state before anything is unpickled (a crafted
checkpoint is refused, naming the file); each folder is written beside its target and renamed
once whole. The OUT folder is locked while it is written (one writer per folder: a stage still
running there, or another export, is refused naming its PID and host), and a checkpoint whose
weights hold NaN/Inf is refused naming the tensor.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gadchat.checkpoint import CheckpointError, latest_checkpoint, read_state
from gadchat.checkpoint_files import COMPLETE, best_checkpoint, write_atomic
from gadchat.hf_export import export_from_checkpoint
from gadchat.run_lock import FolderBusyError, FolderLock


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True, help="a stage's output dir, its checkpoints/ folder, or a step folder")
    parser.add_argument("--out", required=True, help="OUT/actor and OUT/discriminator are written")
    parser.add_argument("--which", default="both", choices=("actor", "discriminator", "both"), help="models to export")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="weights dtype")
    parser.add_argument("--best-by", default="", metavar="METRIC",
                        help="export the saved checkpoint of --checkpoint (a stage's output dir) whose logged METRIC "
                             "is lowest, e.g. eval/forward_nll (SFT's best point), instead of the latest")
    parser.add_argument("--as-init-from", action="store_true",
                        help="write OUT/final/<model> and its COMPLETE marker, so OUT can be a next stage's "
                             "--trainer.init_from")
    args = parser.parse_args(argv)
    try:
        if args.best_by:
            step_dir, step, value = best_checkpoint(args.checkpoint, args.best_by)
            print(f"[export] best {args.best_by} = {value:.6g} at step {step}: {step_dir}")
        else:
            step_dir = latest_checkpoint(args.checkpoint)
        if step_dir is None:
            raise CheckpointError(f"{args.checkpoint}: no checkpoint found (no 'latest' file or trainer_state.json)")
        out_root = Path(args.out) / "final" if args.as_init_from else Path(args.out)
        which = ["actor", "discriminator"] if args.which == "both" else [args.which]
        if args.which == "both" and not (step_dir / "discriminator").is_dir():
            which = ["actor"]  # SeqKD, or a frozen discriminator: nothing trained to export
        health = read_state(step_dir).get("health") or {}
        if health.get("weights_finite") is False or health.get("metrics_finite") is False:
            print(f"warning: {step_dir} was saved with non-finite weights or step metrics (its trainer_state.json)",
                  file=sys.stderr)
        for spike in health.get("spikes", []):
            print(f"warning: {step_dir} was saved after a spike: {spike}", file=sys.stderr)
        with FolderLock(Path(args.out), "an export"):
            for name in which:
                out = export_from_checkpoint(step_dir, out_root / name, which=name, dtype=args.dtype)
                print(f"[export] {name}: {step_dir} -> {out}")
            if args.as_init_from:
                write_atomic(out_root / COMPLETE, "\n".join(which) + "\n")
    except (CheckpointError, FolderBusyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
