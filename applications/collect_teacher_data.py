"""Collect teacher responses from any OpenAI-compatible chat endpoint (GAD's black-box teacher).

    OPENAI_API_KEY=... python -m applications.collect_teacher_data --prompts prompts.jsonl \
        --base-url https://api.openai.com/v1 --model gpt-4o --output teacher.jsonl

Output: JSON lines in the published layout (``content``, ``teacher_response``, ``teacher``,
``finish_reason``, plus the input row's other fields and a ``collection_key``), in the order the
answers arrive (not the input order; ``collection_key`` starts with the input row index). A rerun
with the same arguments resumes: answered prompts are skipped, a torn last line is dropped; a rerun
with another ``--model`` into the same output is refused (one file per teacher). Failed prompts,
empty answers included, are listed at the end and in ``<output>.failures.jsonl`` (exit status 1);
rerun to retry them. A 401/403 stops the run at once (exit status 2). Responses cut at max_tokens
go to ``<output>.dropped.jsonl`` with ``--drop-truncated``. The API key is read from the
environment variable named by ``--api-key-env`` and never printed or stored (error texts that echo
it show ``***``).
"""

from __future__ import annotations

import argparse
import sys

from gadchat.cli import bounded, prog
from gadchat.data import DataError
from gadchat.teacher.client import AuthenticationError, ChatEndpoint, SamplingSettings
from gadchat.teacher.collect import collect_teacher_data, prompt_token_counter, sidecar_paths
from gadchat.teacher.prompts import load_prompt_rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False, 
        prog=prog("applications.collect_teacher_data", "gadchat-collect"),
        description="Collect teacher responses from an OpenAI-compatible chat endpoint (resumable). Output rows "
                    "come in the order the answers arrive, not the input order.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = parser.add_argument_group("prompts")
    source.add_argument("--prompts", required=True,
                        help="JSON lines / JSON / parquet file or folder, a datasets save_to_disk folder, or hf:NAME "
                             "(comma-separate several)")
    source.add_argument("--prompt-key", default="content",
                        help="field holding the prompt: a list of chat messages or a string")
    source.add_argument("--split", default="train", help="split for datasets inputs")
    source.add_argument("--system-prompt", default="", help="prepended as a system turn to prompts that have none")
    source.add_argument("--skip-malformed", action="store_true", help="count and skip malformed rows instead of stopping")
    source.add_argument("--limit", type=bounded(int, 0), default=0, help="only the first N prompt rows (0 = all)")
    endpoint = parser.add_argument_group("endpoint")
    endpoint.add_argument("--base-url", required=True, help="e.g. https://api.openai.com/v1 or http://localhost:8000/v1")
    endpoint.add_argument("--model", required=True, help="teacher model name sent to the endpoint")
    endpoint.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    endpoint.add_argument("--concurrency", type=bounded(int, 1), default=8, help="requests in flight at once")
    endpoint.add_argument("--timeout", type=bounded(float, 0, strict=True), default=120.0,
                          help="per-request timeout in seconds")
    endpoint.add_argument("--max-retries", type=bounded(int, 0), default=6,
                          help="retries on 429 / 5xx / timeouts / connection errors (401/403 are never retried)")
    endpoint.add_argument("--backoff-base", type=bounded(float, 0), default=1.0, help="first backoff in seconds; doubles per retry")
    endpoint.add_argument("--backoff-max", type=bounded(float, 0), default=60.0, help="longest backoff in seconds")
    sampling = parser.add_argument_group("sampling (unset = the endpoint's default)")
    sampling.add_argument("--temperature", type=float, default=None, help="sampling temperature")
    sampling.add_argument("--top-p", type=float, default=None, help="nucleus sampling")
    sampling.add_argument("--max-tokens", type=bounded(int, 0), default=2048, help="0 = do not send max_tokens")
    sampling.add_argument("--seed", type=int, default=None, help="sampling seed, where the endpoint supports it")
    filters = parser.add_argument_group("filters")
    filters.add_argument("--drop-truncated", action="store_true",
                         help="do not keep responses with finish_reason == 'length' (they go to <output>.dropped.jsonl)")
    filters.add_argument("--tokenizer", default="", help="tokenizer folder or hub id for --max-prompt-tokens")
    filters.add_argument("--max-prompt-tokens", type=bounded(int, 0), default=0,
                         help="skip prompts longer than this (needs --tokenizer)")
    parser.add_argument("--output", required=True, help="output JSON-lines file (appended to; resumable; rows in order of arrival)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_prompt_tokens and not args.tokenizer:
        print("error: --max-prompt-tokens needs --tokenizer", file=sys.stderr)
        return 2
    try:
        rows = load_prompt_rows(args.prompts, args.prompt_key, args.system_prompt, args.split, args.skip_malformed)
        endpoint = ChatEndpoint(
            args.base_url,
            args.model,
            api_key_env=args.api_key_env,
            sampling=SamplingSettings(args.temperature, args.max_tokens or None, args.top_p, args.seed),
            timeout=args.timeout,
            max_retries=args.max_retries,
            backoff_base=args.backoff_base,
            backoff_max=args.backoff_max,
        )
    except (DataError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.limit:
        rows = rows[: args.limit]
    counter = prompt_token_counter(args.tokenizer) if args.max_prompt_tokens else None
    try:
        report = collect_teacher_data(
            rows,
            endpoint,
            args.output,
            concurrency=args.concurrency,
            drop_truncated=args.drop_truncated,
            count_prompt_tokens=counter,
            max_prompt_tokens=args.max_prompt_tokens,
            progress=not args.no_progress,
        )
    except (AuthenticationError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"[collect] {report.summary()}")
    print(f"[collect] output: {args.output}")
    if report.failed:
        failures_path, _ = sidecar_paths(args.output)
        print(f"[collect] {len(report.failed)} prompts failed (listed in {failures_path}; rerun to retry them):", file=sys.stderr)
        for failure in report.failed[:20]:
            print(f"  - {failure['error']}", file=sys.stderr)
        if len(report.failed) > 20:
            print(f"  ... and {len(report.failed) - 20} more", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
