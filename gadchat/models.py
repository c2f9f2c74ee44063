"""Model loading: the student (actor), its frozen reference, and the discriminator.

The discriminator is the student's backbone plus a scalar head: exactly transformers'
``AutoModelForSequenceClassification`` with ``num_labels=1`` built from the student's weights, so it
exports as a standard reward-model folder. Training scores it ourselves at the last valid response
token (the EOS), which is where that class pools too when padding uses a pad token distinct from
the EOS (docs/algorithm.md section 3.2).
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import torch
from torch import nn

from gadchat import runtime
from gadchat.known_teacher_models import BUILD_SPECS, ensure_lm
from gadchat.tiny import ensure_tiny_model

BUILTIN_PREFIX = "builtin:"
BUILTIN_SHAPES = {
    # name: kwargs of gadchat.tiny.build_tiny_model
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=1024),
    "small": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1408, vocab_size=4096),
}


def cache_dir() -> Path:
    return Path(os.environ.get("GADCHAT_CACHE", Path.home() / ".cache" / "gadchat"))


def resolve_model_path(path: str) -> str:
    """A loadable model folder or hub id for ``path``.

    ``builtin:NAME`` is built once (on rank 0, then shared) into the cache; a training output dir
    stands for its exported ``final/actor``; a model folder (with ``config.json``) or a hub id is
    returned as it is. An existing folder with neither raises, naming what was expected.
    """
    if not path.startswith(BUILTIN_PREFIX):
        folder = Path(path)
        if (folder / "final" / "actor" / "config.json").exists():
            return str(folder / "final" / "actor")
        if (folder / "config.json").exists() or not folder.exists():
            return path
        raise FileNotFoundError(
            f"{path} holds no config.json and no final/actor/config.json: give an exported model folder, "
            "a training output dir, or a hub id")
    name = path[len(BUILTIN_PREFIX):]
    if name not in BUILTIN_SHAPES and name not in BUILD_SPECS:
        known = [*BUILTIN_SHAPES, *BUILD_SPECS]
        raise ValueError(f"unknown builtin model {path!r}; known: {', '.join(BUILTIN_PREFIX + k for k in known)}")
    folder = cache_dir() / f"builtin-{name}"
    if runtime.is_rank0():
        if name in BUILTIN_SHAPES:
            ensure_tiny_model(folder, **BUILTIN_SHAPES[name])
        else:  # the known-teacher benchmark's trained models (minutes to build, once)
            ensure_lm(name, folder)
    runtime.barrier()
    return str(folder)


def attn_implementation(requested: str) -> str:
    if requested != "auto":
        return requested
    if runtime.has_cuda() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"tokenizer at {path} has no pad token; GAD pads batches with a pad token distinct from the EOS "
            "(Qwen2.5 uses <|endoftext|>). Add one to the tokenizer folder."
        )
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(f"tokenizer at {path}: pad token equals the EOS; the discriminator must not pool at padding")
    return tokenizer


def load_generation_config(path: str):
    """The model folder's ``generation_config.json`` (None when it has none)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except (OSError, ValueError):
        return None


def eos_token_ids(tokenizer, generation_config=None) -> list:
    """The one EOS set: the tokenizer's EOS plus the generation config's ``eos_token_id`` (an int or
    a list; Qwen2.5-Instruct names ``<|im_end|>`` and ``<|endoftext|>``), sorted. Both rollout
    backends stop on it, the trimmer keeps the first of them, and the discriminator reads any of
    them as the tokenizer's EOS (``SequenceBatch.with_final_token``)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if not ids:
        raise ValueError("the tokenizer and generation config name no EOS token; cannot tell where an answer ends")
    return sorted(ids)


def load_causal_lm(path: str, dtype: torch.dtype, attn: str, gradient_checkpointing: bool = False,
                   trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn, trust_remote_code=trust_remote_code
    )
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


class Discriminator(nn.Module):
    """``D(x, y)``: the sequence-classification model's head output at the last valid token.

    No sigmoid, no length normalisation. ``forward`` returns one score per sequence. With
    ``pooling="sum"`` (or ``"mean"``) the head is applied at every position and ``D`` is the sum
    (mean) of its outputs over the response tokens, ``sum_t w . h_t`` (an experimental option,
    ``--discriminator.pooling``); the default ``"last"`` is the paper's discriminator.
    """

    def __init__(self, seqcls_model: nn.Module, pooling: str = "last"):
        super().__init__()
        if pooling not in ("last", "sum", "mean"):
            raise ValueError(f"discriminator.pooling must be last, sum or mean, got {pooling!r}")
        self.seqcls = seqcls_model
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, last_index: torch.Tensor,
                response_mask: torch.Tensor | None = None) -> torch.Tensor:
        backbone = self.seqcls.base_model
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "last":
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            return self.seqcls.score(hidden[rows, last_index]).squeeze(-1).float()
        if response_mask is None:
            raise ValueError(f"discriminator.pooling={self.pooling} needs the response mask")
        per_token = self.seqcls.score(hidden).squeeze(-1).float()
        mask = response_mask.to(per_token.dtype)
        total = (per_token * mask).sum(-1)
        return total if self.pooling == "sum" else total / mask.sum(-1).clamp(min=1)


def load_discriminator(path: str, pad_token_id: int, dtype: torch.dtype, attn: str, head_init_std: float = 0.0,
                       seed: int = 0, gradient_checkpointing: bool = False, trust_remote_code: bool = False,
                       pooling: str = "last") -> Discriminator:
    """Backbone from ``path`` (a causal-LM or an exported discriminator) plus a scalar ``score`` head.

    A head missing from the checkpoint is initialised explicitly, ``N(0, std)`` with a seeded
    generator and gathered under ZeRO-3: partitioned parameters skip transformers' default init.
    """
    import deepspeed
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    has_head = getattr(config, "num_labels", None) == 1 and any(
        arch.endswith("ForSequenceClassification") for arch in (getattr(config, "architectures", None) or [])
    )
    config.num_labels = 1
    config.pad_token_id = pad_token_id
    model = AutoModelForSequenceClassification.from_pretrained(
        path, config=config, dtype=dtype, attn_implementation=attn, trust_remote_code=trust_remote_code
    )
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if not has_head:
        weight = model.score.weight
        std = head_init_std or 1.0 / math.sqrt(config.hidden_size + 1)
        with deepspeed.zero.GatheredParameters([weight], modifier_rank=0):
            if runtime.is_rank0() or not hasattr(weight, "ds_id"):
                generator = torch.Generator().manual_seed(seed)
                fresh = torch.randn(weight.shape, generator=generator, dtype=torch.float32) * std
                weight.data.copy_(fresh.to(weight.dtype))
    return Discriminator(model, pooling)
