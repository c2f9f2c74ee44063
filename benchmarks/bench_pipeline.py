"""Measurement 7: end-to-end wall time of the one-command pipeline's CPU default
(``python -m applications.run_pipeline``: tiny student, GAD warm-up then GAD stage under the
deepspeed launcher with two ranks, held-out evaluation), run as a subprocess from a clean output
folder. Peak RSS is the largest single process of the tree (``RUSAGE_CHILDREN``).

    python benchmarks/bench_pipeline.py [--reps 1] [-- extra run_pipeline flags]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=1, help="full pipeline runs (each takes minutes)")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    walls, rcs = [], []
    for rep in range(args.reps):
        with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
            argv_ = [common.MAIN_PYTHON, "-m", "applications.run_pipeline", "--output-dir", str(Path(tmp) / "out")] + extra
            log = Path(tmp) / "pipeline.log"
            started = time.perf_counter()
            with open(log, "w") as handle:
                rc = subprocess.run(argv_, cwd=common.ROOT, env=common.bench_env(), stdout=handle,
                                    stderr=subprocess.STDOUT).returncode
            walls.append(time.perf_counter() - started)
            rcs.append(rc)
            tail = log.read_text().splitlines()[-25:]
            print(f"rep {rep + 1}: rc={rc}, wall {walls[-1]:.1f}s\n" + "\n".join(tail), flush=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    wall = common.median(walls)
    ok = all(rc == 0 for rc in rcs)
    common.save_result("7_pipeline", {
        "title": "7. End to end: one-command pipeline, CPU default",
        "description": ("`python -m applications.run_pipeline` with no flags (tiny student, warm-up + GAD stages "
                        "under the deepspeed launcher, 2 ranks, held-out evaluation), from an empty output folder; "
                        f"median of {len(walls)} run(s)."),
        "table": {"columns": ["runs", "exit codes", "wall s (median)", "peak RSS of one process MiB"],
                  "rows": [[len(walls), ",".join(map(str, rcs)), wall, peak]]},
        "notes": [] if ok else ["A run failed: see the exit codes; the wall time is not a valid measurement."],
    }, command="python benchmarks/bench_pipeline.py" + (" " + " ".join(argv) if argv else ""))
    print(f"pipeline wall {wall:.1f}s (median of {len(walls)}), exit codes {rcs}, peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main(sys.argv[1:])
