"""Hugging Face folders from the training engines: live from a running stage (gathered from ZeRO-3
on rank 0) and offline from a stage's ZeRO checkpoint (``inference/export.py``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from gadchat import lora, runtime
from gadchat.checkpoint_files import LATEST, STATE_FILE, disk_error, latest_checkpoint, read_state, require_free_space
from gadchat.safe_load import CheckpointError, safe_torch_load, verify_loadable_without_code


def gathered_state_dict(module, zero3: bool) -> dict:
    """Full CPU state dict of ``module`` on rank 0 under its plain Hugging Face names (a LoRA adapter
    merged in, :func:`gadchat.lora.iter_merged_weights`); every rank must call it under ZeRO-3."""
    state = {}
    for name, tensor in lora.iter_merged_weights(module, zero3, bucket_bytes=0):  # one unit per gather
        if runtime.is_rank0():
            state[name] = tensor.detach().cpu().clone()
    for name, buffer in module.named_buffers():
        if runtime.is_rank0() and buffer is not None:
            state.setdefault(lora.plain_name(name), buffer.detach().cpu().clone())
    return state


def require_finite_weights(state: dict, where) -> None:
    """Raise CheckpointError naming the first tensor of ``state`` that holds NaN or Inf."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{where}: refused to export non-finite weights: {name} holds {bad} NaN/Inf "
                                  f"value(s) of {tensor.numel()}; export an earlier checkpoint")


def _save_hf_folder(model_like, state: dict, out: Path, tokenizer) -> None:
    require_finite_weights(state, out)
    out.mkdir(parents=True, exist_ok=True)
    model_like.save_pretrained(out, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(out)


def export_live(module, out: Path, tokenizer, zero3: bool) -> None:
    """Save a training module (actor, or the discriminator's sequence-classification model) as a
    Hugging Face folder, gathered to rank 0."""
    state = gathered_state_dict(module, zero3)
    error = None
    if runtime.is_rank0():
        persistent = {lora.plain_name(k) for k in module.state_dict() if not lora.is_adapter_weight(k)}
        state = {k: v for k, v in state.items() if k in persistent}
        try:
            _save_hf_folder(module, state, Path(out), tokenizer)
        except CheckpointError as exc:
            error = exc
        except OSError as exc:
            error = disk_error(out, "the final export", exc)
    runtime.raise_together(error, CheckpointError)


def export_from_checkpoint(checkpoint_path, out_dir, which: str = "actor", dtype: str = "float32") -> Path:
    """Offline export of one model from a DeepSpeed checkpoint folder (ZeRO 0-3), CPU only."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    step_dir = latest_checkpoint(checkpoint_path)
    if step_dir is None:
        raise CheckpointError(f"{checkpoint_path}: no checkpoint found (no {LATEST} file or {STATE_FILE})")
    engine_dir = step_dir / which
    meta = step_dir / f"{which}_hf"
    if not engine_dir.is_dir() or not (meta / "config.json").exists():
        raise CheckpointError(f"{step_dir} holds no {which} checkpoint ({engine_dir} or {meta}/config.json missing)")
    state = _consolidated_weights(step_dir, which)
    prefix = "seqcls." if which == "discriminator" else ""
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    config = AutoConfig.from_pretrained(meta)
    record = read_state(step_dir).get("lora", {}).get(which, {})
    if record.get("rank"):  # the adapter (and head) only: merged onto the base it was trained on
        state = lora.merged_from_checkpoint(state, record, which, config, seqcls=which == "discriminator")
    cls = AutoModelForSequenceClassification if which == "discriminator" else AutoModelForCausalLM
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    with torch.device("meta"):
        model = cls.from_config(config)
    expected = set(model.state_dict().keys())
    missing = [k for k in expected if k not in state and not _is_tied(config, k)]
    if missing:
        raise CheckpointError(f"{engine_dir}: the checkpoint lacks {len(missing)} weights of the model, e.g. {missing[:3]}")
    state = {k: v.to(torch_dtype) for k, v in state.items() if k in expected}
    require_finite_weights(state, engine_dir)
    model = model.to_empty(device="cpu")
    model.load_state_dict(state, strict=False)
    if _is_tied(config, "lm_head.weight"):
        model.tie_weights()
    out = Path(out_dir)
    partial = out.with_name(out.name + ".partial")  # renamed once whole: a kill leaves no torn folder
    if partial.exists():
        shutil.rmtree(partial)
    require_free_space(out.parent, sum(v.numel() * v.element_size() for v in state.values()), f"the {which} export")
    try:
        _save_hf_folder(model, state, partial, AutoTokenizer.from_pretrained(meta))
        if (meta / "generation_config.json").exists():
            shutil.copy(meta / "generation_config.json", partial / "generation_config.json")
        if out.exists():
            shutil.rmtree(out)
        os.replace(partial, out)
    except OSError as exc:
        raise disk_error(partial, f"the {which} export", exc) from exc
    return out


def _is_tied(config, key: str) -> bool:
    return key == "lm_head.weight" and getattr(config, "tie_word_embeddings", False)


def _consolidated_weights(step_dir: Path, which: str) -> dict:
    state = read_state(step_dir)
    engine_dir = step_dir / which
    verify_loadable_without_code(engine_dir)
    if state.get("zero_stage", 0) >= 2:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            return get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=which)
        except (FileNotFoundError, ValueError, RuntimeError, EOFError, KeyError) as exc:
            raise CheckpointError(f"{engine_dir}: cannot read the ZeRO shards ({exc})") from exc
    files = sorted(engine_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{engine_dir}: no mp_rank_*_model_states.pt file")
    try:
        saved = safe_torch_load(files[0])
    except CheckpointError:
        raise
    except (EOFError, RuntimeError) as exc:
        raise CheckpointError(f"{files[0]} is truncated or corrupt ({exc})") from exc
    return {k: v.float() for k, v in saved["module"].items()}
