"""Checkpoints resume exactly after SIGKILL, survive a kill mid-write, fail clearly when broken, and
export to Hugging Face folders (live and offline from ZeRO-3) that reproduce the engine's outputs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import (HAS_VLLM, REPO, STEP_MAIN, free_port, launch, launch_probe, load_weights, read_metrics,
                      subprocess_env, tiny_args)

STEPS = 6
BACKEND = "vllm" if HAS_VLLM else "hf"


def warmup_args(model, out, *extra):
    return tiny_args(model, out, "--rollout.backend", BACKEND, "--trainer.max_steps", STEPS,
                     "--trainer.discriminator_warmup", 2, "--trainer.save_every", 2, "--trainer.keep_last", 2, *extra)


def comparable(rows):
    """Logged metrics minus wall-clock measurements."""
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in rows]


def assert_same_folder_weights(a, b):
    wa, wb = load_weights(a), load_weights(b)
    assert set(wa) == set(wb)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def launch_and_kill_after(stage, ranks, args, kill_after_step, env=None):
    """Start a run in its own process group and SIGKILL the whole group once ``kill_after_step``
    is logged."""
    out = Path(args[args.index("--trainer.output_dir") + 1])
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
               str(free_port()), str(STEP_MAIN[stage]), *map(str, args)]
    process = subprocess.Popen(command, cwd=REPO, env=env or subprocess_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if (out / "metrics.jsonl").exists() and any(r["step"] >= kill_after_step for r in read_metrics(out)):
                break
            if process.poll() is not None:
                raise AssertionError(f"the run ended (exit {process.returncode}) before step {kill_after_step}")
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert not (out / "final").exists(), "the run finished before it was killed"


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "uninterrupted"
    launch("warmup", 2, warmup_args(tiny_model, out))
    return out


@pytest.mark.slow
def test_warmup_resumes_exactly_after_sigkill(tiny_model, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    launch_and_kill_after("warmup", 2, warmup_args(tiny_model, out), kill_after_step=3)
    launch("warmup", 2, warmup_args(tiny_model, out))  # --trainer.resume auto
    assert comparable(read_metrics(out)) == comparable(read_metrics(uninterrupted))
    assert_same_folder_weights(uninterrupted / "final" / "actor", out / "final" / "actor")
    assert_same_folder_weights(uninterrupted / "final" / "discriminator", out / "final" / "discriminator")
    kept = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert kept == ["step_00000004", "step_00000006"]  # keep_last 2


@pytest.mark.slow
def test_gad_resumes_exactly_after_sigkill(tiny_model, uninterrupted, tmp_path):
    def gad_args(out):
        return tiny_args(tiny_model, out, "--trainer.init_from", uninterrupted, "--rollout.backend", BACKEND,
                         "--trainer.max_steps", 5, "--trainer.save_every", 2)

    reference, out = tmp_path / "gad_full", tmp_path / "gad_killed"
    launch("gad", 2, gad_args(reference))
    launch_and_kill_after("gad", 2, gad_args(out), kill_after_step=3)
    launch("gad", 2, gad_args(out))
    assert comparable(read_metrics(out)) == comparable(read_metrics(reference))
    assert_same_folder_weights(reference / "final" / "actor", out / "final" / "actor")
    assert_same_folder_weights(reference / "final" / "discriminator", out / "final" / "discriminator")


@pytest.mark.slow
def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tiny_model, uninterrupted, tmp_path):
    out = tmp_path / "torn"
    env = subprocess_env()
    env["GADCHAT_KILL_AT"] = "checkpoint_written_before_latest:4"
    result = launch("warmup", 2, warmup_args(tiny_model, out), check=False, env=env)
    assert result.returncode != 0
    root = out / "checkpoints"
    assert (root / "latest").read_text() == "step_00000002"
    assert (root / "step_00000004").is_dir() and not (root / "step_00000004" / "trainer_state.json").exists()
    launch("warmup", 2, warmup_args(tiny_model, out))
    assert comparable(read_metrics(out)) == comparable(read_metrics(uninterrupted))
    assert_same_folder_weights(uninterrupted / "final" / "actor", out / "final" / "actor")


@pytest.mark.slow
def test_finished_stage_says_so(tiny_model, uninterrupted):
    before = read_metrics(uninterrupted)
    result = launch("warmup", 2, warmup_args(tiny_model, uninterrupted, "--rollout.backend", "hf"))
    assert "already finished at step 6/6" in result.stdout + result.stderr
    assert read_metrics(uninterrupted) == before


@pytest.mark.slow
def test_a_run_killed_before_its_export_exports_on_rerun(tiny_model, uninterrupted, tmp_path):
    import shutil

    out = tmp_path / "unexported"
    shutil.copytree(uninterrupted, out)
    shutil.rmtree(out / "final")
    result = launch("warmup", 2, warmup_args(tiny_model, out, "--rollout.backend", "hf"))
    assert "already finished" in result.stdout + result.stderr
    assert_same_folder_weights(uninterrupted / "final" / "actor", out / "final" / "actor")
    assert_same_folder_weights(uninterrupted / "final" / "discriminator", out / "final" / "discriminator")


@pytest.mark.slow
def test_broken_checkpoints_give_clear_errors(tiny_model, uninterrupted, tmp_path):
    import shutil

    def resume_error(out, *extra, ranks=2):
        result = launch("warmup", ranks, warmup_args(tiny_model, out, "--rollout.backend", "hf", *extra), check=False)
        assert result.returncode != 0
        return result.stdout + result.stderr

    missing = resume_error(tmp_path / "fresh", "--trainer.resume", tmp_path / "nowhere", ranks=1)
    assert "no checkpoint there" in missing and "nowhere" in missing

    mismatched = resume_error(uninterrupted, "--trainer.prompts_per_step", 4, ranks=1)
    assert "cannot resume from" in mismatched and "written by 2 ranks, this run has 1" in mismatched
    assert "prompts_per_step was 8, this run has 4" in mismatched

    truncated = tmp_path / "truncated"
    shutil.copytree(uninterrupted, truncated)
    states = sorted((truncated / "checkpoints" / "step_00000006" / "actor").glob("*optim_states.pt"))
    assert states
    with open(states[0], "r+b") as handle:
        handle.truncate(100)
    text = resume_error(truncated)
    assert "truncated or corrupt" in text and "step_00000006" in text

    dangling = tmp_path / "dangling"
    shutil.copytree(uninterrupted, dangling)
    shutil.rmtree(dangling / "checkpoints" / "step_00000006")
    text = resume_error(dangling)
    assert "names 'step_00000006'" in text and "removed or truncated" in text


@pytest.mark.slow
def test_offline_export_equals_live_export_and_engine_outputs(tiny_model, uninterrupted, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    exported = tmp_path / "exported"
    result = subprocess.run([sys.executable, "-m", "inference.export", "--checkpoint", str(uninterrupted),
                             "--out", str(exported)], cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_folder_weights(uninterrupted / "final" / "actor", exported / "actor")
    assert_same_folder_weights(uninterrupted / "final" / "discriminator", exported / "discriminator")

    # The exported actor serves the inference tools (vLLM where installed).
    generations = tmp_path / "generations.jsonl"
    result = subprocess.run([sys.executable, "-m", "inference.batch_generate", "--model", str(exported / "actor"),
                             "--prompts", str(REPO / "data" / "alpaca_eval_gpt4o" / "test.jsonl"), "--limit", "2",
                             "--max-new-tokens", "8", "--output", str(generations)],
                            cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(generations.read_text().splitlines()) == 2
    chat = subprocess.run([sys.executable, "-m", "inference.chat", "--model", str(exported / "actor"), "--backend", "hf",
                           "--max-new-tokens", "8"], input="Hello!\n/exit\n", cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr[-3000:]

    # The engine itself (ZeRO-3, 2 ranks, resumed from the last checkpoint) against the exported folders.
    probe = tmp_path / "probe.pt"
    launch_probe("engine_probe.py", 2, warmup_args(tiny_model, uninterrupted, "--rollout.backend", "hf"), probe, timeout=300)
    engine = torch.load(probe)
    assert engine["step"] == STEPS
    for folder in (uninterrupted / "final", exported):
        actor = AutoModelForCausalLM.from_pretrained(folder / "actor", dtype=torch.float32).eval()
        discriminator = AutoModelForSequenceClassification.from_pretrained(folder / "discriminator", dtype=torch.float32).eval()
        with torch.no_grad():
            logits = actor(input_ids=engine["input_ids"], attention_mask=engine["attention_mask"]).logits
            scores = discriminator(input_ids=engine["input_ids"], attention_mask=engine["attention_mask"]).logits[:, 0]
        mask = engine["attention_mask"].bool()
        assert torch.allclose(logits[mask], engine["logits"][mask], atol=1e-5, rtol=1e-5)
        assert torch.allclose(scores, engine["scores"], atol=1e-5, rtol=1e-5)


def test_offline_export_of_a_broken_checkpoint_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "inference.export", "--checkpoint", str(tmp_path / "nothing"),
                             "--out", str(tmp_path / "x")], cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 2
    assert "no checkpoint found" in result.stderr
