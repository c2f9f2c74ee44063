"""LoRA for the trained roles (PEFT's LoRA layers injected in place).

The adapter is injected into the Hugging Face model itself (``peft.inject_adapter_in_model``), not
wrapped in a ``PeftModel``: the engine keeps the model's own class, parameter names and forward
signature (``logits_to_keep``, the discriminator's ``base_model``), and a targeted ``Linear`` becomes
a LoRA layer whose base weight is ``<module>.base_layer.weight`` beside ``lora_A`` / ``lora_B``.

Three things read the adapter out of the model:

- the merged weights ``W + (alpha / r) B A`` (PEFT's ``get_delta_weight``), computed out of place per
  module in float32 and cast to the model's dtype: the training weights are never merged and
  unmerged (no bf16 drift), and every weight comes out under its plain Hugging Face name
  (``q_proj.weight``), complete, for the vLLM push and the merged export
  (:func:`iter_merged_weights`);
- the adapter alone in PEFT's file format (:func:`adapter_state_dict`), for users who keep adapters;
- the model with its adapter switched off (:func:`adapters_disabled`): exactly the frozen start
  weights, which is the reference of a stage that starts a fresh adapter.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

ADAPTER_NAME = "default"
ADAPTER_KEY = f".{ADAPTER_NAME}"
BASE_LAYER = ".base_layer"


def lora_config(section, seqcls: bool = False):
    """PEFT's ``LoraConfig`` for a role's config section (``lora_rank``, ``lora_alpha`` ...)."""
    from peft import LoraConfig

    targets = [t.strip() for t in section.lora_target_modules.split(",") if t.strip()]
    return LoraConfig(r=section.lora_rank, lora_alpha=section.lora_scaling_alpha, lora_dropout=section.lora_dropout,
                      target_modules="all-linear" if targets == ["all-linear"] else targets, bias="none",
                      task_type="SEQ_CLS" if seqcls else "CAUSAL_LM", modules_to_save=["score"] if seqcls else None)


def add_adapter(model: torch.nn.Module, section, flag: str, seed: int, seqcls: bool = False) -> torch.nn.Module:
    """Inject a fresh LoRA adapter into ``model`` in place; every other weight is frozen, except a
    sequence classifier's ``score`` head, which trains in full. ``lora_A`` is drawn from a generator
    seeded with ``seed`` (every rank the same; ZeRO-3 broadcasts rank 0's anyway), ``lora_B`` is 0,
    so the model starts as the base model. ``flag`` (``actor``) names the config section in errors."""
    from peft import inject_adapter_in_model

    config = lora_config(section, seqcls)
    config.modules_to_save = None  # the head trains in place (no PEFT copy of a ZeRO-3-partitioned head)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
        except ValueError:
            names = [name for name, _ in model.named_modules()]
            linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            wanted = config.target_modules if isinstance(config.target_modules, (list, set)) else [config.target_modules]
            missing = sorted(t for t in wanted if not any(n == t or n.endswith("." + t) for n in names))
            raise ValueError(f"--{flag}.lora_target_modules {section.lora_target_modules!r}: the model has no module "
                             f"named {', '.join(missing) or 'like these'}; its linear modules: {', '.join(linear)}") from None
    if seqcls:
        model.score.weight.requires_grad_(True)
    return model


def has_adapter(module: torch.nn.Module) -> bool:
    return bool(adapter_layers(module))


def adapter_layers(module: torch.nn.Module) -> dict:
    """``{module name: LoRA layer}`` of ``module``."""
    from peft.tuners.lora import LoraLayer

    return {name: layer for name, layer in module.named_modules() if isinstance(layer, LoraLayer)}


def is_adapter_weight(name: str) -> bool:
    return ".lora_" in name


def plain_name(name: str) -> str:
    """The Hugging Face name of a weight of a LoRA-injected model (``q_proj.base_layer.weight`` ->
    ``q_proj.weight``); other names are unchanged."""
    return name.replace(BASE_LAYER + ".", ".")


@contextlib.contextmanager
def adapters_disabled(module: torch.nn.Module):
    """Run ``module`` as its base model: every LoRA layer computes ``base_layer(x)`` alone. PEFT's
    switch also clears the adapters' ``requires_grad``; it is set back on exit."""
    layers = list(adapter_layers(module).values())
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield module
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class AdapterOffModel:
    """A frozen role read from a LoRA engine with its adapter off: what ``HybridEngine.log_probs``
    takes for a reference (a callable forward and the Hugging Face ``module``), without a second copy
    of the model. The forward runs through the DeepSpeed engine (ZeRO-3 gathers) without gradients."""

    def __init__(self, engine):
        self.engine = engine
        self.module = engine.module

    def __call__(self, **inputs):
        with torch.no_grad(), adapters_disabled(self.module):
            return self.engine(**inputs)


def parameter_units(module: torch.nn.Module) -> list:
    """The parameters of ``module`` grouped so that a LoRA layer's base weight, bias and adapter
    matrices come together: ``[(layer or None, [(name, param), ...]), ...]`` in parameter order."""
    layers = adapter_layers(module)
    units, by_layer = [], {}
    for name, param in module.named_parameters():
        owner = next((prefix for prefix in _prefixes(name) if prefix in layers), None)
        if owner is None:
            units.append((None, [(name, param)]))
        elif owner in by_layer:
            by_layer[owner][1].append((name, param))
        else:
            by_layer[owner] = (layers[owner], [(name, param)])
            units.append(by_layer[owner])
    return units


def _prefixes(name: str):
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        yield ".".join(parts[:end])


def delta_weight(layer) -> torch.Tensor:
    """``(alpha / r) B A`` of a LoRA layer in float32 (PEFT's ``get_delta_weight`` keeps a GPU's bf16),
    transposed for a ``fan_in_fan_out`` layer; other LoRA variants (DoRA, ...) through PEFT."""
    if getattr(layer, "use_dora", {}).get(ADAPTER_NAME, False) or not hasattr(layer, "fan_in_fan_out"):
        return layer.get_delta_weight(ADAPTER_NAME).float()
    a = layer.lora_A[ADAPTER_NAME].weight.float()
    b = layer.lora_B[ADAPTER_NAME].weight.float()
    delta = (b @ a) * layer.scaling[ADAPTER_NAME]
    return delta.T if layer.fan_in_fan_out else delta


def merged_unit(layer, named: list, merge: bool = True) -> list:
    """``[(hf_name, tensor)]`` of one unit whose parameters are whole (gathered): a LoRA layer's
    base weight with ``(alpha / r) B A`` added in float32 and cast back (``merge=False``: the base
    weight alone), its bias as it is; no adapter matrices. New tensors (the module's own are not
    touched)."""
    out = []
    for name, param in named:
        if is_adapter_weight(name):
            continue
        value = param.data.detach()
        if merge and layer is not None and name.endswith(BASE_LAYER + ".weight") and ADAPTER_NAME in layer.lora_A:
            value = (value.float() + delta_weight(layer)).to(value.dtype)
        else:
            value = value.clone()
        out.append((plain_name(name), value))
    return out


def iter_merged_weights(module: torch.nn.Module, zero3: bool, bucket_bytes: float, merge: bool = True):
    """``(hf_name, full tensor)`` of every weight of ``module`` as the plain model would hold it
    (LoRA merged in, out of place), gathered from ZeRO-3 a bucket of whole units at a time (about
    ``bucket_bytes``; a LoRA layer's weights always in one gather); every rank must consume it in
    lock-step. Without LoRA, the parameters themselves (no copy) when not partitioned.
    ``merge=False`` gives the frozen base alone (the push's negative control in the tests)."""
    import deepspeed

    units = parameter_units(module)
    if not zero3:
        for layer, named in units:
            if layer is None:
                yield from ((name, param.data) for name, param in named)
            else:
                yield from merged_unit(layer, named, merge)
        return
    bucket, size = [], 0
    for index, unit in enumerate(units):
        bucket.append(unit)
        size += sum(param.ds_numel * param.element_size() for _, param in unit[1])
        if size >= bucket_bytes or index == len(units) - 1:
            with deepspeed.zero.GatheredParameters([param for _, named in bucket for _, param in named]):
                tensors = [pair for layer, named in bucket for pair in merged_unit(layer, named, merge)]
            yield from tensors
            bucket, size = [], 0


def adapter_state_dict(module: torch.nn.Module, zero3: bool, extra: tuple = ()) -> dict:
    """The adapter in PEFT's saved format on rank 0 (``base_model.model.<name>.lora_A.weight``), plus
    the whole weights named in ``extra`` (a discriminator's ``score.weight``), gathered from ZeRO-3;
    every rank must call it."""
    import deepspeed

    from gadchat import runtime

    state = {}
    for name, param in module.named_parameters():
        if not (is_adapter_weight(name) or name in extra):
            continue
        context = deepspeed.zero.GatheredParameters([param]) if zero3 else contextlib.nullcontext()
        with context:
            if runtime.is_rank0():
                state["base_model.model." + name.replace(ADAPTER_KEY + ".", ".")] = param.data.detach().cpu().clone()
    return state


def save_adapter_folder(state: dict, config, out: Path, base_model: str) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` (PEFT's folder, loadable with
    ``PeftModel.from_pretrained(base, out)``); rank 0 only."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "adapter_model.safetensors"))
    config.base_model_name_or_path = base_model
    config.save_pretrained(str(out))


def same_digest(a: float, b: float) -> bool:
    """Two weight digests of the same weights: equal up to the float64 rounding of another summation
    order (another partitioning over ranks); a different model differs far more."""
    import math

    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def weight_digest(named) -> float:
    """``sum(w) + sum(w^2)`` in float64 over ``(name, tensor)`` pairs (``HybridEngine.param_digest``'s figure)."""
    total = 0.0
    for _, tensor in named:
        values = tensor.detach().double().reshape(-1)
        total += float(values.sum() + (values * values).sum())
    return total


def merged_from_checkpoint(trained: dict, record: dict, which: str, meta_config, seqcls: bool) -> dict:
    """The merged weights of a LoRA role from its checkpoint, offline on CPU: ``trained`` holds what
    the checkpoint saved (the adapter, a discriminator's head) under the module's names; the frozen
    base is loaded again from ``record["base"]`` (the model the run started from, in the run's dtype)
    and must have the weight digest recorded at training time."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from gadchat.config import ActorConfig
    from gadchat.safe_load import CheckpointError

    base = record.get("base")
    cls = AutoModelForSequenceClassification if seqcls else AutoModelForCausalLM
    dtype = getattr(torch, record.get("dtype", "float32"))
    try:
        model = cls.from_pretrained(base, config=meta_config, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"the {which} checkpoint holds a LoRA adapter only; its base model {base!r} cannot be "
                              f"loaded ({exc}); export from the machine that has it") from None
    section = ActorConfig(lora_rank=record["rank"], lora_alpha=record["alpha"], lora_target_modules=record["targets"])
    add_adapter(model, section, which, seed=0, seqcls=seqcls)
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    if "base_digest" in record and not same_digest(weight_digest(frozen), record["base_digest"]):
        raise CheckpointError(f"the {which} adapter was trained on another base than {base} (weight digest "
                              f"{record['base_digest']!r} recorded, {weight_digest(frozen)!r} now)")
    needed = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n in needed if n not in trained]
    if missing:
        raise CheckpointError(f"the {which} checkpoint lacks {len(missing)} adapter weights, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in trained:
                param.copy_(trained[name].to(param.dtype))
    return {name: tensor.float() for name, tensor in iter_merged_weights(model, zero3=False, bucket_bytes=0)}


def lora_record(section) -> dict:
    """What a checkpoint records of a role's LoRA (compared at resume); ``section`` None or of rank 0:
    full fine-tuning."""
    if section is None or section.lora_rank <= 0:
        return {"rank": 0}
    return {"rank": section.lora_rank, "alpha": section.lora_scaling_alpha,
            "targets": section.lora_target_modules}
