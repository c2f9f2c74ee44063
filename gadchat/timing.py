"""Wall time (and, on a GPU, peak memory) per named phase of a step."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch

from gadchat import runtime


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
