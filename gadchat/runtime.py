"""Process-level set-up shared by every entry point: distributed init, device, dtype, seeding.

Every rank runs the same script (SPMD) under the ``deepspeed`` launcher, ``torchrun``, or alone.
On a machine without a GPU DeepSpeed uses its CPU accelerator and the gloo backend; the JIT build
of its shared-memory all-reduce op (~50 s, only used by inference all-reduce) is skipped
(FEASIBILITY.md).
"""

from __future__ import annotations

import os
import random
import socket
import sys

import numpy as np
import torch


def has_cuda() -> bool:
    return torch.cuda.is_available()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_process_defaults() -> None:
    """Environment defaults that must be in place before DeepSpeed or vLLM are imported."""
    if not has_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # vLLM in-process: the hybrid engine reaches the worker's model to reload weights in place.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed deprecation noise
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(os.path.expanduser("~"), ".cache", "gadchat", "torch_extensions")
    if "RANK" not in os.environ:  # run alone: a world of one, without mpi4py discovery
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _skip_cpu_shm_op() -> None:
    """DeepSpeed's CPU comm backend JIT-builds a shared-memory op at init; training never uses it."""
    import deepspeed.comm.torch  # noqa: F401  (registers the module in sys.modules)

    module = sys.modules["deepspeed.comm.torch"]
    if hasattr(module, "build_shm_op"):
        module.build_shm_op = lambda *args, **kwargs: None


def init_distributed() -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed; returns ``(rank, world_size, local_rank)``."""
    set_process_defaults()
    import deepspeed
    import torch.distributed as dist

    if not has_cuda():
        _skip_cpu_shm_op()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if has_cuda() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if has_cuda():
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), local_rank


def device() -> torch.device:
    if has_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if has_cuda() else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"model.dtype: unknown dtype {name!r} (auto, float32, bfloat16, float16)")
    return table[name]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if has_cuda():
        torch.cuda.manual_seed_all(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if has_cuda():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if has_cuda() and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _same_keys_on_all_ranks(values: dict) -> list:
    """Sorted keys, after checking every rank reduces the same ones (else the reduction would
    silently mix values, or hang)."""
    import zlib

    import torch.distributed as dist

    keys = sorted(values)
    digest = zlib.crc32("\x00".join(keys).encode())
    bounds = torch.tensor([digest, -digest], dtype=torch.float64, device=device())
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
    if bounds[0].item() != digest or -bounds[1].item() != digest:
        raise RuntimeError(f"rank {dist.get_rank()}: metric keys differ between ranks; mine are {keys}")
    return keys


def all_reduce_mean(values: dict) -> dict:
    """Average a dict of floats over the ranks (one collective for the whole dict)."""
    import torch.distributed as dist

    if not values or not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(values)
    keys = _same_keys_on_all_ranks(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device())
    dist.all_reduce(tensor)
    tensor /= dist.get_world_size()
    return {k: v for k, v in zip(keys, tensor.tolist())}
