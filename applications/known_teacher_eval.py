"""The known-teacher benchmark's teacher data and evaluation (used by :mod:`applications.known_teacher`,
a benchmark and the tests; the models themselves are :mod:`gadchat.known_teacher_models`).

- **Teacher data**: the teacher's samples (temperature 1, one per prompt) for the shipped train and
  held-out prompts, in the published layout (``content`` messages + ``teacher_response``). Samples
  that hit the token cap are dropped, never given an EOS they did not generate.
- **Evaluation**: each model's samples on the held-out prompts scored token by token under the
  teacher and the model itself, through the core's log-prob path
  (:func:`gadchat.logprobs.sequence_log_probs`, as the stages' teacher and reference roles).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from gadchat.known_teacher_models import SHIPPED, read_rows  # noqa: F401  (the benchmark's data, re-used here)


def sample_teacher_data(teacher: str, rows: list, out_path: Path, max_new_tokens: int, seed: int,
                        backend: str = "auto") -> dict:
    """Sample one teacher answer per row's prompt (temperature 1) and write the rows that ended with
    an EOS as ``{"content": messages, "teacher_response": text}`` JSON lines (atomically).
    Returns counts: ``prompts``, ``kept``, ``cut`` (hit ``max_new_tokens``: dropped)."""
    from gadchat.generation import GenerationSettings, Generator

    generator = Generator(teacher, backend=backend, seed=seed)
    try:
        import torch

        torch.manual_seed(seed)
        settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=1.0, n=1, seed=seed)
        completions = generator.generate([row["content"] for row in rows], settings)
    finally:
        generator.close()
    kept, cut = [], 0
    for row, group in zip(rows, completions):
        sample = group[0]
        if sample.finish_reason != "stop" or not sample.text.strip():
            cut += 1
            continue
        kept.append({"content": row["content"], "teacher_response": sample.text})
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in kept:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, out_path)
    return {"prompts": len(rows), "kept": len(kept), "cut": cut}


# ---------------------------------------------------------------------------------------------
# evaluation against the teacher


def load_scorer(path: str):
    """A causal LM in fp32 eval mode for scoring (no DeepSpeed: the models here are tiny)."""
    import torch
    from transformers import AutoModelForCausalLM

    from gadchat.models import resolve_model_path

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(path), dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


def response_log_probs(model, prompts: list, responses: list, pad_token_id: int, batch_size: int = 32):
    """``(log_probs, mask)``: per-token log-probs of each response given its prompt, ``[N, R]``
    right-padded to the longest response, and the mask of real response tokens. The log-probs are
    the core's (:func:`gadchat.logprobs.sequence_log_probs` on the model's raw logits), laid out by
    response position."""
    import torch

    from gadchat.batch import SequenceBatch
    from gadchat.logprobs import sequence_log_probs

    width = max(len(r) for r in responses)
    out = torch.zeros(len(responses), width)
    mask = torch.zeros(len(responses), width)
    # batches of similar lengths (less padding), every core (scoring runs after the stages, alone)
    order = sorted(range(len(responses)), key=lambda i: len(prompts[i]) + len(responses[i]))
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                p, r = [prompts[i] for i in rows], [responses[i] for i in rows]
                log_probs, _ = sequence_log_probs(model, model, SequenceBatch.build(p, r, pad_token_id), chunk_tokens=0)
                for row, index in enumerate(rows):
                    prompt, response = prompts[index], responses[index]
                    out[index, : len(response)] = log_probs[row, len(prompt) - 1 : len(prompt) - 1 + len(response)]
                    mask[index, : len(response)] = 1.0
    finally:
        torch.set_num_threads(threads)
    return out, mask


@dataclass
class HeldOut:
    """Held-out prompts and the teacher's samples for them (token ids and text)."""

    messages: list
    prompt_ids: list
    teacher_ids: list
    teacher_text: list


def held_out(data_file, tokenizer, limit: int = 0) -> HeldOut:
    """The first ``limit`` rows (0: all) of a teacher-data file, tokenized."""
    from gadchat.data import encode_prompt, encode_response

    rows = read_rows(data_file)[: limit or None]
    return HeldOut([r["content"] for r in rows], [encode_prompt(tokenizer, r["content"]) for r in rows],
                   [encode_response(tokenizer, r["teacher_response"]) for r in rows],
                   [r["teacher_response"] for r in rows])


def evaluate_against_teacher(models: dict, teacher: str, heldout: HeldOut, samples_per_prompt: int = 2,
                             max_new_tokens: int = 128, seed: int = 0, backend: str = "auto", log=print) -> dict:
    """The known-teacher metrics of each model (``name -> path``) on the held-out prompts.

    Per model: ``samples_per_prompt`` samples at temperature 1 and one greedy answer per prompt
    (vLLM where installed), scored token by token under the teacher and the model itself.
    Returns ``{name: {metric: value}}`` with ``teacher_nll`` and ``reverse_kl`` (student samples),
    ``greedy_teacher_nll``, ``forward_nll`` (the model's NLL of the teacher's held-out samples),
    ``length_ratio`` (sample length over the teacher's), ``eos_share``, ``distinct_2`` and
    ``rouge_l`` (greedy answer vs the teacher's sample, F1 x 100); see :mod:`gadchat.teacher_metrics`.
    """
    import torch

    from gadchat.generation import GenerationSettings, Generator

    teacher_model = load_scorer(teacher)
    results = {}
    teacher_lengths = [len(t) for t in heldout.teacher_ids]
    generator = None  # one engine for every model of the same shape (their weights loaded in place)
    try:
        for name, path in models.items():
            started = time.perf_counter()
            if generator is None or not generator.switch_model(path):
                if generator is not None:
                    generator.close()
                generator = Generator(path, backend=backend, seed=seed)
            torch.manual_seed(seed)
            sampled = generator.generate(heldout.messages, GenerationSettings(
                max_new_tokens=max_new_tokens, temperature=1.0, n=samples_per_prompt, seed=seed))
            greedy = generator.generate(heldout.messages, GenerationSettings(max_new_tokens=max_new_tokens))
            pad = generator.tokenizer.pad_token_id
            results[name] = _scores(path, teacher_model, heldout, sampled, greedy, pad, teacher_lengths)
            if log:
                log(f"[known-teacher] evaluated {name} in {time.perf_counter() - started:.0f} s: "
                    + ", ".join(f"{k}={v:.3f}" for k, v in results[name].items()))
    finally:
        if generator is not None:
            generator.close()
    return results


def _scores(path: str, teacher_model, heldout: HeldOut, sampled: list, greedy: list, pad: int,
            teacher_lengths: list) -> dict:
    """The metrics of one model's samples and greedy answers (see :func:`evaluate_against_teacher`)."""
    from gadchat import teacher_metrics as tm
    from gadchat.rouge import rouge_l_f1

    flat = [(i, c) for i, group in enumerate(sampled) for c in group]
    prompts = [heldout.prompt_ids[i] for i, _ in flat]
    responses = [list(c.token_ids) or [pad] for _, c in flat]
    greedy_responses = [list(g[0].token_ids) or [pad] for g in greedy]
    student = load_scorer(path)
    s_lp, mask = response_log_probs(student, prompts, responses, pad)
    t_lp, _ = response_log_probs(teacher_model, prompts, responses, pad)
    g_lp, g_mask = response_log_probs(teacher_model, heldout.prompt_ids, greedy_responses, pad)
    f_lp, f_mask = response_log_probs(student, heldout.prompt_ids, heldout.teacher_ids, pad)
    del student
    return {
        "teacher_nll": tm.teacher_nll_per_token(t_lp, mask),
        "reverse_kl": tm.reverse_kl_per_token(s_lp, t_lp, mask),
        "greedy_teacher_nll": tm.teacher_nll_per_token(g_lp, g_mask),
        "forward_nll": tm.forward_nll_per_token(f_lp, f_mask),
        "length_ratio": tm.length_ratio([len(r) for r in responses], teacher_lengths),
        "length": sum(len(r) for r in responses) / len(responses),
        "eos_share": tm.eos_share([c.finish_reason == "stop" for _, c in flat]),
        "distinct_2": tm.distinct_n(responses, 2),
        "rouge_l": 100 * sum(rouge_l_f1(g[0].text, ref) for g, ref in zip(greedy, heldout.teacher_text)) / len(greedy),
        "samples": len(flat),
    }
