"""The one place a backend name is mapped to a backend class.

``auto`` picks the first available backend in :data:`BACKEND_CLASSES` order (vLLM where it is
installed, transformers otherwise); asking for a backend whose library is missing is an error.
"""

from __future__ import annotations

from gadchat.generation.backend import GenerationBackend
from gadchat.generation.hf_backend import HFBackend
from gadchat.generation.vllm_backend import VLLMBackend

BACKEND_CLASSES: dict = {cls.name: cls for cls in (VLLMBackend, HFBackend)}
"""Backend classes by name, in ``auto``'s order of preference."""
BACKENDS = ("auto", *BACKEND_CLASSES)
"""The names a user may ask for."""


def choose_backend(requested: str) -> str:
    """The backend name ``requested`` resolves to; raises ``ValueError`` naming the choices."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown generation backend {requested!r} (choose from {', '.join(BACKENDS)})")
    if requested == "auto":
        return next(name for name, cls in BACKEND_CLASSES.items() if cls.available())
    cls = BACKEND_CLASSES[requested]
    if not cls.available():
        raise ValueError(f"backend {requested!r} asked for but {cls.unavailable_reason}")
    return requested


def backend_class(requested: str) -> type[GenerationBackend]:
    """The class of the backend ``requested`` resolves to (see :func:`choose_backend`)."""
    return BACKEND_CLASSES[choose_backend(requested)]
