"""Issue 10: nothing lost, nothing silent. The non-finite guard, checkpoint loading that runs no
code, the atomic final export, no silent overwrite of a run, and clear errors for a full disk.
Real DeepSpeed under its launcher, one rank, the tiny student."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import HAS_VLLM, REPO, launch, read_metrics, subprocess_env, tiny_args

BACKEND = "vllm" if HAS_VLLM else "hf"


def strict_rows(output_dir: Path) -> list:
    """metrics.jsonl parsed as strict JSON: bare NaN / Infinity tokens are errors."""
    def refuse(token):
        raise ValueError(f"bare {token} in metrics.jsonl")
    return [json.loads(line, parse_constant=refuse) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def short_args(model, out, *extra, backend="hf", steps=3):
    return tiny_args(model, out, "--rollout.backend", backend, "--trainer.max_steps", steps,
                     "--trainer.discriminator_warmup", 0, "--deepspeed.zero_stage", 3, *extra)


class Malicious:
    """Unpickling this runs ``touch MARKER``: what a crafted checkpoint file could do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("safety") / "finished"
    launch("warmup", 1, short_args(tiny_model, out, "--trainer.save_every", 1, "--trainer.keep_last", 3))
    return out


# ----------------------------------------------------------------------------------------------
# 1. non-finite guard


@pytest.mark.slow
def test_diverging_run_stops_naming_step_model_and_quantity(tiny_model, tmp_path):
    out = tmp_path / "diverged"
    result = launch("warmup", 1, short_args(tiny_model, out, "--actor.lr", "1e30", backend=BACKEND, steps=4), check=False)
    text = result.stdout + result.stderr
    assert result.returncode != 0, text[-3000:]
    assert "error: step 2: non-finite" in text and "actor" in text, text[-3000:]
    assert "stopping without saving" in text
    assert not (out / "final").exists() and not (out / "final.partial").exists()
    assert not (out / "checkpoints").exists()  # save_every 0: no checkpoint was written over anything
    rows = strict_rows(out)  # valid JSON, no bare NaN
    assert rows[0]["step"] == 1


@pytest.mark.slow
@pytest.mark.skipif(not HAS_VLLM, reason="the NaN-loss path needs vLLM sampling from NaN logits")
def test_skip_mode_counts_steps_deepspeed_skipped(tiny_model, tmp_path):
    out = tmp_path / "skipped"
    launch("warmup", 1, short_args(tiny_model, out, "--actor.lr", "1e30", "--trainer.on_nonfinite", "skip",
                                   backend="vllm", steps=3))
    rows = strict_rows(out)
    assert [r["nonfinite/skipped_step"] for r in rows] == [0.0, 1.0, 1.0]
    assert rows[1]["actor/sft_loss"] is None  # NaN written as null
    assert (out / "final" / "COMPLETE").exists()


# ----------------------------------------------------------------------------------------------
# 2. loading runs no code


@pytest.mark.slow
def test_malicious_rng_state_is_refused_without_running_it(tiny_model, finished_run, tmp_path):
    out = tmp_path / "crafted"
    shutil.copytree(finished_run, out)
    marker = tmp_path / "MARKER"
    latest = (out / "checkpoints" / "latest").read_text().strip()
    torch.save({"python": Malicious(marker)}, out / "checkpoints" / latest / "rng_rank0.pt")
    result = launch("warmup", 1, short_args(tiny_model, out, "--trainer.max_steps", 5), check=False)
    text = result.stdout + result.stderr
    assert result.returncode == 2, text[-3000:]
    assert "rng_rank0.pt: refused to load" in text and "system" in text, text[-3000:]
    assert not marker.exists()


@pytest.mark.slow
def test_malicious_optimizer_state_is_refused_by_deepspeeds_loader(tiny_model, finished_run, tmp_path):
    out = tmp_path / "crafted_optim"
    shutil.copytree(finished_run, out)
    marker = tmp_path / "MARKER"
    latest = (out / "checkpoints" / "latest").read_text().strip()
    optim = sorted((out / "checkpoints" / latest / "actor").glob("*optim_states.pt"))[0]
    torch.save({"optimizer_state_dict": Malicious(marker)}, optim)
    result = launch("warmup", 1, short_args(tiny_model, out, "--trainer.max_steps", 5), check=False)
    text = result.stdout + result.stderr
    assert result.returncode == 2, text[-3000:]
    assert "refused to load" in text and optim.name in text, text[-3000:]
    assert not marker.exists()


def test_offline_export_refuses_a_malicious_file(tmp_path):
    step = tmp_path / "ckpt" / "step_00000001"
    (step / "actor").mkdir(parents=True)
    (step / "actor_hf").mkdir()
    (step / "actor_hf" / "config.json").write_text("{}")
    (step / "trainer_state.json").write_text(json.dumps({"stage": "warmup", "step": 1, "zero_stage": 0}))
    marker = tmp_path / "MARKER"
    torch.save({"module": Malicious(marker)}, step / "actor" / "mp_rank_00_model_states.pt")
    result = subprocess.run([sys.executable, "-m", "inference.export", "--checkpoint", str(step), "--out",
                             str(tmp_path / "out"), "--which", "actor"], cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "refused to load" in result.stderr and "mp_rank_00_model_states.pt" in result.stderr
    assert not marker.exists() and not (tmp_path / "out" / "actor").exists()


def test_safe_load_round_trips_the_rng_state(tmp_path):
    import random

    import numpy as np

    from gadchat import runtime
    from gadchat.checkpoint import safe_torch_load

    runtime.seed_everything(7)
    torch.save(runtime.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    runtime.seed_everything(99)
    runtime.set_rng_state(safe_torch_load(tmp_path / "rng.pt"))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


# ----------------------------------------------------------------------------------------------
# 3. atomic export


@pytest.mark.slow
def test_a_torn_export_is_never_taken_for_a_finished_one(tiny_model, tmp_path):
    out = tmp_path / "torn_export"
    env = subprocess_env()
    env["GADCHAT_KILL_AT"] = "export_wrote_actor:0"
    result = launch("warmup", 1, short_args(tiny_model, out, steps=2), check=False, env=env)
    assert result.returncode != 0
    assert not (out / "final").exists() and (out / "final.partial" / "actor" / "config.json").exists()

    from gadchat.checkpoint import CheckpointError, handoff_paths
    from gadchat.stages.configure import load_config
    from gadchat.stages import RECIPES

    with pytest.raises(CheckpointError, match="no complete export"):
        cfg = load_config(["--trainer.init_from", str(out)], stage="gad")
        handoff_paths(cfg, RECIPES["gad"].roles(cfg))

    result = launch("warmup", 1, short_args(tiny_model, out, steps=2))
    assert "already finished" in result.stdout + result.stderr
    assert (out / "final" / "COMPLETE").exists() and not (out / "final.partial").exists()
    assert (out / "final" / "discriminator" / "model.safetensors").exists()


# ----------------------------------------------------------------------------------------------
# 4. no silent destruction


@pytest.mark.slow
def test_starting_over_a_run_is_refused_and_writes_nothing(tiny_model, finished_run, tmp_path):
    before = {p.relative_to(finished_run): p.stat().st_mtime_ns for p in finished_run.rglob("*") if p.is_file()}
    result = launch("warmup", 1, short_args(tiny_model, finished_run, "--trainer.resume", "none", "--deepspeed.zero_stage", 0),
                    check=False)
    text = result.stdout + result.stderr
    assert result.returncode == 2, text[-3000:]
    assert "already holds a run" in text and "--trainer.overwrite true" in text
    after = {p.relative_to(finished_run): p.stat().st_mtime_ns for p in finished_run.rglob("*") if p.is_file()}
    assert after == before  # not even config.json


@pytest.mark.slow
def test_overwrite_clears_the_old_run(tiny_model, finished_run, tmp_path):
    out = tmp_path / "overwritten"
    shutil.copytree(finished_run, out)
    launch("warmup", 1, short_args(tiny_model, out, "--trainer.resume", "none", "--trainer.overwrite", "true", steps=1))
    assert [r["step"] for r in read_metrics(out)] == [1]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000001"]
    assert (out / "final" / "COMPLETE").exists()


@pytest.mark.slow
def test_a_refused_resume_leaves_config_json_alone(tiny_model, finished_run, tmp_path):
    out = tmp_path / "mismatch"
    shutil.copytree(finished_run, out)
    before = (out / "config.json").read_text()
    result = launch("warmup", 1, short_args(tiny_model, out, "--trainer.seed", 7), check=False)
    assert result.returncode == 2 and "cannot resume" in result.stderr
    assert (out / "config.json").read_text() == before


# ----------------------------------------------------------------------------------------------
# 5. a full disk


def _small_file_limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, like a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))


@pytest.mark.slow
def test_a_full_disk_during_a_save_names_the_folder(tiny_model, tmp_path):
    from conftest import STEP_MAIN, free_port

    out = tmp_path / "full_disk"
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
               str(STEP_MAIN["warmup"]), *map(str, short_args(tiny_model, out, steps=1))]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600,
                            preexec_fn=_small_file_limit)
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert "writing the step-1 checkpoint to" in text and "is the disk full?" in text, text[-3000:]
    assert "GiB free there" in text


def test_free_space_check_names_the_folder_and_sizes(tmp_path):
    from gadchat.checkpoint import CheckpointError, require_free_space

    require_free_space(tmp_path, 1, "a small thing")
    with pytest.raises(CheckpointError, match=r"not enough free disk space for the final export in .*: about \d"):
        require_free_space(tmp_path / "final", 2**60, "the final export")


@pytest.mark.slow
def test_gad_stage_logs_the_models_it_starts_from(tiny_model, finished_run, tmp_path):
    result = launch("gad", 1, short_args(tiny_model, tmp_path / "gad", "--trainer.init_from", finished_run, steps=1))
    text = result.stdout + result.stderr
    assert (f"stage gad: actor trains from {finished_run / 'final' / 'actor'}; discriminator trains from "
            f"{finished_run / 'final' / 'discriminator'}; reference frozen from {finished_run / 'final' / 'actor'}") in text
