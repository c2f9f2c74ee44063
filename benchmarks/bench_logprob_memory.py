"""Peak memory of one actor update on a Qwen2.5-shaped random model (issue 11 goal): before
(plain full-vocabulary log-probs, eval mode, no activation checkpointing: the engine until issue 11)
and after (training mode + gradient checkpointing + chunked log-probs), with each change alone.

One child process per (variant, micro-batch): build the model (vocab 151,936, hidden 896,
intermediate 4864, 14 heads, 2 KV heads, 2 layers, tied embeddings, fp32: 166M parameters), build a
micro-batch of B x T random tokens whose last ``--response-tokens`` positions are the response,
reset the kernel's peak-RSS counter (``/proc/self/clear_refs`` = 5), run the engine's own
``sequence_log_probs`` (the function ``HybridEngine.log_probs`` calls), a token-mean loss over the
response and ``backward()``, and report ``VmHWM - RSS before the update`` (so the model's own
weights are not counted; its gradients are). The chunked variants scale by the rollout temperature
(0.8, the new default); the plain ones do not (the engine before issue 11 did not).

Usage: python benchmarks/bench_logprob_memory.py [--shapes 1x2048,2x2048] [--skip-baseline-above-gib 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

def _default_chunk() -> int:
    from gadchat.config import ActorConfig

    return ActorConfig().logprob_chunk_tokens


def variants(extra_chunks=()) -> dict:
    """name -> (train mode + gradient checkpointing, logprob_chunk_tokens)."""
    chunk = _default_chunk()
    out = {
        "before: eval, no checkpointing, plain log-probs": (False, 0),
        "train mode + checkpointing only": (True, 0),
        f"chunked log-probs only (chunk {chunk})": (False, chunk),
        f"after: train + checkpointing + chunked (chunk {chunk})": (True, chunk),
    }
    for other in extra_chunks:
        if other != chunk:
            out[f"after, chunk {other}"] = (True, other)
    return out

QWEN25_SHAPE = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=2,
                    num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def child(checkpointing: bool, chunk: int, batch: int, tokens: int, response_tokens: int) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from gadchat.batch import SequenceBatch
    from gadchat.logprobs import sequence_log_probs

    torch.manual_seed(0)
    config = Qwen2Config(**QWEN25_SHAPE, max_position_embeddings=max(4096, tokens), use_cache=False)
    model = Qwen2ForCausalLM(config).float()
    params = sum(p.numel() for p in model.parameters())
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    else:
        model.eval()
    ids = torch.randint(0, config.vocab_size, (batch, tokens))
    prompt = tokens - response_tokens
    seq = SequenceBatch.build([row[:prompt].tolist() for row in ids], [row[prompt:].tolist() for row in ids], 0)
    mask = seq.target_mask
    rss_before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:  # reset VmHWM to the current RSS
        handle.write("5")
    started = time.perf_counter()
    # plain = the engine before issue 11 (no temperature scaling existed); chunked = the new default
    log_probs, _ = sequence_log_probs(model, model, seq, chunk, temperature=0.8 if chunk else 1.0)
    loss = -(log_probs * mask).sum() / mask.sum()
    loss.backward()
    seconds = time.perf_counter() - started
    peak = _status_kib("VmHWM")
    return {"params_m": params / 1e6, "rss_before_mib": rss_before / 1024, "peak_above_mib": (peak - rss_before) / 1024,
            "seconds": seconds, "loss": float(loss)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1x2048,2x2048", help="micro-batches BxT, comma-separated")
    parser.add_argument("--response-tokens", type=int, default=1536, help="response positions per row (the rest prompt)")
    parser.add_argument("--skip-baseline", default="", help="shapes (BxT) whose plain-path variants are not run")
    parser.add_argument("--extra-chunks", default="", help="more chunk sizes to run the 'after' variant with")
    parser.add_argument("--no-save", dest="save", action="store_false", help="print only, leave RESULTS.md alone")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    extra = [int(c) for c in args.extra_chunks.split(",") if c]
    VARIANTS = variants(extra)
    if args.child:
        name, shape = args.child.split("|")
        batch, tokens = map(int, shape.split("x"))
        checkpointing, chunk = VARIANTS[name]
        print(common.PREFIX + json.dumps(child(checkpointing, chunk, batch, tokens, args.response_tokens)), flush=True)
        return
    skip = {s for s in args.skip_baseline.split(",") if s}
    rows, measured = [], {}
    for shape in args.shapes.split(","):
        for name, (checkpointing, chunk) in VARIANTS.items():
            if shape in skip and chunk == 0:
                rows.append([shape, name, None, None, "not run (memory)"])
                continue
            command = [common.MAIN_PYTHON, __file__, "--child", f"{name}|{shape}",
                       "--response-tokens", str(args.response_tokens), "--extra-chunks", args.extra_chunks]
            out = subprocess.run(command, env=common.bench_env(), capture_output=True, text=True, cwd=common.ROOT)
            lines = [line for line in out.stdout.splitlines() if line.startswith(common.PREFIX)]
            if out.returncode != 0 or not lines:
                print(out.stdout[-3000:], out.stderr[-3000:], file=sys.stderr)
                rows.append([shape, name, None, None, f"failed (rc {out.returncode})"])
                continue
            result = json.loads(lines[-1][len(common.PREFIX):])
            measured[(shape, name)] = result
            print(shape, name, json.dumps(result), flush=True)
            rows.append([shape, name, round(result["peak_above_mib"]), round(result["seconds"], 1), ""])
    # each change's share of the saving, per shape
    notes = []
    names = list(VARIANTS)
    for shape in args.shapes.split(","):
        base = measured.get((shape, names[0]))
        after = measured.get((shape, names[3]))
        if base and after:
            saved = base["peak_above_mib"] - after["peak_above_mib"]
            parts = []
            for name in names[1:3]:
                alone = measured.get((shape, name))
                if alone:
                    parts.append(f"{name}: {base['peak_above_mib'] - alone['peak_above_mib']:.0f} MiB saved alone")
            notes.append(f"{shape}: before {base['peak_above_mib']:.0f} MiB, after {after['peak_above_mib']:.0f} MiB "
                         f"above the model's footprint, {base['peak_above_mib'] / after['peak_above_mib']:.2f}x lower "
                         f"({saved:.0f} MiB saved; " + "; ".join(parts) + ")")
        elif after:
            notes.append(f"{shape}: after {after['peak_above_mib']:.0f} MiB above the model's footprint; the plain "
                         "(before) variants were not run here")
    any_result = next(iter(measured.values()), {})
    notes.append(f"model: {any_result.get('params_m', float('nan')):.0f}M parameters, RSS of the built model "
                 f"{any_result.get('rss_before_mib', float('nan')):.0f} MiB (not counted); its gradients are counted")
    notes.append(f"chunked = --actor.logprob_chunk_tokens (default {_default_chunk()}) over the {args.response_tokens} "
                 "response positions of each row; plain = --actor.logprob_chunk_tokens 0 (full [B, T, V] logits, "
                 "all positions)")
    result = {
        "title": "9. Peak memory of one actor update, Qwen2.5-shaped model (issue 11)",
        "description": ("Peak RSS above the built model of forward + log-probs + token-mean loss + backward on a "
                        "random Qwen2.5-0.5B-shaped model cut to 2 layers (vocab 151,936, hidden 896, tied, fp32), "
                        "one process per row, 1 thread. `before` is the engine until issue 11 (models left in eval "
                        "mode, so gradient checkpointing never ran; full-vocabulary fp32 log-probs)."),
        "table": {"columns": ["micro-batch", "variant", "peak above model MiB", "update s", "note"], "rows": rows},
        "notes": notes,
    }
    if args.save:
        print(f"saved {common.save_result('9_logprob_memory', result, common.command_line(__file__, argv))}")
    else:
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
