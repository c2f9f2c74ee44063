"""The known-teacher benchmark's models (``builtin:kt-teacher``, ``builtin:kt-student``), built
here from the shipped teacher data, for measuring distillation exactly on a CPU. The benchmark
itself (teacher data, evaluation, the arms) is :mod:`applications.known_teacher`.

The student side of every experiment stays black-box: it sees only the teacher's *text*, written in
the published data layout and read through the ordinary data path. Only the evaluation (and the
optional GAD-stage diagnostics) read the teacher's exact log-probabilities.

- **Teacher** (``builtin:kt-teacher``): a Qwen2 of hidden 256, 4 layers (about 3.4M parameters, 8x
  the student), trained with a fixed schedule (steps, seed and batch order; repeatable on one
  machine, not across machines: docs/known_teacher.md) on the shipped GPT-4o
  answers cut into paragraphs: for each training prompt, each paragraph of its answer (at most
  ``PARAGRAPH_TOKENS`` tokens, cut at a sentence end) is one ``prompt -> paragraph + EOS`` example.
  The teacher therefore answers a prompt with one paragraph and stops, so its samples end with an
  EOS and both sides of the discriminator see answers that really ended (EOS symmetry,
  docs/algorithm.md section 3.3).
- **Student** (``builtin:kt-student``): the ``builtin:tiny`` shape (hidden 128, 2 layers, 0.43M
  parameters) with a short generic start: a few LM steps on the same paragraphs paired with
  *other* prompts, so it writes English-like paragraphs and ends them, but has not learned the
  teacher's conditional behaviour.
Everything is cached under ``$GADCHAT_CACHE`` (default ``~/.cache/gadchat``) by name and built once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from gadchat.resources import SHIPPED_KNOWN_TEACHER, SHIPPED_TEACHER_DATA, resource

# The shipped teacher data (train.jsonl: 700 rows, test.jsonl: 105), packaged with gadchat
# (``data/alpaca_eval_gpt4o`` in a checkout links to it), so an installed copy builds the models too.
SHIPPED = resource(SHIPPED_TEACHER_DATA)
PARAGRAPH_TOKENS = 64
MIN_PARAGRAPH_TOKENS = 6
SHIPPED_MARKER = "SHIPPED"


@dataclass(frozen=True)
class BuildSpec:
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


TEACHER = BuildSpec(hidden_size=256, num_layers=4, intermediate_size=768, steps=360, lr=2e-3)
STUDENT = BuildSpec(hidden_size=128, num_layers=2, intermediate_size=256, steps=150, lr=2e-3, shuffle_prompts=True)
BUILD_SPECS = {"kt-teacher": TEACHER, "kt-student": STUDENT}


# ---------------------------------------------------------------------------------------------
# training text


def read_rows(path) -> list:
    """The JSON rows of a JSON-lines file (a path, or a packaged file such as ``SHIPPED / "train.jsonl"``)."""
    with (Path(path) if isinstance(path, str) else path).open("r", encoding="utf-8") as handle:
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


def train_lm(model, examples: list, spec: BuildSpec, pad_token_id: int, log=print) -> list:
    """LM training on the response tokens (EOS included), repeatable on one machine (seeded, fixed
    batch order; across machines see docs/known_teacher.md, Reproducibility): AdamW, linear warm-up over
    5% of the steps, cosine decay to 10% of ``spec.lr``, gradient clipping at 1. Returns the
    losses per step."""
    import torch

    from gadchat.batch import SequenceBatch
    from gadchat.losses import sft_loss, token_log_probs

    torch.manual_seed(spec.seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warm = max(1, spec.steps // 20)

    def lr_at(step):
        if step < warm:
            return spec.lr * (step + 1) / warm
        progress = (step - warm) / max(1, spec.steps - warm)
        return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    losses, epoch, queue = [], 0, []
    started = time.perf_counter()
    for step in range(spec.steps):
        if not queue:
            queue = batches(examples, spec.tokens_per_batch, spec.seed, epoch)
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
        if log and ((step + 1) % 50 == 0 or step + 1 == spec.steps):
            log(f"[known-teacher] step {step + 1}/{spec.steps} loss {sum(losses[-50:]) / len(losses[-50:]):.3f} "
                f"({time.perf_counter() - started:.0f} s)")
    model.eval()
    return losses


def build_lm(out_dir, spec: BuildSpec, rows: list | None = None, log=print) -> Path:
    """Build a model folder: the shared tiny tokenizer, a seeded random Qwen2 of the spec's shape,
    trained by :func:`train_lm` on the spec's paragraph examples (reproducibility: docs/known_teacher.md)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gadchat.tiny import build_tiny_model

    out = Path(out_dir)
    build_tiny_model(out, hidden_size=spec.hidden_size, num_layers=spec.num_layers, num_heads=spec.num_heads,
                     num_kv_heads=spec.num_kv_heads, intermediate_size=spec.intermediate_size, seed=spec.seed)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="sdpa")
    rows = rows if rows is not None else read_rows(SHIPPED / "train.jsonl")
    examples = paragraph_examples(rows, tokenizer, spec.shuffle_prompts, spec.seed)
    losses = train_lm(model, examples, spec, tokenizer.pad_token_id, log=log)
    model.save_pretrained(out, safe_serialization=True)
    (out / "TINY_MODEL.md").write_text(
        f"Known-teacher benchmark model built by gadchat.known_teacher_models: {spec}.\n"
        f"{len(examples)} paragraph examples; final loss {losses[-1] if losses else float('nan'):.4f}.\n")
    return out


def build_record(spec: BuildSpec) -> dict:
    """What fixes a build besides the shipped data and the tiny tokenizer: its spec and the
    paragraph rule (``build_spec.json`` of a shipped build)."""
    return {**dataclasses.asdict(spec), "paragraph_tokens": PARAGRAPH_TOKENS, "min_paragraph_tokens": MIN_PARAGRAPH_TOKENS}


def shipped_build(name: str):
    """The build of ``name`` shipped in the package (``gadchat/resources/known_teacher/<name>``),
    when its ``build_spec.json`` is this code's spec; None otherwise, or when
    ``GADCHAT_BUILD_KNOWN_TEACHER=1`` asks for a build from scratch. The build trains for minutes and
    is repeatable on one machine but not across machines (float summation order), so the shipped
    copy is both faster and the same for everyone: the benchmark's recorded figures used it."""
    if os.environ.get("GADCHAT_BUILD_KNOWN_TEACHER") == "1":
        return None
    folder = resource(SHIPPED_KNOWN_TEACHER) / name
    spec_file = folder / "build_spec.json"
    if not spec_file.is_file() or json.loads(spec_file.read_text()) != build_record(BUILD_SPECS[name]):
        return None
    return folder


def copy_resource_folder(source, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file():
            (target / item.name).write_bytes(item.read_bytes())


def ensure_lm(name: str, folder: Path, log=print) -> Path:
    """Copy the shipped build of ``BUILD_SPECS[name]`` (:func:`shipped_build`), or build it, into
    ``folder`` once (temp folder, then rename); a copied build is marked ``SHIPPED``."""
    folder = Path(folder)
    if (folder / "model.safetensors").exists() and (folder / "TINY_MODEL.md").exists():
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shipped = shipped_build(name)
    if shipped is not None:
        if log:
            log(f"[known-teacher] {name}: the shipped build -> {folder}")
        copy_resource_folder(shipped, tmp)
        (tmp / SHIPPED_MARKER).write_text("copied from gadchat/resources/known_teacher\n")
    else:
        if log:
            log(f"[known-teacher] building {name} into {folder} (once; cached)")
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or 1)  # one process: every core (the stages run one thread per rank)
        try:
            build_lm(tmp, BUILD_SPECS[name], log=log)
        finally:
            torch.set_num_threads(threads)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
