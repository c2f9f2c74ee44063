"""An exponential moving average of the actor's trained weights (DeepSpeed-Chat's ``--enable_ema``,
OpenRLHF's ``enable_ema``): after every actor optimizer step ``ema <- d * ema + (1 - d) * w``, starting
from the stage's start weights; under LoRA the trained weights are the adapter's, so the average is
of the adapter and the exported EMA model is the base with the averaged adapter merged in.

Each rank averages what it holds: its ZeRO-3 partition (``ds_tensor``) of every trained parameter,
or the whole parameter without ZeRO-3, in float32; no gather. The averages are saved per rank in
every checkpoint (``ema_rank<R>.pt``) and exported as ``final/actor_ema``, a Hugging Face folder,
by swapping them into the model for the export.
"""

from __future__ import annotations

import contextlib

import torch


def ema_update(average: torch.Tensor, weight: torch.Tensor, decay: float) -> None:
    """In place: ``average <- decay * average + (1 - decay) * weight`` (float32)."""
    average.mul_(decay).add_(weight.float(), alpha=1.0 - decay)


def _local(param) -> torch.Tensor:
    """What this rank holds of ``param``: its ZeRO-3 partition, else the whole tensor."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


class WeightEMA:
    """The moving average of the trained parameters of a DeepSpeed engine's module."""

    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"--actor.ema_decay must be >= 0 and < 1, got {decay!r}")
        self.decay = decay
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.averages = [_local(p).detach().float().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        for average, param in zip(self.averages, self.params):
            ema_update(average, _local(param), self.decay)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "averages": [a.clone() for a in self.averages]}

    def load_state_dict(self, state: dict, where) -> None:
        averages = state["averages"]
        shapes = [tuple(a.shape) for a in self.averages]
        if [tuple(a.shape) for a in averages] != shapes:
            raise ValueError(f"{where}: the EMA was saved for other parameters or another partitioning")
        for mine, saved in zip(self.averages, averages):
            mine.copy_(saved)
        self.updates = int(state["updates"])

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self):
        """The averages in place of the trained weights (every rank together, e.g. for an export),
        the trained weights back afterwards. A ZeRO-3 parameter kept whole on every rank
        (``ds_persist``, already gathered) gets the whole average, gathered from the ranks' parts."""
        kept = []
        for average, param in zip(self.averages, self.params):
            local = _local(param)
            whole = None
            if hasattr(param, "ds_tensor") and param.data.numel() == getattr(param, "ds_numel", -1):
                whole = param.data.clone()
                param.data.copy_(_gather_partitions(average, param).to(param.dtype))
            kept.append((local.clone(), whole))
            local.copy_(average.to(local.dtype))
        try:
            yield
        finally:
            for (local, whole), param in zip(kept, self.params):
                _local(param).copy_(local)
                if whole is not None:
                    param.data.copy_(whole)


def _gather_partitions(partition: torch.Tensor, param) -> torch.Tensor:
    """The whole tensor of ``param``'s shape from every rank's equal-sized partition (ZeRO-3 pads the last)."""
    import torch.distributed as dist

    parts = [torch.empty_like(partition) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, partition.contiguous())
    return torch.cat([p.reshape(-1) for p in parts])[: param.ds_numel].view(param.ds_shape)
