"""The hybrid engine: the roles a stage declares (actor, reference, discriminator, teacher) as
DeepSpeed engines, plus a colocated rollout engine whose weights follow the actor.

SPMD: every rank builds the same engines; ZeRO-3 shards live on all ranks and every collective
(parameter gathers, the weight push) runs in lock-step. The engine provides the primitives the
stage recipes in :mod:`gadchat.stages` are written with: ``generate``, per-token log-probs,
discriminator scores, and ``update`` (one optimizer step over a plain loop of micro-batches).
"""

from __future__ import annotations

import logging

import torch

from gadchat import lora
from gadchat import roles as role_kinds
from gadchat import runtime
from gadchat.batch import SequenceBatch
from gadchat.config import GADConfig, parse_betas, read_deepspeed_json
from gadchat.ema import WeightEMA
from gadchat.logprobs import sequence_log_probs
from gadchat.models import (attn_implementation, eos_token_ids, load_causal_lm, load_discriminator,
                            load_generation_config, load_tokenizer, resolve_model_path)
from gadchat.generation import HFBackend, backend_class
from gadchat.timing import PhaseTimer

logger = logging.getLogger(__name__)


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
        user = read_deepspeed_json(ds.config_file)
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


class ModelUpdate:
    """One optimizer step of one model over a plain loop of ``micro_batches`` backward passes::

        with engine.update("actor", len(parts)) as update:
            for part in parts:
                update.backward(loss_of(part))   # the part's share of the batch loss

    The model is in training mode inside the block (transformers checkpoints activations only when
    ``training`` is true; dropout, where a model has any) and back in eval mode after it: rollouts,
    reference, old-log-prob and scoring passes run in eval mode, as in verl. The gradient-accumulation
    boundary is set by hand at the last planned backward, so the number of micro-batches may vary
    from step to step; the optimizer steps when the block ends, then ``after_step`` runs (the
    actor's update marks the rollout engine's weights stale). ``loss`` is the batch loss (the sum
    of the backward losses)."""

    def __init__(self, engine, micro_batches: int, after_step=None):
        if micro_batches < 1:
            raise ValueError("an update needs at least one micro-batch")
        self.engine, self.planned, self.done, self.loss = engine, micro_batches, 0, 0.0
        self.after_step = after_step

    def __enter__(self) -> "ModelUpdate":
        self.engine.train()
        return self

    def backward(self, loss: torch.Tensor) -> None:
        if self.done == self.planned:
            raise RuntimeError(f"more backward passes than the {self.planned} planned for this update")
        self.engine.set_gradient_accumulation_boundary(self.done == self.planned - 1)
        self.engine.backward(loss, scale_wrt_gas=False)
        self.loss += float(loss.detach())
        self.done += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                if self.done != self.planned:
                    raise RuntimeError(f"{self.done} backward passes for an update planned with {self.planned}")
                self.engine.step()
                if self.after_step is not None:
                    self.after_step()
        finally:
            self.engine.eval()


class HybridEngine:
    """The DeepSpeed engines of a stage's roles (``models[name]``) and its rollout backend."""

    def __init__(self, cfg: GADConfig, rank: int, world_size: int, roles: dict, sources: dict):
        """``roles``: ``{name: Role}`` the stage declared; ``sources``: ``{name: model folder or hub
        id}`` (:func:`gadchat.roles.role_sources`). Models are built in the order of
        :data:`gadchat.roles.ROLE_NAMES` (the discriminator's head draws from the seeded RNG)."""
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.roles = dict(roles)
        self.timer = PhaseTimer()
        self.device = runtime.device()
        self.dtype = runtime.resolve_dtype(cfg.model.dtype)
        self.zero3 = cfg.deepspeed.zero_stage == 3
        m = cfg.model
        self.actor_path = resolve_model_path(sources["actor"])
        self.tokenizer_path = resolve_model_path(m.tokenizer_path) if m.tokenizer_path else self.actor_path
        self.tokenizer = load_tokenizer(self.tokenizer_path, m.trust_remote_code)
        self.pad_token_id = self.tokenizer.pad_token_id
        # One EOS set for both rollout backends, the trimmer and the scorer: the tokenizer's EOS plus
        # the model's generation-config EOS ids (Qwen2.5-Instruct: <|im_end|> and <|endoftext|>).
        self.eos_ids = set(eos_token_ids(self.tokenizer, load_generation_config(self.actor_path)))
        self.models = {}
        self.model_paths = {}
        """``{role: resolved model folder or hub id}`` each role was built from (a LoRA role's base)."""
        with self.timer("init_models"):
            for name in role_kinds.ROLE_NAMES:
                if name == "reference" and self.reference_is_adapter_off:
                    continue  # the actor with its adapter off (lora.AdapterOffModel): one model less
                if name in self.roles:
                    path = self.model_paths[name] = resolve_model_path(sources[name])
                    if name == "teacher":
                        self._check_same_vocabulary(path)
                    self.models[name] = self._build(self.roles[name], path)
        self.actor_ema = WeightEMA(self.actor.module, cfg.actor.ema_decay) \
            if self.trains("actor") and cfg.actor.ema_decay > 0 else None
        self.rollout_class = backend_class(cfg.rollout.backend)  # vLLM (own weights, pushed) or HF (the actor itself)
        self.rollout = None
        self._rollout_needs_sync = False

    # ------------------------------------------------------------------------------------------
    # roles

    @property
    def backend(self) -> str:
        """The rollout backend's name (``vllm`` / ``hf``), for logs."""
        return self.rollout_class.name

    @property
    def actor(self):
        return self.models["actor"]

    @property
    def reference(self):
        """The frozen reference: its own engine, or the LoRA actor with its adapter off."""
        if "reference" in self.roles and self.reference_is_adapter_off:
            return lora.AdapterOffModel(self.actor)
        return self.models.get("reference")

    @property
    def reference_is_adapter_off(self) -> bool:
        """A LoRA actor's reference is the actor with its adapter off: both start from the same
        weights (``roles.role_sources``) and the stage starts a fresh adapter (no refresh, rule in
        ``stages.configure.lora_stage_problems``), so the base weights are the reference's."""
        return self.trains("actor") and self.cfg.actor.lora_rank > 0

    def lora_section(self, name: str):
        """The config section of a trained role's LoRA, or None (full fine-tuning, or frozen)."""
        if not self.trains(name):
            return None
        section = self.optimizer_section(name)
        return section if section.lora_rank > 0 else None

    @property
    def discriminator(self):
        return self.models.get("discriminator")

    @property
    def teacher(self):
        return self.models.get("teacher")

    def trains(self, name: str) -> bool:
        return name in self.roles and self.roles[name].trains

    def trained_models(self) -> dict:
        """``{role: engine}`` of the trained roles (what a checkpoint holds)."""
        return {name: engine for name, engine in self.models.items() if self.roles[name].trains}

    def exported_modules(self) -> dict:
        """``{role: Hugging Face module}`` written by the final export (the next stage's start)."""
        return {name: self.hf_module(name) for name in self.models if self.roles[name].exported}

    def hf_module(self, name: str):
        """The Hugging Face model inside a role's engine (a discriminator's sequence classifier)."""
        module = self.models[name].module
        return module.seqcls if self.roles[name].kind == role_kinds.SCORER else module

    def optimizer_section(self, name: str):
        return getattr(self.cfg, self.roles[name].optimizer_section)

    def update(self, name: str, micro_batches: int) -> ModelUpdate:
        """One optimizer step of the trained role ``name`` over ``micro_batches`` backward passes;
        an actor update that completes marks the rollout engine's weights stale (pushed before the
        next rollout), so no recipe has to remember it."""
        if not self.trains(name):
            raise RuntimeError(f"the {name} role is frozen in this stage")
        return ModelUpdate(self.models[name], micro_batches,
                           after_step=self._after_actor_step if name == "actor" else None)

    def _after_actor_step(self) -> None:
        self.mark_actor_updated()
        if self.actor_ema is not None:
            self.actor_ema.update()

    # ------------------------------------------------------------------------------------------
    # construction

    def _build(self, role, path: str):
        cfg = self.cfg
        m = cfg.model
        attn = attn_implementation(m.attn_implementation)
        section = getattr(cfg, role.optimizer_section) if role.optimizer_section else cfg.actor
        checkpointing = m.gradient_checkpointing and role.trains
        if role.kind == role_kinds.SCORER:
            build = lambda: load_discriminator(path, self.pad_token_id, self.dtype, attn,  # noqa: E731
                                               cfg.discriminator.head_init_std, cfg.trainer.seed,
                                               m.gradient_checkpointing, m.trust_remote_code,
                                               pooling=cfg.discriminator.pooling)
        else:
            build = lambda: load_causal_lm(path, self.dtype, attn, checkpointing, m.trust_remote_code)  # noqa: E731
        model = self._load(build, section, train=role.trains)
        if not role.trains:
            model.requires_grad_(False)
        elif section.lora_rank > 0:
            scorer = role.kind == role_kinds.SCORER
            lora.add_adapter(model.seqcls if scorer else model, section, role.optimizer_section,
                             seed=cfg.trainer.seed + 17 * (1 + role_kinds.ROLE_NAMES.index(role.name)), seqcls=scorer)
        engine = self._initialize(model, section, train=role.trains)
        if not role.trains:
            engine.eval()
        return engine

    def _check_same_vocabulary(self, path: str) -> None:
        """A teacher scores the student's token ids: refuse one whose tokenizer maps text to other
        ids (a folder without a tokenizer is taken on trust)."""
        try:
            theirs = load_tokenizer(path, self.cfg.model.trust_remote_code)
        except (OSError, ValueError):
            return
        if theirs.get_vocab() != self.tokenizer.get_vocab():
            raise ValueError(f"--model.teacher_path {path}: its tokenizer differs from the student's "
                             f"({len(theirs)} vs {len(self.tokenizer)} tokens); the teacher must score the "
                             "student's token ids, so both need the same tokenizer")

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
            if self.rollout_class.follows_actor:
                self.rollout = self.rollout_class(
                    self.actor_path, self.tokenizer_path, self.dtype,
                    max_model_len=self.cfg.data.max_prompt_tokens + r.max_new_tokens,
                    eos_ids=self.eos_ids, seed=t.seed + self.rank,
                    gpu_memory_utilization=r.vllm_gpu_memory_utilization,
                    tensor_parallel_size=r.tensor_parallel_size, enforce_eager=r.enforce_eager,
                    trust_remote_code=m.trust_remote_code, sleep_between_rollouts=r.vllm_sleep)
                runtime.close_before_process_group(self.rollout.close)
                self._rollout_needs_sync = True
            else:
                self.rollout = self.actor_generator()
        return self.rollout

    def actor_generator(self) -> HFBackend:
        """transformers ``generate`` on the training actor (ZeRO-3-safe with several ranks)."""
        r = self.cfg.rollout
        return HFBackend(self.actor, self.pad_token_id, self.eos_ids, synced_gpus=self.zero3 and self.world_size > 1,
                         micro_batch_size=r.hf_micro_batch_size,
                         gather_weights=self.zero3 and r.hf_gather_weights and self.actor.optimizer is not None)

    # ------------------------------------------------------------------------------------------
    # rollout

    def mark_actor_updated(self):
        """The actor's weights changed (an update, a loaded checkpoint): push them before the next rollout."""
        self._rollout_needs_sync = self.rollout_class.follows_actor

    @torch.no_grad()
    def refresh_reference_from_actor(self) -> None:
        """The frozen reference becomes a copy of the actor's current weights (SPIN's iterations).
        Both are built from the same model with the same ZeRO stage and ranks, so each rank copies
        its own partition (``ds_tensor`` under ZeRO-3) without a gather, plus the whole tensor of the
        small parameters ZeRO-3 keeps on every rank (``ds_persist``: the forward reads those directly)."""
        pairs = list(zip(self.reference.module.parameters(), self.actor.module.parameters()))
        for ref, act in pairs:
            if hasattr(act, "ds_tensor"):
                ref.ds_tensor.copy_(act.ds_tensor)
                if getattr(act, "ds_persist", False) and ref.data.numel() == act.data.numel():
                    ref.data.copy_(act.data)  # (not yet fetched there: its first forward gathers ds_tensor)
            else:
                ref.data.copy_(act.data)

    def iter_actor_weights(self):
        """``(hf_name, full_tensor)`` for every weight of the actor as a plain Hugging Face model
        holds it (a LoRA adapter merged in, out of place: :func:`gadchat.lora.iter_merged_weights`),
        gathered from ZeRO-3 in buckets of ``rollout.sync_bucket_mb``; all ranks must consume it in
        lock-step."""
        return lora.iter_merged_weights(self.actor.module, self.zero3, self.cfg.rollout.sync_bucket_mb * 2**20)

    def sync_rollout_weights(self, force: bool = False):
        """Push the actor's current weights into vLLM (in place) when they changed."""
        if self.rollout is None or not self.rollout.follows_actor or not (self._rollout_needs_sync or force):
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
        """Log-probs of the whole batch in micro-batches (``micro_batch_size`` rows, or the
        ``actor.micro_batch_tokens`` budget), padded back to the batch width."""
        out = torch.zeros(batch.input_ids.shape[0], batch.input_ids.shape[1] - 1)
        for rows, part in batch.micro_batches(micro_batch_size, tokens=self.cfg.actor.micro_batch_tokens):
            values, _ = self.log_probs(engine, part, temperature=temperature)
            out[rows, : values.shape[1]] = values.float().cpu()
        return out

    def scores(self, batch: SequenceBatch) -> torch.Tensor:
        """Discriminator scores at the last valid token, any EOS of the set read as the tokenizer's."""
        batch = batch.with_final_token(self.eos_ids, self.tokenizer.eos_token_id).to(self.device)
        return self.discriminator(batch.input_ids, batch.attention_mask, batch.last_index, batch.response_mask)

    @torch.no_grad()
    def scores_no_grad(self, batch: SequenceBatch, micro_batch_size: int) -> torch.Tensor:
        """Scores of the whole batch in micro-batches (``micro_batch_size`` rows, or the
        ``discriminator.micro_batch_tokens`` budget)."""
        out = torch.zeros(len(batch))
        for rows, part in batch.micro_batches(micro_batch_size, tokens=self.cfg.discriminator.micro_batch_tokens):
            out[rows] = self.scores(part).float().cpu()
        return out

    # ------------------------------------------------------------------------------------------
    # checks

    @torch.no_grad()
    def weight_sums(self, engine, frozen_only: bool = False) -> dict:
        """``sum``, ``sum_sq`` and ``nonfinite`` (count of NaN/Inf) over every weight of ``engine`` in
        float64, summed over the ZeRO-3 shards, and ``numel``; every rank gets the same figures.
        ``frozen_only``: the weights that do not train (a LoRA role's base)."""
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)  # sum, sum_sq, nonfinite, digest
        numel = 0
        for param in engine.module.parameters():
            if frozen_only and param.requires_grad:
                continue
            data = param.ds_tensor if hasattr(param, "ds_tensor") else param.data
            numel += int(getattr(param, "ds_numel", param.numel()))
            values = data.float().reshape(-1)
            nonfinite = (~torch.isfinite(values)).sum()
            if nonfinite:
                totals[2] += nonfinite
                values = torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
            values = values.double()
            totals[0] += values.sum()
            totals[1] += torch.dot(values, values)
            totals[3] += values.sum() + (values * values).sum()  # param_digest's own order of sums, kept
        if self.zero3 and self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(totals)
        total, squares, nonfinite, digest = totals.tolist()
        return {"sum": total, "sum_sq": squares, "nonfinite": int(nonfinite), "numel": numel, "digest": digest}

    def param_digest(self, engine, frozen_only: bool = False) -> float:
        """``sum(w) + sum(w^2)`` over every weight in float64, summed over the ZeRO-3 shards: equal
        digests mean untouched weights (a changed float never cancels out exactly in practice)."""
        sums = self.weight_sums(engine, frozen_only)
        return float("nan") if sums["nonfinite"] else sums["digest"]

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
        if not self.rollout_class.follows_actor:
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

    def eval_mode(self) -> None:
        """Every role's model in eval mode (as after each update; for probes and evaluation)."""
        for engine in self.models.values():
            engine.eval()
