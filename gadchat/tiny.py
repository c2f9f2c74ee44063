"""Build a tiny chat student on the spot: a byte-level BPE tokenizer trained on the text packaged
with gadchat (``gadchat/resources/tokenizer_corpus.jsonl``) and a randomly initialised Qwen2 model
sized for CPU tests.

No model hub is needed. The tokenizer follows Qwen2's own pre-tokenization pipeline (NFC, Qwen2's
split regex, ByteLevel without its regex) so that transformers loads the folder as a Qwen2
tokenizer with the same behaviour it was trained with, and it carries a ChatML chat template whose
turn end ``<|im_end|>`` is the EOS, as in Qwen2.5-Instruct. The pad token ``<|endoftext|>`` differs
from the EOS so a sequence-classification head pools at the EOS, not at padding.

Usage: ``python -m gadchat.tiny --out DIR [--hidden-size 128 --layers 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]

QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def default_corpus():
    """The packaged tokenizer corpus (``gadchat/resources/tokenizer_corpus.jsonl``): the prompt and
    teacher-response texts of the shipped ``data/alpaca_eval_gpt4o/train.jsonl``, in order."""
    from gadchat.resources import TOKENIZER_CORPUS, resource

    return resource(TOKENIZER_CORPUS)


def _corpus_lines(corpus=None):
    """The texts of ``corpus`` in order: a line holding a JSON string is one text (the packaged
    corpus); a line holding a row of the published layout gives its messages' contents, then its
    teacher response. ``None`` = :func:`default_corpus`."""
    source = default_corpus() if corpus is None else Path(corpus)
    with source.open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            if isinstance(row, str):
                yield row
                continue
            for message in row.get("content", []):
                yield message.get("content", "")
            yield row.get("teacher_response", "")


def build_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 1024, corpus: str | os.PathLike | None = None):
    """Train a byte-level BPE tokenizer on ``corpus`` (default: the packaged corpus, see
    :func:`default_corpus`) and save it as a Hugging Face folder."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus_lines(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_model(
    out_dir: str | os.PathLike,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    vocab_size: int = 1024,
    max_position_embeddings: int = 4096,
    seed: int = 0,
) -> Path:
    """Write a tokenizer and a randomly initialised Qwen2 causal LM to ``out_dir``.

    ``hidden_size / num_heads`` must be a head size vLLM's CPU attention supports (32, 64, 80, ...).
    The result is deterministic for a given seed, so every rank may build the same folder.
    """
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, vocab_size=vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = Qwen2Config(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(out, safe_serialization=True)
    (out / "TINY_MODEL.md").write_text(
        "Tiny random Qwen2 student built by gadchat.tiny for CPU runs and tests; not a trained model.\n"
    )
    return out


def ensure_tiny_model(out_dir: str | os.PathLike, **kwargs) -> Path:
    """Build the tiny model unless ``out_dir`` already holds a complete one."""
    out = Path(out_dir)
    if (out / "model.safetensors").exists() and (out / "tokenizer_config.json").exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    build_tiny_model(tmp, **kwargs)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first; keep its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate-size", type=int, default=None)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_tiny_model(
        args.out,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        intermediate_size=args.intermediate_size,
        vocab_size=args.vocab_size,
        seed=args.seed,
    )
    print(f"tiny model written to {path}")


if __name__ == "__main__":
    main()
