"""A known teacher and student, built here, for measuring distillation exactly on a CPU.

The student side of every experiment stays black-box: it sees only the teacher's *text*, written in
the published data layout and read through the ordinary data path. Only the evaluation (and the
optional GAD-stage diagnostics) read the teacher's exact log-probabilities.

- **Teacher** (``builtin:kt-teacher``): a Qwen2 of hidden 256, 4 layers (about 3.4M parameters, 8x
  the student), trained deterministically (fixed steps, seed and batch order) on the shipped GPT-4o
  answers cut into paragraphs: for each training prompt, each paragraph of its answer (at most
  ``PARAGRAPH_TOKENS`` tokens, cut at a sentence end) is one ``prompt -> paragraph + EOS`` example.
  The teacher therefore answers a prompt with one paragraph and stops, so its samples end with an
  EOS and both sides of the discriminator see answers that really ended (EOS symmetry,
  docs/algorithm.md section 3.3).
- **Student** (``builtin:kt-student``): the ``builtin:tiny`` shape (hidden 128, 2 layers, 0.43M
  parameters) with a short generic start: a few LM steps on the same paragraphs paired with
  *other* prompts, so it writes English-like paragraphs and ends them, but has not learned the
  teacher's conditional behaviour.
- **Teacher data**: the teacher's samples (temperature 1, one per prompt) for the shipped train and
  held-out prompts, in the published layout (``content`` messages + ``teacher_response``). Samples
  that hit the token cap are dropped, never given an EOS they did not generate.

Everything is cached under ``$GADCHAT_CACHE`` (default ``~/.cache/gadchat``) by name and built once.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

# The repository's shipped teacher data (train.jsonl: 700 rows, test.jsonl: 105): this benchmark reads
# the repository's data folder, so it runs from a checkout (the project is installed editable).
SHIPPED = Path(__file__).resolve().parent.parent / "data" / "alpaca_eval_gpt4o"
PARAGRAPH_TOKENS = 64
MIN_PARAGRAPH_TOKENS = 6


@dataclass(frozen=True)
class LMRecipe:
    """Shape and training schedule of a model built here."""

    hidden_size: int
    num_layers: int
    intermediate_size: int
    steps: int
    lr: float
    tokens_per_batch: int = 4096
    num_heads: int = 4
    num_kv_heads: int = 2
    shuffle_prompts: bool = False
    """True: pair each paragraph with another row's prompt (a generic, prompt-blind start)."""
    seed: int = 0


TEACHER = LMRecipe(hidden_size=256, num_layers=4, intermediate_size=768, steps=360, lr=2e-3)
STUDENT = LMRecipe(hidden_size=128, num_layers=2, intermediate_size=256, steps=150, lr=2e-3, shuffle_prompts=True)
RECIPES = {"kt-teacher": TEACHER, "kt-student": STUDENT}


# ---------------------------------------------------------------------------------------------
# training text


def read_rows(path: Path) -> list:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


_SENTENCE_END = re.compile(r"(?<=[.!?:])\s+")


def paragraphs(answer: str, tokenizer, max_tokens: int = PARAGRAPH_TOKENS) -> list:
    """The answer's paragraphs (split on blank lines), each cut to the longest run of whole
    sentences that fits ``max_tokens``; paragraphs shorter than ``MIN_PARAGRAPH_TOKENS`` (headings)
    or whose first sentence alone is too long are left out."""
    out = []
    for block in answer.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        kept = ""
        for sentence in _SENTENCE_END.split(block):
            candidate = f"{kept} {sentence}".strip() if kept else sentence
            if len(tokenizer(candidate, add_special_tokens=False)["input_ids"]) > max_tokens:
                break
            kept = candidate
        if kept and len(tokenizer(kept, add_special_tokens=False)["input_ids"]) >= MIN_PARAGRAPH_TOKENS:
            out.append(kept)
    return out


def paragraph_examples(rows: list, tokenizer, shuffle_prompts: bool, seed: int) -> list:
    """``(prompt_ids, response_ids + [EOS])`` for every paragraph of every row's answer."""
    import torch

    from gadchat.data import encode_prompt, encode_response

    prompts = [encode_prompt(tokenizer, row["content"]) for row in rows]
    if shuffle_prompts:  # a derangement: each answer's paragraphs go with another row's prompt
        generator = torch.Generator().manual_seed(seed + 1)
        shift = 1 + int(torch.randint(len(rows) - 1, (1,), generator=generator))
        prompts = prompts[shift:] + prompts[:shift]
    examples = []
    for prompt_ids, row in zip(prompts, rows):
        for paragraph in paragraphs(row["teacher_response"], tokenizer):
            examples.append((prompt_ids, encode_response(tokenizer, paragraph)))
    return examples


def batches(examples: list, tokens_per_batch: int, seed: int, epoch: int) -> list:
    """A seeded shuffle of the examples, cut into batches of at most ``tokens_per_batch`` padded tokens."""
    import torch

    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    out, current, width = [], [], 0
    for index in order:
        length = len(examples[index][0]) + len(examples[index][1])
        if current and max(width, length) * (len(current) + 1) > tokens_per_batch:
            out.append(current)
            current, width = [], 0
        current.append(examples[index])
        width = max(width, length)
    if current:
        out.append(current)
    return out


def train_lm(model, examples: list, recipe: LMRecipe, pad_token_id: int, log=print) -> list:
    """Deterministic LM training on the response tokens (EOS included): AdamW, linear warm-up over
    5% of the steps, cosine decay to 10% of ``recipe.lr``, gradient clipping at 1. Returns the
    losses per step."""
    import torch

    from gadchat.batch import SequenceBatch
    from gadchat.losses import sft_loss, token_log_probs

    torch.manual_seed(recipe.seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warm = max(1, recipe.steps // 20)

    def lr_at(step):
        if step < warm:
            return recipe.lr * (step + 1) / warm
        progress = (step - warm) / max(1, recipe.steps - warm)
        return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    losses, epoch, queue = [], 0, []
    started = time.perf_counter()
    for step in range(recipe.steps):
        if not queue:
            queue = batches(examples, recipe.tokens_per_batch, recipe.seed, epoch)
            epoch += 1
        chunk = queue.pop(0)
        batch = SequenceBatch.build([p for p, _ in chunk], [r for _, r in chunk], pad_token_id)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss = sft_loss(token_log_probs(logits[:, :-1], batch.input_ids[:, 1:]), batch.target_mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if log and ((step + 1) % 50 == 0 or step + 1 == recipe.steps):
            log(f"[known-teacher] step {step + 1}/{recipe.steps} loss {sum(losses[-50:]) / len(losses[-50:]):.3f} "
                f"({time.perf_counter() - started:.0f} s)")
    model.eval()
    return losses


def build_lm(out_dir, recipe: LMRecipe, rows: list | None = None, log=print) -> Path:
    """Build a model folder: the shared tiny tokenizer, a seeded random Qwen2 of the recipe's shape,
    trained by :func:`train_lm` on the recipe's paragraph examples; deterministic for a recipe."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gadchat.tiny import build_tiny_model

    out = Path(out_dir)
    build_tiny_model(out, hidden_size=recipe.hidden_size, num_layers=recipe.num_layers, num_heads=recipe.num_heads,
                     num_kv_heads=recipe.num_kv_heads, intermediate_size=recipe.intermediate_size, seed=recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="sdpa")
    rows = rows if rows is not None else read_rows(SHIPPED / "train.jsonl")
    examples = paragraph_examples(rows, tokenizer, recipe.shuffle_prompts, recipe.seed)
    losses = train_lm(model, examples, recipe, tokenizer.pad_token_id, log=log)
    model.save_pretrained(out, safe_serialization=True)
    (out / "TINY_MODEL.md").write_text(
        f"Known-teacher benchmark model built by gadchat.known_teacher: {recipe}.\n"
        f"{len(examples)} paragraph examples; final loss {losses[-1] if losses else float('nan'):.4f}.\n")
    return out


def ensure_lm(name: str, folder: Path, log=print) -> Path:
    """Build ``RECIPES[name]`` into ``folder`` once (temp folder, then rename)."""
    folder = Path(folder)
    if (folder / "model.safetensors").exists() and (folder / "TINY_MODEL.md").exists():
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if log:
        log(f"[known-teacher] building {name} into {folder} (once; cached)")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # one process: every core (the stages run one thread per rank)
    try:
        build_lm(tmp, RECIPES[name], log=log)
    finally:
        torch.set_num_threads(threads)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ---------------------------------------------------------------------------------------------
# teacher data in the published layout


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
    right-padded to the longest response, and the mask of real response tokens."""
    import torch

    from gadchat.batch import SequenceBatch
    from gadchat.losses import token_log_probs

    width = max(len(r) for r in responses)
    out = torch.zeros(len(responses), width)
    mask = torch.zeros(len(responses), width)
    with torch.no_grad():
        for start in range(0, len(responses), batch_size):
            p, r = prompts[start : start + batch_size], responses[start : start + batch_size]
            batch = SequenceBatch.build(p, r, pad_token_id)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
            lp = token_log_probs(logits[:, :-1], batch.input_ids[:, 1:])
            for row, (prompt, response) in enumerate(zip(p, r)):
                out[start + row, : len(response)] = lp[row, len(prompt) - 1 : len(prompt) - 1 + len(response)]
                mask[start + row, : len(response)] = 1.0
    return out, mask


@dataclass
class HeldOut:
    """Held-out prompts and the teacher's samples for them (token ids and text)."""

    messages: list
    prompt_ids: list
    teacher_ids: list
    teacher_text: list


def held_out(data_file: Path, tokenizer, limit: int = 0) -> HeldOut:
    from gadchat.data import encode_prompt, encode_response

    rows = read_rows(Path(data_file))[: limit or None]
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

    from gadchat import teacher_metrics as tm
    from gadchat.generation import GenerationSettings, Generator
    from gadchat.rouge import rouge_l_f1

    teacher_model = load_scorer(teacher)
    results = {}
    teacher_lengths = [len(t) for t in heldout.teacher_ids]
    for name, path in models.items():
        started = time.perf_counter()
        generator = Generator(path, backend=backend, seed=seed)
        try:
            torch.manual_seed(seed)
            sampled = generator.generate(heldout.messages, GenerationSettings(
                max_new_tokens=max_new_tokens, temperature=1.0, n=samples_per_prompt, seed=seed))
            greedy = generator.generate(heldout.messages, GenerationSettings(max_new_tokens=max_new_tokens))
            pad = generator.tokenizer.pad_token_id
        finally:
            generator.close()
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
        results[name] = {
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
        if log:
            log(f"[known-teacher] evaluated {name} in {time.perf_counter() - started:.0f} s: "
                + ", ".join(f"{k}={v:.3f}" for k, v in results[name].items()))
    return results
