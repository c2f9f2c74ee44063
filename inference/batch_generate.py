"""Generate answers for a file of prompts with an exported actor, a training output dir or a hub model.

    python -m inference.batch_generate --model outputs/gad/final/actor --prompts data/alpaca_eval_gpt4o/test.jsonl \
        --output generations.jsonl [--n 4 --temperature 0.8] [--prompt-key instruction]

Prompts: JSON lines / JSON / parquet / datasets folder / hf:NAME, the field ``--prompt-key``
(default ``content``) holding chat messages or a string. One output line per prompt:
``{"row", "source", "line", "prompt": messages, "generations": [n texts], "finish_reasons": [...],
"num_tokens": [...]}`` (plus ``teacher_response`` when the input has one). Greedy by default.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from gadchat.cli import prog
from gadchat.data import DataError
from gadchat.generation import BACKENDS, GenerationSettings, Generator
from gadchat.teacher.prompts import load_prompt_rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog=prog("inference.batch_generate", "gadchat-generate"), description="Batch generation from a prompts file.")
    parser.add_argument("--model", required=True, help="model folder, training output dir, or hub id")
    parser.add_argument("--prompts", required=True, help="JSON lines / parquet / datasets folder / hf:NAME (comma-separated)")
    parser.add_argument("--output", required=True, help="output JSON-lines file")
    parser.add_argument("--prompt-key", default="content", help="field with chat messages or a prompt string")
    parser.add_argument("--response-key", default="teacher_response", help="copied to the output when present")
    parser.add_argument("--split", default="train", help="split for datasets inputs")
    parser.add_argument("--system-prompt", default="", help="prepended as a system turn to prompts that have none")
    parser.add_argument("--limit", type=int, default=0, help="only the first N prompts (0 = all)")
    parser.add_argument("--n", type=int, default=1, help="samples per prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="auto = vllm where installed, else hf")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None, help="vLLM context length")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per transformers generate call")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rows = load_prompt_rows(args.prompts, args.prompt_key, args.system_prompt, args.split)
    except (DataError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.limit:
        rows = rows[: args.limit]
    if not rows:
        print(f"error: no prompts in {args.prompts}", file=sys.stderr)
        return 2
    generator = Generator(args.model, backend=args.backend, dtype=args.dtype, max_model_len=args.max_model_len,
                          seed=args.seed, batch_size=args.batch_size)
    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.n, args.seed)
    started = time.time()
    results = generator.generate([row.messages for row in rows], settings, progress=True)
    seconds = time.time() - started
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    new_tokens = 0
    with open(partial, "w", encoding="utf-8") as handle:
        for row, group in zip(rows, results):
            record = {"row": row.index, "source": row.source, "line": row.line, "prompt": row.messages,
                      "generations": [c.text for c in group], "finish_reasons": [c.finish_reason for c in group],
                      "num_tokens": [c.num_tokens for c in group]}
            if isinstance(row.original.get(args.response_key), str):
                record[args.response_key] = row.original[args.response_key]
            new_tokens += sum(c.num_tokens for c in group)
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(partial, output)
    print(f"[batch_generate] {len(rows)} prompts x {args.n} samples, {new_tokens} new tokens in {seconds:.1f} s "
          f"({generator.backend.name}) -> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
