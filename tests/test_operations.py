"""Issue 18: what a week-long run on a shared cluster meets. One run per output folder (a second
is refused naming the holder, writing nothing), SIGTERM to the launcher stops every rank at a step
boundary with a checkpoint and the resume is exact, the NaN guard names only a checkpoint it
verified, a full disk ends every rank with one line and no partial file, and a real multi-node
launch (two launchers, --no_ssh, node ranks 0 and 1) stops on a signal to either launcher, resumes,
checkpoints, exports and leaves a finished run byte-identical; the single-node run, stopped at
another step and resumed, ends exactly as the two-node one (both resumes exact). Real DeepSpeed under its launcher, the tiny student, the seqkd stage
(the cheapest step)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import REPO, STEP_MAIN, free_port, launch, load_weights, read_metrics, subprocess_env, tiny_args

STEPS = 12
SINGLE_NODE = REPO / "training" / "step1_seqkd" / "training_scripts" / "cpu" / "run_tiny.sh"
MULTI_NODE = REPO / "training" / "step1_seqkd" / "training_scripts" / "multi_node" / "run_qwen2.5_7b.sh"


def seqkd_args(model, out, *extra) -> list:
    return [str(a) for a in tiny_args(model, out, "--trainer.max_steps", STEPS, "--trainer.save_every", 6, *extra)]


def comparable(rows):
    """Logged metrics minus wall-clock measurements."""
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in rows]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def start_two_nodes(args: list, folder: Path, **env_extra) -> list:
    """The multi-node step script, started twice on this machine as two nodes of one rank each
    (HOSTFILE with two hosts, NODE_RANK 0 and 1: no ssh), master on 127.0.0.1."""
    hostfile = folder / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    env = dict(subprocess_env(), HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               **env_extra)
    return [subprocess.Popen(["bash", str(MULTI_NODE), *args], cwd=REPO, env=dict(env, NODE_RANK=str(rank)),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
            for rank in (0, 1)]


def finish(nodes: list, timeout: int = 600) -> list:
    """``[(exit status, output)]`` of each node's launcher."""
    results = []
    for node in nodes:
        try:
            out, _ = node.communicate(timeout=timeout)
        finally:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
        results.append((node.returncode, out))
    return results


def run_two_nodes(args: list, folder: Path) -> list:
    return finish(start_two_nodes(args, folder))


def wait_for_rows(out: Path, rows: int, processes: list, deadline: float) -> int:
    """Wait until ``out/metrics.jsonl`` holds ``rows`` steps (while every process runs); the count."""
    while not (out / "metrics.jsonl").exists() or len(read_metrics(out)) < rows:
        assert all(p.poll() is None for p in processes) and time.time() < deadline, "the run ended or stalled"
        time.sleep(0.05)
    return len(read_metrics(out))


def stop_lines(text: str) -> list:
    return [line for line in text.splitlines() if line.startswith("stopped: stopped by SIGTERM at step")]


def stop_step(line: str) -> int:
    return int(line.split("at step ")[1].split("/")[0])


def processes_writing(out: Path) -> list:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if str(out) in " ".join(proc.info["cmdline"] or []) and proc.pid != os.getpid():
                found.append(proc.pid)
        except psutil.Error:
            pass
    return found


@pytest.fixture(scope="module")
def two_node_run(tiny_model, tmp_path_factory):
    """Two launchers, one rank each: SIGTERM to the second node's launcher stops both ranks at a
    step boundary (the first node learns it from the step's collective), then both resume to the end."""
    folder = tmp_path_factory.mktemp("two_nodes")
    out = folder / "run"
    nodes = start_two_nodes(seqkd_args(tiny_model, out), folder, GADCHAT_TEST_STEP_PAUSE="1")
    try:
        logged = wait_for_rows(out, 2, nodes, time.time() + 300)
        os.kill(nodes[1].pid, signal.SIGTERM)
    finally:
        stopped = finish(nodes)
    resumed = run_two_nodes(seqkd_args(tiny_model, out), folder)
    return out, folder, logged, stopped, resumed


@pytest.mark.slow
def test_two_launchers_stop_resume_checkpoint_export_and_leave_a_finished_run_alone(tiny_model, two_node_run):
    out, folder, logged, stopped, resumed = two_node_run
    assert [code for code, _ in stopped] == [143, 143], "\n".join(text[-3000:] for _, text in stopped)
    lines = stop_lines(stopped[0][1]) + stop_lines(stopped[1][1])
    assert len(lines) == 2 and lines[0] == lines[1]  # rank 0 on node 0, rank 1 on node 1: the same step
    stopped_at = stop_step(lines[0])
    assert logged <= stopped_at <= logged + 2 and f"saved {out / 'checkpoints' / f'step_{stopped_at:08d}'}" in lines[0]
    for code, text in resumed:
        assert code == 0, text[-6000:]
    assert f"at step {stopped_at}/{STEPS}" in resumed[0][1]
    assert [r["step"] for r in read_metrics(out)] == list(range(1, STEPS + 1))
    for step in (6, 12):
        state = json.loads((out / "checkpoints" / f"step_{step:08d}" / "trainer_state.json").read_text())
        assert state["world_size"] == 2 and state["health"]["weights_finite"] and state["health"]["metrics_finite"]
    assert (out / "final" / "COMPLETE").exists() and not (out / ".gadchat.lock").exists()
    exported = folder / "exported"
    result = subprocess.run([sys.executable, "-m", "inference.export", "--checkpoint", str(out), "--out", str(exported)],
                            cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    offline, live = load_weights(exported / "actor"), load_weights(out / "final" / "actor")
    assert set(offline) == set(live) and all(torch.equal(offline[k], live[k]) for k in live)
    # A rerun of the finished run with other flags, through both launchers: nothing trained, every
    # byte as it was (config.json included), and the flags that differ named.
    before = snapshot(out)
    results = run_two_nodes(seqkd_args(tiny_model, out, "--actor.lr", 0.5), folder)
    for code, text in results:
        assert code == 0, text[-6000:]
    text = results[0][1]
    assert "already finished at step 12/12" in text
    assert "--actor.lr 0.001 -> 0.5" in text and "were not applied" in text
    assert snapshot(out) == before


@pytest.mark.slow
def test_second_run_refused_and_sigterm_to_the_launcher_stops_every_rank_and_resumes_exactly(
        tiny_model, two_node_run, tmp_path):
    out = tmp_path / "run"
    args = seqkd_args(tiny_model, out)
    env = dict(subprocess_env(), NUM_PROCS="2", GADCHAT_TEST_STEP_PAUSE="1.5")
    log = tmp_path / "first.log"
    with open(log, "w") as handle:
        first = subprocess.Popen(["bash", str(SINGLE_NODE), *args], cwd=REPO, env=env, stdout=handle,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (out / "config.json").exists():
            assert first.poll() is None and time.time() < deadline, log.read_text()[-4000:]
            time.sleep(0.1)
        holder = (out / ".gadchat.lock").read_text().strip()
        config_before = (out / "config.json").stat().st_mtime_ns
        # 1. a second run into the held folder: refused at once, naming the holder; writes nothing
        second = subprocess.run([sys.executable, str(STEP_MAIN["seqkd"]), *args], cwd=REPO, env=subprocess_env(),
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"{out} is in use by {holder}" in second.stderr and "on host" in holder
        assert "engine ready" not in second.stderr + second.stdout  # refused before any model loaded
        assert (out / ".gadchat.lock").read_text().strip() == holder
        assert (out / "config.json").stat().st_mtime_ns == config_before
        assert {p.name for p in out.iterdir()} <= {".gadchat.lock", "config.json", "metrics.jsonl", "checkpoints"}
        # 2. SIGTERM to the launcher, as a scheduler sends it (later than in the two-node run, so the
        # two runs resume from different steps and their equality says both resumes are exact)
        _, _, two_node_logged, _, _ = two_node_run
        logged = wait_for_rows(out, two_node_logged + 4, [first], deadline)
        os.kill(first.pid, signal.SIGTERM)
        code = first.wait(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    text = log.read_text()
    assert code == 143, text[-4000:]
    lines = stop_lines(text)
    assert len(lines) == 2 and lines[0] == lines[1], text[-4000:]  # both ranks, the same step
    stopped_at = stop_step(lines[0])
    assert logged <= stopped_at <= logged + 2  # the step under way when the signal came, or the next
    assert f"saved {out / 'checkpoints' / f'step_{stopped_at:08d}'}" in lines[0] and "rerun the same command" in lines[0]
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:08d}"
    assert processes_writing(out) == [] and not (out / "final").exists()
    # 3. the resume through the same launcher ends exactly where the uninterrupted run did
    resumed = subprocess.run(["bash", str(SINGLE_NODE), *args], cwd=REPO, env=dict(subprocess_env(), NUM_PROCS="2"),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"at step {stopped_at}/{STEPS}" in resumed.stdout + resumed.stderr
    reference = two_node_run[0]
    assert comparable(read_metrics(out)) == comparable(read_metrics(reference))
    assert all(torch.equal(a, b) for a, b in zip(load_weights(out / "final" / "actor").values(),
                                                  load_weights(reference / "final" / "actor").values()))


@pytest.mark.slow
def test_nan_guard_names_only_a_verified_checkpoint_and_export_refuses_nan_weights(tiny_model, tmp_path):
    out = tmp_path / "diverged"
    # Actor lr 1e12: step 1 finite (weights ~1e12), step 2 NaN. The step-1 checkpoint is not good.
    result = launch("seqkd", 1, tiny_args(tiny_model, out, "--trainer.max_steps", 4, "--trainer.save_every", 1,
                                          "--actor.lr", "1e12", "--deepspeed.zero_stage", 0), check=False)
    text = result.stdout + result.stderr
    assert result.returncode == 3, text[-4000:]
    line = next(line for line in text.splitlines() if line.startswith("error: step 2: non-finite"))
    assert "the last good checkpoint is none" in line and "step_00000001" not in line
    assert "before the spike: actor weight_rms jumped to" in line and "at step 1" in line
    step_dir = out / "checkpoints" / "step_00000001"
    state = json.loads((step_dir / "trainer_state.json").read_text())
    assert state["health"]["weights_finite"] is True and state["health"]["spikes"]
    # A checkpoint whose weights hold NaN: the offline export refuses it, naming the tensor.
    path = step_dir / "actor" / "mp_rank_00_model_states.pt"
    saved = torch.load(path, weights_only=False)
    name = "model.norm.weight"
    saved["module"][name][0] = float("nan")
    torch.save(saved, path)
    export = subprocess.run([sys.executable, "-m", "inference.export", "--checkpoint", str(out), "--out",
                             str(tmp_path / "exported")], cwd=REPO, env=subprocess_env(), capture_output=True,
                            text=True, timeout=600)
    assert export.returncode == 2, export.stderr[-3000:]
    assert f"refused to export non-finite weights: {name} holds 1 NaN/Inf" in export.stderr
    assert "saved after a spike: actor weight_rms jumped" in export.stderr
    assert not (tmp_path / "exported" / "actor").exists()


def test_last_good_checkpoint_is_checked_not_assumed(tmp_path):
    from gadchat.checkpoint_files import last_good_checkpoint

    def plant(step, health):
        folder = tmp_path / "checkpoints" / f"step_{step:08d}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(json.dumps({"step": step, **({"health": health} if health else {})}))
        return folder

    good = plant(2, {"weights_finite": True, "metrics_finite": True})
    plant(4, {"weights_finite": False, "metrics_finite": True})
    plant(6, {"weights_finite": True, "metrics_finite": False})
    plant(8, None)  # written before health was recorded: not vouched for
    (tmp_path / "checkpoints" / "latest").write_text("step_00000008")
    assert last_good_checkpoint(tmp_path) == good
    assert last_good_checkpoint(tmp_path, before_step=2) is None


def test_spike_detector_names_the_jump():
    from gadchat.nonfinite import SpikeDetector

    spikes = SpikeDetector(threshold=10)
    for step, loss in enumerate([2.0, 2.1, 1.9, 2.0], start=1):
        assert spikes.observe(step, {"actor/sft_loss": loss, "actor/grad_norm": 1.0, "epoch": 100.0 * step}) == []
    found = spikes.observe(5, {"actor/sft_loss": 2.0, "actor/grad_norm": 50.0})
    assert len(found) == 1 and found[0].startswith("actor grad_norm jumped to 50 at step 5 (50x the median 1")
    assert spikes.recent(30) == [] and len(spikes.recent(6)) == 1
    assert SpikeDetector(threshold=0).observe(1, {"actor/sft_loss": 1.0}) == []


def test_folder_lock_is_exclusive_and_dies_with_its_holder(tmp_path):
    from gadchat.run_lock import FolderBusyError, FolderLock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from gadchat.run_lock import FolderLock; "
                               f"lock = FolderLock({str(tmp_path)!r}, 'a test').acquire(); print('held', flush=True); "
                               "time.sleep(60)"], cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusyError, match=rf"{tmp_path} is in use by a test \(PID {holder.pid} on host "):
            FolderLock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: no clean-up ran, the lock file stays, the lock does not
        holder.wait()
    assert (tmp_path / ".gadchat.lock").exists()
    with FolderLock(tmp_path, "the next run"):
        assert f"PID {os.getpid()}" in (tmp_path / ".gadchat.lock").read_text()
    assert not (tmp_path / ".gadchat.lock").exists()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 KiB tmpfs: the lock file fills it, the next write fails with ENOSPC (root only)."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_ends_every_rank_with_one_line_and_no_partial_file(tiny_model, small_tmpfs):
    out = small_tmpfs / "run"
    result = launch("seqkd", 2, tiny_args(tiny_model, out, "--trainer.max_steps", 2), check=False)
    text = result.stdout + result.stderr
    assert result.returncode == 2, text[-4000:]
    errors = [line for line in text.splitlines() if line.startswith("error: writing config.json")]
    assert len(errors) == 2 and "No space left on device" in errors[0] and "is the disk full?" in errors[0], text[-4000:]
    assert "Connection closed by peer" not in text and "Traceback" not in text
    assert sorted(p.name for p in out.iterdir()) == []  # no config.json, no temporary file, the lock released


def test_abbreviated_flags_are_refused(capsys):
    from gadchat.stages.configure import load_config

    with pytest.raises(SystemExit) as stopped:
        load_config(["--trainer.over", "true", "--trainer.res", "none"], stage="warmup")
    assert stopped.value.code == 2
    assert "unrecognized arguments: --trainer.over true --trainer.res none" in capsys.readouterr().err


def test_the_deepspeed_json_is_checked_with_deepspeeds_schema(tmp_path):
    from gadchat.config import GADConfig

    cfg = GADConfig()
    cfg.trainer.output_dir = str(tmp_path / "run")
    cfg.deepspeed.config_file = str(tmp_path / "ds.json")
    Path(cfg.deepspeed.config_file).write_text('{"zero_optimization": {"stage": 7}}')
    with pytest.raises(ValueError, match=r"--deepspeed.config_file .*ds.json: zero_optimization.stage: Input should be "
                                         r"0, 1, 2, 3 .*\(got 7"):
        cfg.check_paths()
    Path(cfg.deepspeed.config_file).write_text('{"zero_optimization": {"stage": 2}, "bf16": {"enabled": false}}')
    cfg.check_paths()


def test_truncated_weight_files_are_named_with_their_flag(tiny_model, tmp_path):
    import shutil

    from gadchat.checkpoint import CheckpointError, check_files_before_loading
    from gadchat.config import GADConfig

    previous = tmp_path / "previous"
    actor = previous / "final" / "actor"
    shutil.copytree(tiny_model, actor)
    (previous / "final" / "COMPLETE").write_text("actor\n")
    weights = actor / "model.safetensors"
    cfg = GADConfig()
    cfg.trainer.output_dir, cfg.trainer.init_from = str(tmp_path / "run"), str(previous)
    check_files_before_loading(cfg, {"actor": str(actor)}, {"actor": str(actor)})  # whole: accepted
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"^--trainer.init_from {previous}: {weights} is truncated or corrupt"):
        check_files_before_loading(cfg, {"actor": str(actor)}, {"actor": str(actor)})
    with pytest.raises(CheckpointError, match=rf"^--model.discriminator_path {actor}: {weights} is truncated"):
        check_files_before_loading(cfg, {"discriminator": str(actor)}, {})
