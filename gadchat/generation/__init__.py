"""One generation layer for training rollouts and inference.

- :mod:`gadchat.generation.backend`: the backend interface (:class:`GenerationBackend`: token-id
  prompts in, ``n`` token-id responses per prompt out; capabilities ``follows_actor`` and
  ``streams``) and its helpers (:func:`trim_at_eos`, :func:`seed_generators`);
- :mod:`gadchat.generation.vllm_backend` (:class:`VLLMBackend`) and
  :mod:`gadchat.generation.hf_backend` (:class:`HFBackend`): the two implementations, each built
  colocated with training (its constructor) or from a model folder (``from_model_folder``);
- :mod:`gadchat.generation.backends`: the name -> class factory (:data:`BACKENDS`,
  :func:`choose_backend`, :func:`backend_class`);
- :mod:`gadchat.generation.generator`: chat messages in, :class:`Completion` out
  (:class:`Generator`, :class:`GenerationSettings`), on top of a backend.
"""

from gadchat.generation.backend import GenerationBackend, seed_generators, trim_at_eos
from gadchat.generation.backends import BACKEND_CLASSES, BACKENDS, backend_class, choose_backend
from gadchat.generation.generator import Completion, GenerationSettings, Generator
from gadchat.generation.hf_backend import HFBackend
from gadchat.generation.vllm_backend import VLLMBackend, vllm_available
from gadchat.models import resolve_model_path

__all__ = [
    "BACKENDS", "BACKEND_CLASSES", "Completion", "GenerationBackend", "GenerationSettings", "Generator", "HFBackend",
    "VLLMBackend", "backend_class", "choose_backend", "resolve_model_path", "seed_generators", "trim_at_eos",
    "vllm_available",
]
