"""Process-level set-up shared by every entry point: distributed init, device, dtype, seeding.

Every rank runs the same script (SPMD) under the ``deepspeed`` launcher, ``torchrun``, or alone.
On a machine without a GPU DeepSpeed uses its CPU accelerator and the gloo backend; the JIT build
of its shared-memory all-reduce op (~50 s, only used by inference all-reduce) is skipped
(docs/algorithm.md section 8).
"""

from __future__ import annotations

import atexit
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
        if "MASTER_PORT" not in os.environ:
            os.environ.update(MASTER_PORT=str(_free_port()), GADCHAT_OWN_PORT="1")


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
    for attempt in range(3):
        if dist.is_initialized():
            break
        try:
            deepspeed.init_distributed(dist_backend="nccl" if has_cuda() else "gloo")
        except RuntimeError as exc:  # torch's DistNetworkError: the free port we picked was taken since
            if "EADDRINUSE" not in str(exc) or os.environ.get("GADCHAT_OWN_PORT") != "1" or attempt == 2:
                raise
            os.environ["MASTER_PORT"] = str(_free_port())
    if not has_cuda():
        # gloo's worker threads still hold work when the interpreter is torn down unless the group
        # was destroyed first, and the process then dies with SIGABRT ("terminate called without an
        # active exception") after its work is done. Destroying a gloo group is local (no
        # collective), so it is safe on every exit path, error exits included.
        atexit.register(close_process_group)
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
    """Python, NumPy and torch RNG states as tensors and plain numbers only, so the file they are
    saved in loads with ``torch.load(weights_only=True)`` (no pickled objects, no code)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": int(version), "words": torch.tensor(words, dtype=torch.int64),
                        "gauss": gauss},
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if has_cuda():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(w) for w in py["words"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if has_cuda() and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


_BEFORE_CLOSE: list = []


def close_before_process_group(callback) -> None:
    """Run ``callback`` before the process group is destroyed: a colocated vLLM engine, whose own
    groups must be torn down by vLLM while the default group still exists."""
    _BEFORE_CLOSE.append(callback)


def close_process_group() -> None:
    """Close what must go first (:func:`close_before_process_group`), then destroy the default
    process group and every group under it if there is one (local, no collective)."""
    import torch.distributed as dist

    while _BEFORE_CLOSE:
        _BEFORE_CLOSE.pop()()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def finish() -> None:
    """Leave together, then close the process group: the last call of a successful run. A rank
    that exits while another is still in a collective can make gloo abort that one, and a group
    left open can abort the process at interpreter exit (gloo) or warn and hang (NCCL)."""
    barrier()
    close_process_group()


def exit_process(code: int) -> None:
    """End this rank now with ``code``, without the interpreter's teardown: logging and stdio are
    flushed, the process group is closed (local), then ``os._exit``. A rank whose files are
    written and closed loses nothing by skipping finalisation, and finalisation is where a
    finished gloo rank can still die with SIGABRT ("terminate called without an active
    exception") although ``destroy_process_group`` ran: seen twice in CI, once on a probe before
    the group was destroyed and once on a finished stage after (pytorch#190489 is the first case)."""
    import logging

    try:
        close_process_group()
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (one collective; plain ``flag`` when alone)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return bool(flag)
    tensor = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def max_over_ranks(value: int) -> int:
    """The largest of every rank's ``value`` (one collective; ``value`` itself when alone)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return int(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


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


def global_stats(values) -> dict:
    """``mean``, unbiased ``std`` (as ``torch.std``), ``max`` and ``min`` of the values of every rank
    pooled together, not means of per-rank figures; float64, three small collectives (every rank
    must call it). Alone it is the plain statistics of ``values``."""
    import torch.distributed as dist

    local = torch.as_tensor(values, dtype=torch.float64).reshape(-1).cpu()
    together = dist.is_initialized() and dist.get_world_size() > 1
    dev = device()
    inf = float("inf")
    sums = torch.tensor([float(local.numel()), float(local.sum())], dtype=torch.float64, device=dev)
    extremes = torch.tensor([float(local.max()) if local.numel() else -inf,
                             -float(local.min()) if local.numel() else -inf], dtype=torch.float64, device=dev)
    if together:
        dist.all_reduce(sums)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    count, total = sums.tolist()
    mean = total / max(count, 1.0)
    squares = torch.tensor([float(((local - mean) ** 2).sum())], dtype=torch.float64, device=dev)
    if together:
        dist.all_reduce(squares)
    std = (squares.item() / (count - 1)) ** 0.5 if count > 1 else 0.0
    return {"mean": mean, "std": std, "max": extremes[0].item(), "min": -extremes[1].item(), "count": count}


def first_error(message: str | None) -> str | None:
    """The first rank's error message when any rank has one, on every rank (one collective;
    ``message`` itself when alone): so a failure on one rank ends every rank with the same line
    instead of leaving the others waiting in the next collective."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return message
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, message)
    return next((m for m in gathered if m), None)


def raise_together(error: BaseException | None, kind=RuntimeError) -> None:
    """Raise on every rank when any rank met an error: its own ``error``, or ``kind`` with the
    message of the first rank that failed (every rank must call it)."""
    message = first_error(None if error is None else str(error))
    if message is None:
        return
    if error is not None:
        raise error
    raise kind(message)
