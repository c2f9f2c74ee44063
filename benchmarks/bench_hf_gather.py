"""Measurement 13: transformers generate on a ZeRO-3 actor, weights gathered once per call
(``rollout.hf_gather_weights``, the default) vs gathered per layer at every decoded token.

The GPU check (section 12) found generation taking 80% of a GAD step on an H200 with the per-layer
gathers. This runs the engine's own colocated ``HFBackend`` on a 2-rank ZeRO-3 actor (a
``HybridEngine`` holding the actor alone, ``builtin:small`` by default: Qwen2, 26M parameters) on
CPU, alternating the two settings over ``--reps`` calls after one warm-up call each, with the same
sampling seed, and checks that both produce the same tokens.

    python benchmarks/bench_hf_gather.py [--reps 3] [--prompts 8] [--n 4] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


GATHERED, PER_LAYER = "gathered once per call", "gathered per layer and token"


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--model", default="builtin:small")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--child-out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # the deepspeed launcher
    return parser.parse_args(argv)


def child(args) -> None:
    """One rank: build the ZeRO-3 actor, time both backends, rank 0 writes the result."""
    import torch

    from gadchat import roles, runtime
    from gadchat.config import GADConfig
    from gadchat.data import load_teacher_data
    from gadchat.engine import HybridEngine

    runtime.set_process_defaults()
    torch.set_num_threads(1)
    rank, _, world = runtime.init_distributed()
    cfg = GADConfig()
    cfg.model.actor_path = args.model
    cfg.rollout.backend = "hf"
    cfg.deepspeed.zero_stage = 3
    engine = HybridEngine(cfg, rank, world, {"actor": roles.actor()}, {"actor": args.model})
    rows, _ = load_teacher_data(cfg.data, engine.tokenizer)
    prompts = [row.prompt_ids for row in rows[rank * args.prompts:(rank + 1) * args.prompts]]
    backends = {}
    for gather, name in ((True, GATHERED), (False, PER_LAYER)):
        cfg.rollout.hf_gather_weights = gather
        backends[name] = engine.actor_generator()
    times = {name: [] for name in backends}
    tokens = {}

    def call(name):
        runtime.barrier()
        started = time.perf_counter()
        out = backends[name].generate(prompts, n=args.n, temperature=0.8, top_p=1.0,
                                      max_new_tokens=args.max_new_tokens, seed=1234)
        runtime.barrier()
        return time.perf_counter() - started, out

    for name in backends:  # warm-up call each
        call(name)
    for _ in range(args.reps):
        for name in backends:
            seconds, out = call(name)
            times[name].append(seconds)
            tokens[name] = out
    same = len({json.dumps(out) for out in tokens.values()}) == 1
    generated = sum(len(sample) for samples in next(iter(tokens.values())) for sample in samples)
    if rank == 0:
        Path(args.child_out).write_text(json.dumps({
            "times": times, "same_tokens": same, "tokens_per_rank": generated,
            "params_m": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                            for p in engine.actor.module.parameters()) / 1e6}))


def main(argv=None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.child_out:
        child(args)
        return
    out = Path(tempfile.mkdtemp()) / "result.json"
    env = common.bench_env()
    cmd = ["deepspeed", "--num_gpus", str(args.ranks), "--master_port", str(common.free_port()), __file__,
           *(sys.argv[1:] if argv is None else argv), "--child-out", str(out)]
    subprocess.run(cmd, check=True, env=env, cwd=common.ROOT)
    result = json.loads(out.read_text())
    rows = []
    for name, values in result["times"].items():
        seconds = common.median(values)
        rows.append([name, round(seconds, 2), result["tokens_per_rank"], round(result["tokens_per_rank"] / seconds)])
    speedup = common.median(result["times"][PER_LAYER]) / common.median(result["times"][GATHERED])
    common.save_result("13_hf_gather", {
        "title": "13. Transformers generate on a ZeRO-3 actor: weights gathered once per call vs per layer (issue 11)",
        "description": f"`{args.model}` ({result['params_m']:.1f}M parameters), {args.ranks} ranks ZeRO-3 (CPU, gloo, "
                       f"1 thread each), {args.prompts} prompts per rank x n={args.n} x up to {args.max_new_tokens} "
                       f"new tokens, T 0.8; the engine's colocated HFBackend, {args.reps} alternating reps after "
                       "one warm-up call each; seconds are medians.",
        "table": {"columns": ["actor weights", "seconds per rollout", "tokens per rank", "tokens/s per rank"],
                  "rows": rows},
        "notes": [f"Gathered once per call: {speedup:.2f}x faster; same tokens from both: {result['same_tokens']}."],
    }, command=common.command_line(__file__, argv))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
