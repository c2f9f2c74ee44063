"""The hybrid engine: actor, reference and discriminator as DeepSpeed engines plus a colocated
rollout engine whose weights follow the actor.

SPMD: every rank builds the same engines; ZeRO-3 shards live on all ranks and every collective
(parameter gathers, the weight push) runs in lock-step. The engine provides the primitives the
stage loops in :mod:`gadchat.trainer` are written with: ``generate``, ``sync_rollout_weights``,
per-token log-probs, discriminator scores, and ``accumulate`` (micro-batched backward with one
optimizer step).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from gadchat import runtime
from gadchat.config import GADConfig, parse_betas
from gadchat.losses import chunked_token_log_probs, token_entropy, token_log_probs
from gadchat.models import (attn_implementation, eos_token_ids, load_causal_lm, load_discriminator,
                            load_generation_config, load_tokenizer, resolve_model_path)
from gadchat.rollout import HFRollout, VLLMRollout, choose_backend

logger = logging.getLogger(__name__)


class PhaseTimer:
    """Wall time per named phase; ``timings()`` returns and clears them (seconds).

    On a GPU it also records each phase's peak GPU memory: ``mem/<phase>_peak_gib`` (the torch
    allocator's peak during the phase, vLLM's weights and KV cache included) and
    ``mem/<phase>_device_gib`` (the device's used memory at the end of the phase, every allocator)."""

    def __init__(self):
        self._times = defaultdict(float)
        self._memory = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        cuda = runtime.has_cuda()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize()
            self._times[name] += time.perf_counter() - start
            if cuda:
                free, total = torch.cuda.mem_get_info()
                peak = torch.cuda.max_memory_allocated() / 2**30
                self._memory[f"mem/{name}_peak_gib"] = max(peak, self._memory.get(f"mem/{name}_peak_gib", 0.0))
                self._memory[f"mem/{name}_device_gib"] = (total - free) / 2**30

    def timings(self) -> dict:
        out = {f"time/{k}": v for k, v in self._times.items()}
        out.update(self._memory)
        self._times.clear()
        self._memory.clear()
        return out


@dataclass
class SequenceBatch:
    """Right-padded ``prompt ++ response`` sequences.

    ``response_mask[b, t] = 1`` where token ``t`` belongs to the response (up to and including its
    EOS); ``last_index[b]`` is the position of the last valid token, where the discriminator scores.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    last_index: torch.Tensor

    @classmethod
    def build(cls, prompts: list, responses: list, pad_token_id: int) -> "SequenceBatch":
        lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
        width = max(lengths)
        size = len(prompts)
        input_ids = torch.full((size, width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((size, width), dtype=torch.long)
        response_mask = torch.zeros((size, width), dtype=torch.float32)
        for row, (prompt, response) in enumerate(zip(prompts, responses)):
            input_ids[row, : lengths[row]] = torch.tensor(list(prompt) + list(response), dtype=torch.long)
            attention_mask[row, : lengths[row]] = 1
            response_mask[row, len(prompt) : lengths[row]] = 1.0
        last_index = torch.tensor(lengths, dtype=torch.long) - 1
        return cls(input_ids, attention_mask, response_mask, last_index)

    def __len__(self):
        return self.input_ids.shape[0]

    def slice(self, start: int, end: int) -> "SequenceBatch":
        """Rows ``start:end``, trimmed to their own longest sequence."""
        width = int(self.last_index[start:end].max().item()) + 1
        return SequenceBatch(
            self.input_ids[start:end, :width],
            self.attention_mask[start:end, :width],
            self.response_mask[start:end, :width],
            self.last_index[start:end],
        )

    def with_final_token(self, eos_ids, canonical: int) -> "SequenceBatch":
        """A copy whose last valid token is ``canonical`` wherever it is one of ``eos_ids``: the
        discriminator then scores every sequence ending in any EOS of the set (a student sample
        may stop on ``<|endoftext|>``) on the same token as the teacher sequences."""
        rows = torch.arange(len(self))
        last = self.input_ids[rows, self.last_index]
        hit = torch.isin(last, torch.tensor(sorted(eos_ids), dtype=last.dtype, device=last.device)) & (last != canonical)
        if not bool(hit.any()):
            return self
        input_ids = self.input_ids.clone()
        input_ids[rows[hit], self.last_index[hit]] = canonical
        return SequenceBatch(input_ids, self.attention_mask, self.response_mask, self.last_index)

    def to(self, dev) -> "SequenceBatch":
        return SequenceBatch(*(t.to(dev) for t in (self.input_ids, self.attention_mask, self.response_mask, self.last_index)))

    @property
    def target_mask(self) -> torch.Tensor:
        """Response mask aligned with next-token log-probs (positions ``1..T-1``)."""
        return self.response_mask[:, 1:]


def deepspeed_config(cfg: GADConfig, lr_section, train: bool, dtype: torch.dtype) -> dict:
    """DeepSpeed JSON for one engine; a user's ``deepspeed.config_file`` wins on what it sets."""
    ds = cfg.deepspeed
    # ZeRO-1/2 partition optimizer states and gradients, which a frozen model (reference, frozen
    # discriminator) has none of; DeepSpeed refuses them without an optimizer, so such engines run
    # at stage 0 (ZeRO-3 still partitions their weights).
    stage = ds.zero_stage if train or ds.zero_stage == 3 else 0
    zero = {"stage": stage, "stage3_param_persistence_threshold": 1e4, "stage3_max_live_parameters": 3e7,
            "stage3_prefetch_bucket_size": 3e7, "reduce_bucket_size": 5e7}
    if ds.offload_param and ds.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": runtime.has_cuda()}
    if ds.offload_optimizer and train and stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": runtime.has_cuda()}
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if train:
        config["gradient_clipping"] = lr_section.grad_clip
    if ds.config_file:
        path = Path(ds.config_file)
        if not path.exists():
            raise FileNotFoundError(f"deepspeed.config_file not found: {path}")
        user = json.loads(path.read_text())
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            user.pop(key, None)  # batch geometry is the trainer's: prompts_per_step, n, micro_batch_size
        if not train:
            user.pop("optimizer", None)
            user.pop("scheduler", None)
            user.get("zero_optimization", {}).pop("offload_optimizer", None)
        config.update(user)
    return config


def _optimizer(params, section):
    kwargs = dict(lr=section.lr, betas=parse_betas(section.betas), weight_decay=section.weight_decay)
    if runtime.has_cuda():
        kwargs["fused"] = True
    return torch.optim.AdamW(params, **kwargs)


class HybridEngine:
    """Holds ``actor``, ``ref``, ``discriminator`` (DeepSpeed engines) and ``rollout`` for one stage."""

    def __init__(self, cfg: GADConfig, rank: int, world_size: int, need_discriminator: bool = True,
                 need_ref: bool | None = None, actor_path: str | None = None, discriminator_path: str | None = None):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.timer = PhaseTimer()
        self.device = runtime.device()
        self.dtype = runtime.resolve_dtype(cfg.model.dtype)
        self.zero3 = cfg.deepspeed.zero_stage == 3
        m = cfg.model
        self.actor_path = resolve_model_path(actor_path or m.actor_path)
        self.tokenizer_path = resolve_model_path(m.tokenizer_path) if m.tokenizer_path else self.actor_path
        self.tokenizer = load_tokenizer(self.tokenizer_path, m.trust_remote_code)
        self.pad_token_id = self.tokenizer.pad_token_id
        # One EOS set for both rollout backends, the trimmer and the scorer: the tokenizer's EOS plus
        # the model's generation-config EOS ids (Qwen2.5-Instruct: <|im_end|> and <|endoftext|>).
        self.eos_ids = set(eos_token_ids(self.tokenizer, load_generation_config(self.actor_path)))
        attn = attn_implementation(m.attn_implementation)

        with self.timer("init_models"):
            actor_model = self._load(lambda: load_causal_lm(self.actor_path, self.dtype, attn, m.gradient_checkpointing,
                                                            m.trust_remote_code), cfg.actor, train=True)
            self.actor = self._initialize(actor_model, cfg.actor, train=True)
            if need_ref is None:
                need_ref = cfg.actor.kl_coef > 0 and cfg.trainer.stage != "seqkd"
            self.ref = None
            if need_ref:
                ref_model = self._load(lambda: load_causal_lm(self.actor_path, self.dtype, attn, False, m.trust_remote_code),
                                       cfg.actor, train=False)
                ref_model.requires_grad_(False)
                self.ref = self._initialize(ref_model, cfg.actor, train=False)
                self.ref.eval()
            self.discriminator, self.discriminator_trainable = None, False
            if need_discriminator:
                path = resolve_model_path(discriminator_path or m.discriminator_path or self.actor_path)
                discriminator_model = self._load(
                    lambda: load_discriminator(path, self.pad_token_id, self.dtype, attn, cfg.discriminator.head_init_std,
                                               cfg.trainer.seed, m.gradient_checkpointing, m.trust_remote_code,
                                               pooling=cfg.discriminator.pooling),
                    cfg.discriminator, train=True)
                trainable = not (cfg.discriminator.freeze and cfg.trainer.stage == "gad")
                if not trainable:
                    discriminator_model.requires_grad_(False)
                self.discriminator = self._initialize(discriminator_model, cfg.discriminator, train=trainable)
                self.discriminator_trainable = trainable

        self.backend = choose_backend(cfg.rollout.backend)
        self.rollout = None
        self._rollout_needs_sync = False

    # ------------------------------------------------------------------------------------------
    # construction

    def _load(self, build, section, train: bool):
        """Build a model; under ZeRO-3 it is built partitioned (``zero.Init`` through transformers)."""
        if not self.zero3:
            return build()
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(deepspeed_config(self.cfg, section, train, self.dtype))  # noqa: F841
        try:
            return build()
        finally:
            del keep_alive

    def _initialize(self, model, section, train: bool):
        import deepspeed

        config = deepspeed_config(self.cfg, section, train, self.dtype)
        if train:
            params = [p for p in model.parameters() if p.requires_grad]
            engine, *_ = deepspeed.initialize(model=model, optimizer=_optimizer(params, section), config=config)
        else:
            engine, *_ = deepspeed.initialize(model=model, config=config)
        return engine

    def build_rollout(self):
        """Create the rollout backend (vLLM is started after the DeepSpeed engines, as in verl)."""
        r, m, t = self.cfg.rollout, self.cfg.model, self.cfg.trainer
        with self.timer("init_rollout"):
            if self.backend == "vllm":
                self.rollout = VLLMRollout(
                    self.actor_path, self.tokenizer_path, self.dtype,
                    max_model_len=self.cfg.data.max_prompt_tokens + r.max_new_tokens,
                    eos_ids=self.eos_ids, seed=t.seed + self.rank,
                    gpu_memory_utilization=r.vllm_gpu_memory_utilization,
                    tensor_parallel_size=r.tensor_parallel_size, enforce_eager=r.enforce_eager,
                    trust_remote_code=m.trust_remote_code, sleep_between_rollouts=r.vllm_sleep)
                self._rollout_needs_sync = True
            else:
                self.rollout = self.actor_generator()
        return self.rollout

    def actor_generator(self) -> HFRollout:
        """transformers ``generate`` on the training actor (ZeRO-3-safe with several ranks)."""
        return HFRollout(self.actor, self.pad_token_id, self.eos_ids, synced_gpus=self.zero3 and self.world_size > 1,
                         micro_batch_size=self.cfg.rollout.hf_micro_batch_size)

    # ------------------------------------------------------------------------------------------
    # rollout

    def mark_actor_updated(self):
        self._rollout_needs_sync = self.backend == "vllm"

    def iter_actor_weights(self):
        """``(hf_name, full_tensor)`` for every actor parameter, gathered from ZeRO-3 in buckets of
        ``rollout.sync_bucket_mb``; all ranks must consume it in lock-step."""
        import deepspeed

        named = list(self.actor.module.named_parameters())
        if not self.zero3:
            for name, param in named:
                yield name, param.data
            return
        budget = self.cfg.rollout.sync_bucket_mb * 2**20
        bucket, size = [], 0
        for index, (name, param) in enumerate(named):
            bucket.append((name, param))
            size += param.ds_numel * param.element_size()
            if size >= budget or index == len(named) - 1:
                with deepspeed.zero.GatheredParameters([p for _, p in bucket]):
                    tensors = [(n, p.data.detach().clone()) for n, p in bucket]
                yield from tensors
                bucket, size = [], 0

    def sync_rollout_weights(self, force: bool = False):
        """Push the actor's current weights into vLLM (in place) when they changed."""
        if self.rollout is None or self.backend != "vllm" or not (self._rollout_needs_sync or force):
            return
        with self.timer("weight_sync"):
            self.rollout.load_weights(self.iter_actor_weights())
        self._rollout_needs_sync = False

    def generate(self, prompts: list, seed: int, greedy: bool = False, n: int | None = None, max_new_tokens: int | None = None):
        if self.rollout is None:
            self.build_rollout()
        self.sync_rollout_weights()
        r = self.cfg.rollout
        with self.timer("generate"):
            return self.rollout.generate(prompts, n=n or r.n, temperature=r.temperature, top_p=r.top_p,
                                         max_new_tokens=max_new_tokens or r.max_new_tokens, seed=seed, greedy=greedy)

    # ------------------------------------------------------------------------------------------
    # forward passes

    def log_probs(self, engine, batch: SequenceBatch, with_entropy: bool = False, temperature: float = 1.0):
        """Next-token log-probs ``[B, T-1]`` of ``batch`` under ``engine`` (and entropies), both in
        float32 on ``logits / temperature``.

        With ``actor.logprob_chunk_tokens > 0`` (and a model whose forward takes ``logits_to_keep``)
        the full ``[B, T, V]`` logits are never built: the backbone's final hidden states at the
        response positions go through the LM head ``logprob_chunk_tokens`` rows at a time
        (:func:`gadchat.losses.chunked_token_log_probs`) and positions outside the response mask
        are 0. Otherwise (0) the plain path: full logits, then :func:`token_log_probs`."""
        return sequence_log_probs(engine, engine.module, batch.to(self.device), self.cfg.actor.logprob_chunk_tokens,
                                  temperature, with_entropy)

    @torch.no_grad()
    def log_probs_no_grad(self, engine, batch: SequenceBatch, micro_batch_size: int, temperature: float = 1.0) -> torch.Tensor:
        """Log-probs of the whole batch in micro-batches, padded back to the batch width."""
        out = torch.zeros(batch.input_ids.shape[0], batch.input_ids.shape[1] - 1)
        for start in range(0, len(batch), micro_batch_size):
            part = batch.slice(start, start + micro_batch_size)
            values, _ = self.log_probs(engine, part, temperature=temperature)
            out[start : start + len(part), : values.shape[1]] = values.float().cpu()
        return out

    def scores(self, batch: SequenceBatch) -> torch.Tensor:
        """Discriminator scores at the last valid token, any EOS of the set read as the tokenizer's."""
        batch = batch.with_final_token(self.eos_ids, self.tokenizer.eos_token_id).to(self.device)
        return self.discriminator(batch.input_ids, batch.attention_mask, batch.last_index, batch.response_mask)

    @torch.no_grad()
    def scores_no_grad(self, batch: SequenceBatch, micro_batch_size: int) -> torch.Tensor:
        return torch.cat([self.scores(batch.slice(s, s + micro_batch_size)).float().cpu()
                          for s in range(0, len(batch), micro_batch_size)])

    # ------------------------------------------------------------------------------------------
    # optimisation

    @staticmethod
    def accumulate(engine, micro_steps: list) -> float:
        """Run each closure of ``micro_steps`` (a forward that returns its micro-batch's share of
        the batch loss), backward it, and take one optimizer step at the last one; returns the
        batch loss. Gradient-accumulation boundaries are set by hand, so the number of
        micro-batches may vary from step to step.

        The model is in training mode for the update (transformers checkpoints activations only
        when ``training`` is true; dropout, where a model has any) and back in eval mode after it:
        rollouts, reference, old-log-prob and scoring passes run in eval mode, as in verl."""
        if not micro_steps:
            raise ValueError("accumulate() needs at least one micro-batch")
        total = 0.0
        engine.train()
        try:
            for index, forward in enumerate(micro_steps):
                engine.set_gradient_accumulation_boundary(index == len(micro_steps) - 1)
                loss = forward()
                engine.backward(loss, scale_wrt_gas=False)
                total += float(loss.detach())
            engine.step()
        finally:
            engine.eval()
        return total

    @torch.no_grad()
    def param_digest(self, engine) -> float:
        """``sum(w) + sum(w^2)`` over every weight in float64, summed over the ZeRO-3 shards: equal
        digests mean untouched weights (a changed float never cancels out exactly in practice)."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for param in engine.module.parameters():
            data = param.ds_tensor if hasattr(param, "ds_tensor") else param.data
            values = data.double()
            total += values.sum() + (values * values).sum()
        if self.zero3 and self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(total)
        return float(total)

    @torch.no_grad()
    def rollout_matches_actor(self, prompts: list, max_new_tokens: int) -> float:
        """Fraction of ``prompts`` on which the rollout engine's greedy continuation equals the
        actor's own (transformers ``generate`` on the DeepSpeed module)."""
        return self.rollout_sync_check(prompts, max_new_tokens)["debug/rollout_greedy_match"]

    @torch.no_grad()
    def rollout_sync_check(self, prompts: list, max_new_tokens: int) -> dict:
        """Debug metrics of the weight push (every rank must call it):

        - ``debug/rollout_greedy_match``: fraction of prompts whose vLLM greedy continuation equals
          the actor's own (transformers ``generate`` on the DeepSpeed module);
        - ``debug/rollout_greedy_logprob_gap``: the vLLM greedy tokens teacher-forced through the
          actor, ``max_t (max_v log p(v) - log p(token_t))`` over the response positions. vLLM took
          the argmax of its own logits at every position, so with the actor's weights this is 0 up
          to kernel rounding (fp32 ~1e-6; bf16 ~1e-2, where a near tie can flip a greedy token and
          the match fall below 1 with a correct push); stale or wrong weights give a large gap.
        """
        if self.backend != "vllm":
            return {"debug/rollout_greedy_match": 1.0, "debug/rollout_greedy_logprob_gap": 0.0}
        self.sync_rollout_weights()
        rollout = self.rollout.generate(prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens,
                                        seed=0, greedy=True)
        actor = self.actor_generator().generate(prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens,
                                                seed=0, greedy=True)
        match = sum(a[0] == b[0] for a, b in zip(rollout, actor)) / max(1, len(prompts))
        batch = SequenceBatch.build(prompts, [r[0] for r in rollout], self.pad_token_id)
        gap = 0.0
        mb = max(1, self.cfg.actor.micro_batch_size)
        for start in range(0, len(batch), mb):  # the same number of forwards on every rank (ZeRO-3)
            part = batch.slice(start, start + mb).to(self.device)
            logits = self.actor(input_ids=part.input_ids, attention_mask=part.attention_mask).logits[:, :-1].float()
            log_probs = torch.log_softmax(logits, dim=-1)
            picked = log_probs.gather(-1, part.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            gaps = (log_probs.max(dim=-1).values - picked) * part.target_mask
            gap = max(gap, float(gaps.max()) if gaps.numel() else 0.0)
        return {"debug/rollout_greedy_match": match, "debug/rollout_greedy_logprob_gap": gap}

    def eval_mode(self):
        for engine in (self.actor, self.discriminator):
            if engine is not None:
                engine.eval()


def sequence_log_probs(call, module, batch: SequenceBatch, chunk_tokens: int, temperature: float = 1.0,
                       with_entropy: bool = False):
    """Next-token log-probs ``[B, T-1]`` (and entropies or None) of ``batch`` on ``logits /
    temperature`` in float32. ``call`` runs the forward (a DeepSpeed engine, or the model itself),
    ``module`` is the Hugging Face causal LM inside it. ``chunk_tokens > 0``: chunked path over the
    response positions (0 elsewhere); 0, or a model without ``logits_to_keep``: plain path."""
    labels = batch.input_ids[:, 1:]
    head = module.get_output_embeddings() if chunk_tokens > 0 and hasattr(module, "get_output_embeddings") else None
    if head is None or not _takes_logits_to_keep(module):
        logits = call(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        log_probs = token_log_probs(logits, labels, temperature)
        entropy = token_entropy(logits, temperature) if with_entropy else None
        return log_probs, entropy
    hidden = _final_hidden_states(call, module, batch)[:, :-1]
    positions = batch.target_mask > 0
    values, entropy = _head_log_probs(head, hidden[positions], labels[positions], chunk_tokens, temperature,
                                      with_entropy)
    log_probs = values.new_zeros(positions.shape)
    log_probs[positions] = values
    if entropy is not None:
        full = entropy.new_zeros(positions.shape)
        full[positions] = entropy
        entropy = full
    return log_probs, entropy


def _takes_logits_to_keep(module) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _final_hidden_states(call, module, batch: SequenceBatch) -> torch.Tensor:
    """The backbone's final (normed) hidden states ``[B, T, H]``, from the engine's own forward.

    The forward runs through the DeepSpeed engine (ZeRO-3 hooks, the root module's step
    bookkeeping) with ``logits_to_keep=1`` (logits of one position only); a forward hook on the
    decoder (registered after DeepSpeed's, so it sees the output as DeepSpeed passes it on) keeps
    its ``last_hidden_state``. No per-layer hidden states are retained."""
    decoder = module.get_decoder()
    captured = []

    def keep(_module, _inputs, output):
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = decoder.register_forward_hook(keep)
    try:
        call(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[-1]


def _head_log_probs(head, hidden, labels, chunk_tokens: int, temperature: float, with_entropy: bool):
    """Chunked log-probs in ONE call of the LM head module.

    Under ZeRO-3 the head's weight (tied to the embedding or not) is gathered by DeepSpeed's hooks
    around a module call, and again before that call's backward. Calling the module once per
    micro-batch, with the chunk loop inside its forward, keeps the number of module calls the
    same on every rank (the chunk count is not: ranks hold different response lengths), which
    ZeRO-3's recorded module trace requires, and the per-chunk recomputation in the backward runs
    while the weight is gathered for that module's backward."""
    plain_forward = type(head).forward

    def chunked_forward(h, y):
        values, entropy = chunked_token_log_probs(lambda part: plain_forward(head, part), h, y, chunk_tokens,
                                                  temperature, with_entropy)
        return (values,) if entropy is None else (values, entropy)  # tensors only through DeepSpeed's hooks

    own = head.__dict__.get("forward")
    head.forward = chunked_forward
    try:
        outputs = head(hidden, labels)
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own
    return outputs[0], (outputs[1] if with_entropy else None)
