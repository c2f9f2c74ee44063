"""Reading checkpoint files without running code: ``torch.load(weights_only=True)`` with only
DeepSpeed's plain state classes allowed, a pre-scan for readers that unpickle on their own, and
DeepSpeed's per-engine loader pointed at the safe reader (README: Trusting checkpoints)."""

from __future__ import annotations

from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not match the run; the message says which."""


def _deepspeed_state_classes() -> list:
    """The DeepSpeed classes its optimizer states pickle (plain data holders, no code on load)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _refusal(path, exc: BaseException) -> CheckpointError:
    import re

    found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(exc))
    what = f"the Python object {found.group(1)}" if found else "Python objects other than tensors"
    return CheckpointError(
        f"{path}: refused to load: it holds {what}, and unpickling it could run code; only tensors, plain "
        "containers and DeepSpeed's state classes are loaded (README: Trusting checkpoints)")


def safe_torch_load(path, map_location="cpu"):
    """``torch.load(weights_only=True)`` with DeepSpeed's state classes allowed; a file holding any
    other Python object raises CheckpointError naming it, without running anything."""
    import pickle

    try:
        with torch.serialization.safe_globals(_deepspeed_state_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refusal(path, exc) from None


def verify_loadable_without_code(folder) -> None:
    """Check, without unpickling, that every ``.pt`` under ``folder`` holds only allowed globals
    (for readers that unpickle on their own, such as DeepSpeed's zero_to_fp32)."""
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in _deepspeed_state_classes()}
    for path in sorted(Path(folder).rglob("*.pt")):
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) - allowed
        except (RuntimeError, ValueError, OSError) as exc:  # not a zip archive: load it the safe way
            try:
                safe_torch_load(path)
            except (RuntimeError, EOFError) as inner:
                raise CheckpointError(f"{path} is truncated or corrupt ({inner})") from exc
            continue
        if unsafe:
            raise _refusal(path, RuntimeError(f"Unsupported global: GLOBAL {sorted(unsafe)[0]}"))


def _safe_checkpoint_engine(engine) -> None:
    """Make DeepSpeed's loader of ``engine`` read with weights_only=True (it passes False itself)."""
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    if checkpoint_engine is not None:
        checkpoint_engine.load = lambda path, map_location=None: safe_torch_load(path, map_location)


def weight_file_problem(folder) -> str | None:
    """Why a model folder's weight files cannot be read whole, naming the file (each safetensors
    header is checked against the file's size, each ``.bin``'s archive is opened; no tensor is
    loaded); None when they look whole or the folder is no local folder (a hub id)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # safetensors' SafetensorError, OSError
            return f"{path} is truncated or corrupt ({type(exc).__name__}: {str(exc)[:200]})"
    for path in sorted(folder.glob("*.bin")):
        try:
            torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as exc:
            return f"{path} is truncated or corrupt ({type(exc).__name__}: {str(exc)[:200]})"
    return None
