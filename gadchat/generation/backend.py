"""The generation backend interface: token-id prompts in, ``n`` token-id responses per prompt out.

A backend is built either colocated with training (its constructor, as the engine calls it) or from
a model folder for inference (:meth:`GenerationBackend.from_model_folder`). Either way
:meth:`GenerationBackend.generate` returns, per prompt, ``n`` lists of response token ids that end
with the first EOS generated (kept) or are cut at ``max_new_tokens`` without one.

Capabilities, read instead of comparing backend names:

- ``follows_actor``: the backend holds its own copy of the weights (vLLM), so after every actor
  update the trainer pushes them with :meth:`GenerationBackend.load_weights`; ``False`` where it
  generates with the training module itself (transformers ``generate``), which has nothing to push.
- ``streams``: :meth:`GenerationBackend.stream` feeds a transformers streamer as tokens arrive.

Sampling is reproducible: every call takes a seed, from which the backend seeds the global torch
generator that both in-process vLLM and transformers sample from (:func:`seed_generators`).
"""

from __future__ import annotations

import abc
from typing import ClassVar, Iterable

import torch

from gadchat import runtime


def trim_at_eos(tokens: list, eos_ids: set) -> list:
    """``tokens`` up to and including the first EOS (all of them when there is none)."""
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: i + 1]
    return tokens


def seed_generators(seed: int) -> None:
    """Seed torch's global generators (CPU and every GPU), which both backends sample from."""
    torch.manual_seed(seed)
    if runtime.has_cuda():
        torch.cuda.manual_seed_all(seed)


class GenerationBackend(abc.ABC):
    """What the trainer's rollouts and the inference :class:`~gadchat.generation.Generator` need."""

    name: ClassVar[str]
    """The name users pick it by (``--rollout.backend`` / ``--backend``)."""
    follows_actor: ClassVar[bool]
    """Holds its own weights: call :meth:`load_weights` after each actor update."""
    streams: ClassVar[bool] = False
    """:meth:`stream` is available."""
    unavailable_reason: ClassVar[str] = ""
    """Why :meth:`available` is false (shown when the backend is asked for)."""

    eos_ids: set
    """The token ids a response ends at."""

    @classmethod
    def available(cls) -> bool:
        """Whether the backend's library is installed."""
        return True

    @classmethod
    @abc.abstractmethod
    def from_model_folder(cls, model_path: str, tokenizer, *, dtype: str = "auto", seed: int = 0,
                          trust_remote_code: bool = False, max_model_len: int | None = None, batch_size: int = 16,
                          gpu_memory_utilization: float = 0.85) -> GenerationBackend:
        """A backend for inference on the model in ``model_path`` (a local folder or hub id), stopping at
        the EOS set of ``tokenizer`` and the model's generation config. Options that do not apply to
        this backend are ignored (``max_model_len``, ``gpu_memory_utilization``: vLLM;
        ``batch_size``: transformers)."""

    @abc.abstractmethod
    def generate(self, prompts: list, n: int, temperature: float, top_p: float, max_new_tokens: int,
                 seed: int, greedy: bool = False, progress: bool = False) -> list:
        """Per prompt (a list of token ids), ``n`` response token-id lists trimmed at the first EOS.
        ``greedy`` decodes once and repeats the answer ``n`` times (``temperature``/``top_p`` unused)."""

    def stream(self, prompt: list, temperature: float, top_p: float, max_new_tokens: int, seed: int,
               greedy: bool, streamer) -> list:
        """One response to ``prompt``, handing tokens to ``streamer`` (a transformers streamer: ``put``
        / ``end``) as they are produced; only where ``streams`` is true."""
        raise NotImplementedError(f"the {self.name} backend does not stream")

    def load_weights(self, named_tensors: Iterable) -> None:
        """Replace the backend's weights with ``(hf_name, tensor)`` pairs; only where ``follows_actor``."""
        raise NotImplementedError(f"the {self.name} backend generates with the training module itself; "
                                  "it has no weights of its own to load")

    def close(self) -> None:
        """Free what the backend holds (before loading the next model in the same process)."""
