"""Rollout backends under their training names; they live in :mod:`gadchat.generation`.

``VLLMRollout`` is :class:`gadchat.generation.VLLMBackend` and ``HFRollout`` is
:class:`gadchat.generation.HFBackend` (same constructors); new code should import from
:mod:`gadchat.generation` and read the backends' ``follows_actor`` rather than their names.
"""

from gadchat.generation.backend import seed_generators as _seed_generators
from gadchat.generation.backend import trim_at_eos
from gadchat.generation.backends import BACKENDS, choose_backend
from gadchat.generation.hf_backend import HFBackend as HFRollout
from gadchat.generation.vllm_backend import VLLMBackend as VLLMRollout
from gadchat.generation.vllm_backend import _refresh_tied_lm_head, vllm_available

__all__ = ["BACKENDS", "HFRollout", "VLLMRollout", "choose_backend", "trim_at_eos", "vllm_available",
           "_refresh_tied_lm_head", "_seed_generators"]
