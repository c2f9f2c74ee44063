"""Shared fixtures: a tiny student built on the spot, and a runner for the real launchers.

Every distributed test goes through the ``deepspeed`` launcher in a subprocess, exactly as a user
runs a step folder; the in-process tests use plain transformers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gadchat.stages import STAGES, step_main

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "cpu_tiny.yaml"
STEP_MAIN = {stage: step_main(stage) for stage in STAGES}
HAS_VLLM = importlib.util.find_spec("vllm") is not None
BACKENDS = [pytest.param("vllm", marks=pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed")), "hf"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env(tmp_cache: Path | None = None) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if tmp_cache is not None:
        env["GADCHAT_CACHE"] = str(tmp_cache)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.pop("LOCAL_RANK", None)
    return env


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from gadchat.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "student")


def launch(stage: str, ranks: int, args: list, cwd: Path = REPO, timeout: int = 600, check: bool = True,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """Run one stage under the ``deepspeed`` launcher with ``ranks`` processes."""
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(free_port()), str(STEP_MAIN[stage]), *map(str, args)]
    result = subprocess.run(command, cwd=cwd, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{stage} with {ranks} rank(s) failed ({result.returncode}):\n"
                             f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
    return result


def launch_probe(script: str, ranks: int, args: list, out: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``tests/scripts/<script>`` (a probe of the engine's state) under the ``deepspeed``
    launcher with ``ranks`` processes and ``PROBE_OUT=out``; a non-zero exit fails the test."""
    env = subprocess_env()
    env["PROBE_OUT"] = str(out)
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
               str(free_port()), str(REPO / "tests" / "scripts" / script), *map(str, args)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-5000:]}\n{result.stderr[-5000:]}"
    return result


def tiny_args(model: Path, output_dir: Path, *extra) -> list:
    return ["--config", TINY_CONFIG, "--model.actor_path", model, "--trainer.output_dir", output_dir,
            "--trainer.progress_bar", "false", "--trainer.tensorboard", "false", *extra]


def read_metrics(output_dir: Path) -> list:
    with open(Path(output_dir) / "metrics.jsonl") as handle:
        return [json.loads(line) for line in handle]


def load_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))
