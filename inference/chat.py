"""Multi-turn chat with an exported actor, a training output dir (its final/actor) or a hub model.

    python -m inference.chat --model outputs/gad/final/actor [--temperature 0.7] [--system "..."]

Reads one user turn per line from stdin and keeps the conversation history. Commands: ``/reset``
clears the history, ``/exit`` (or end of input) quits. Answers stream token by token with the
transformers backend (the default here); with ``--backend vllm`` the whole answer prints at once.
"""

from __future__ import annotations

import argparse
import sys

from gadchat.cli import prog
from gadchat.generation import BACKENDS, GenerationSettings, Generator


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog=prog("inference.chat", "gadchat-chat"), description="Multi-turn chat with a model folder.")
    parser.add_argument("--model", required=True, help="model folder, training output dir, or hub id")
    parser.add_argument("--backend", default="hf", choices=BACKENDS, help="hf streams (default); vllm prints whole answers")
    parser.add_argument("--system", default="", help="system prompt for the conversation")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None, help="vLLM context length")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    generator = Generator(args.model, backend=args.backend, dtype=args.dtype, max_model_len=args.max_model_len,
                          seed=args.seed)
    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, 1, args.seed)
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    interactive = sys.stdin.isatty()
    print(f"[chat] {generator.model_path} ({generator.backend.name}). /reset clears the history, /exit quits.",
          file=sys.stderr, flush=True)
    turn = 0
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            history = list(start)
            print("[history cleared]", flush=True)
            continue
        history.append({"role": "user", "content": text})
        turn += 1
        print("assistant> ", end="", flush=True)
        settings.seed = args.seed + turn  # a sampled answer differs from turn to turn, reproducibly
        completion = generator.stream(history, settings, on_text=lambda piece: print(piece, end="", flush=True))
        print(flush=True)
        history.append({"role": "assistant", "content": completion.text})
        prompt_tokens = len(generator.prompt_ids(history[:-1]))
        print(f"[turn {turn}: {prompt_tokens} prompt tokens, {completion.num_tokens} new tokens, "
              f"finish_reason={completion.finish_reason}, history={len(history)} messages]", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
