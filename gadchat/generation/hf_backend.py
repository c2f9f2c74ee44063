"""The transformers backend: ``generate`` on a model held elsewhere, with no weights of its own.

Colocated with training (the constructor) it generates with the DeepSpeed actor itself, so there are
no weights to push after an update. Under ZeRO-3 it gathers the actor's full weights once per
``generate`` call by default (``gather_weights``: DeepSpeed's ``unwrap_model_for_generation``, the same
as TRL's ``ds3_gather_for_generation``): without it every layer's weights are gathered again at every
decoded token, which made generation 80% of a GAD step on an H200 (benchmarks/RESULTS.md section 12).
Without the gather, several ZeRO-3 ranks use ``synced_gpus=True`` so that ranks that finish early keep
joining the per-layer gathers. For inference,
:meth:`HFBackend.from_model_folder` loads the model folder (or hub id) onto the device. Prompts are
left-padded and generated ``micro_batch_size`` sequences at a time; it streams
(:meth:`HFBackend.stream`).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import torch

from gadchat import runtime
from gadchat.generation.backend import GenerationBackend, seed_generators, trim_at_eos
from gadchat.models import eos_token_ids


class HFBackend(GenerationBackend):
    name = "hf"
    follows_actor = False
    streams = True

    def __init__(self, actor_engine, pad_token_id: int, eos_ids: set, synced_gpus: bool, micro_batch_size: int = 64,
                 gather_weights: bool = False):
        """Colocated with training: ``actor_engine`` is anything with the model as ``.module`` (the
        DeepSpeed engine), read at every call. ``gather_weights``: a ZeRO-3 engine's full weights
        are gathered once per call (one full copy of the model on each rank while it generates)."""
        self.engine = actor_engine
        self.pad_token_id = pad_token_id
        self.eos_ids = set(eos_ids)
        self.gather_weights = gather_weights
        # Gathered weights need no collective inside a forward, so ranks may finish apart.
        self.synced_gpus = synced_gpus and not gather_weights
        self.micro_batch_size = micro_batch_size

    @classmethod
    def from_model_folder(cls, model_path: str, tokenizer, *, dtype: str = "auto", seed: int = 0,
                          trust_remote_code: bool = False, max_model_len: int | None = None, batch_size: int = 16,
                          gpu_memory_utilization: float = 0.85) -> HFBackend:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=runtime.resolve_dtype(dtype), trust_remote_code=trust_remote_code
        ).to(runtime.device())
        model.eval()
        eos = eos_token_ids(tokenizer, model.generation_config)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        return cls(SimpleNamespace(module=model), pad, eos, synced_gpus=False, micro_batch_size=batch_size)

    @contextmanager
    def _generating(self):
        """The module in eval mode with the KV cache on (and, with ``gather_weights``, its ZeRO-3
        weights gathered and the partitioning hooks off); all of it restored after."""
        if self.gather_weights:
            from deepspeed.runtime.zero import unwrap_model_for_generation

            gathered = unwrap_model_for_generation(self.engine)
        else:
            gathered = nullcontext()
        with gathered:
            module = self.engine.module
            was_training = module.training
            module.eval()
            module.config.use_cache = True
            try:
                yield module
            finally:
                module.config.use_cache = False
                module.train(was_training)

    def _sampling_kwargs(self, temperature: float, top_p: float, max_new_tokens: int, greedy: bool) -> dict:
        return dict(
            do_sample=not greedy,
            temperature=None if greedy else temperature,
            top_p=None if greedy else top_p,
            top_k=None,
            max_new_tokens=max_new_tokens,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_token_id,
            synced_gpus=self.synced_gpus,
        )

    @torch.no_grad()
    def generate(self, prompts: list, n: int, temperature: float, top_p: float, max_new_tokens: int,
                 seed: int, greedy: bool = False, progress: bool = False) -> list:
        from tqdm import tqdm

        seed_generators(seed)
        dev = runtime.device()
        per_prompt = 1 if greedy else n
        per_call = max(1, self.micro_batch_size // per_prompt)
        results = []
        with self._generating() as module:
            starts = range(0, len(prompts), per_call)
            for start in tqdm(starts, desc="generate", unit="batch", disable=not progress):
                chunk = prompts[start : start + per_call]
                width = max(len(p) for p in chunk)
                input_ids = torch.full((len(chunk), width), self.pad_token_id, dtype=torch.long)
                attention = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, prompt in enumerate(chunk):  # left padding for generation
                    input_ids[row, width - len(prompt):] = torch.tensor(prompt)
                    attention[row, width - len(prompt):] = 1
                generated = module.generate(input_ids=input_ids.to(dev), attention_mask=attention.to(dev),
                                            num_return_sequences=per_prompt,
                                            **self._sampling_kwargs(temperature, top_p, max_new_tokens, greedy))
                new_tokens = generated[:, width:].tolist()
                for row in range(len(chunk)):
                    samples = [trim_at_eos(tokens, self.eos_ids)[:max_new_tokens]
                               for tokens in new_tokens[row * per_prompt:(row + 1) * per_prompt]]
                    results.append(samples * n if greedy else samples)
        return results

    @torch.no_grad()
    def stream(self, prompt: list, temperature: float, top_p: float, max_new_tokens: int, seed: int,
               greedy: bool, streamer) -> list:
        seed_generators(seed)
        dev = runtime.device()
        with self._generating() as module:
            generated = module.generate(input_ids=torch.tensor([list(prompt)], device=dev),
                                        attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=dev),
                                        streamer=streamer,
                                        **self._sampling_kwargs(temperature, top_p, max_new_tokens, greedy))
        return trim_at_eos(generated[0, len(prompt):].tolist(), self.eos_ids)[:max_new_tokens]

    def close(self) -> None:
        self.engine = None
