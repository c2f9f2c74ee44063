"""Shared pieces of the benchmarks: machine and package facts, medians, the worker protocol, and the
results store (``benchmarks/results/<name>.json``) rendered into ``benchmarks/RESULTS.md``.

Each benchmark script measures one thing, prints its figures, saves them with :func:`save_result`
and re-renders RESULTS.md from every saved result, so the table always shows the latest run of each
measurement together with the machine, versions and date it was taken on.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
RESULTS_MD = BENCH_DIR / "RESULTS.md"
MAIN_PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
TRL_VENV = Path(os.environ.get("TRL_VENV", ROOT / ".venv-trl"))
PREFIX = "@@BENCH "  # worker lines carrying JSON, among their ordinary log output

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def bench_env(**extra) -> dict:
    """Environment of every measured process: one thread, vLLM in-process, no GPU."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}  # each child its own
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_LOGGING_LEVEL="ERROR",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    if not has_gpu():
        env.update(VLLM_CPU_KVCACHE_SPACE="1", DS_ACCELERATOR="cpu")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def has_gpu() -> bool:
    import shutil

    return shutil.which("nvidia-smi") is not None and os.environ.get("CUDA_VISIBLE_DEVICES", "x") != ""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def peak_rss_mib() -> float:
    """This process's peak resident set (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine_info() -> dict:
    model, cores = platform.processor() or "?", os.cpu_count()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            if key.strip() == "CPU(s)":
                cores = int(value.strip())
    except (OSError, subprocess.CalledProcessError, ValueError):
        pass
    ram = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    ram = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    gpu = "none"
    if has_gpu():
        try:
            gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout.strip() or "?"
        except (OSError, subprocess.TimeoutExpired):
            gpu = "?"
    return {"cpu": model, "cores": cores, "ram_gib": ram, "python": platform.python_version(),
            "load_avg_1m_at_start": load, "gpu": gpu}


def package_versions(python: str | None = None, names=("torch", "transformers", "deepspeed", "vllm", "trl",
                                                       "accelerate")) -> dict:
    """Versions of ``names`` as seen by ``python`` (a venv's interpreter), absent ones omitted."""
    code = ("import importlib.metadata as m, json\nout={}\n"
            f"for n in {list(names)!r}:\n"
            "    for dist in (n, n + '-cpu'):\n"
            "        try:\n            out[n]=m.version(dist); break\n        except Exception: pass\n"
            "print(json.dumps(out))")
    try:
        out = subprocess.run([python or MAIN_PYTHON, "-c", code], capture_output=True, text=True, timeout=60)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except Exception:  # noqa: BLE001 - a missing venv is reported as no versions
        return {}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def command_line(script: str, argv=None) -> str:
    """How a benchmark was run, for its stored result: ``python benchmarks/<script> ARGS`` (``argv``,
    else the process's own arguments)."""
    return " ".join(["python", f"benchmarks/{Path(script).name}", *(sys.argv[1:] if argv is None else argv)])


def now_iso() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def save_result(name: str, result: dict, command: str) -> Path:
    """Store one measurement with its context and re-render RESULTS.md."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    result = dict(result)
    result.setdefault("command", command)
    # A result measured elsewhere (a GPU machine's logs reported here) brings its own date and machine.
    result.setdefault("date", now_iso())
    result.setdefault("machine", machine_info())
    result.setdefault("versions", package_versions())
    result["commit"] = git_commit()
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    render_results()
    return path


# ----------------------------------------------------------------------------------------------
# worker processes: ``run K`` on stdin -> K timed steps -> one JSON line on stdout


class Worker:
    """A long-lived benchmark process, kept warm between rounds so A/B repetitions interleave."""

    def __init__(self, name: str, argv: list, env: dict, log_dir: Path, timeout: float = 900, wait: bool = True):
        self.name, self.timeout, self.ready = name, timeout, None
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "w")
        env = dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     env=env, cwd=ROOT, text=True, bufsize=1)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> dict:
        """Block until the worker has built everything and run its untimed warm-up step."""
        if self.ready is None:
            self.ready = self._read()
        return self.ready

    def _read(self) -> dict:
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"worker {self.name} exited (rc={self.proc.poll()}); see {self.log_path}")
            if line.startswith(PREFIX):
                message = json.loads(line[len(PREFIX):])
                if "error" in message:
                    raise RuntimeError(f"worker {self.name}: {message['error']} (see {self.log_path})")
                return message
            self.log.write(line)
        raise TimeoutError(f"worker {self.name} gave no answer in {self.timeout}s")

    def run(self, steps: int) -> dict:
        self.proc.stdin.write(f"run {steps}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def emit(message: dict) -> None:
    """Worker side: one JSON answer line on stdout."""
    sys.stdout.write(PREFIX + json.dumps(message) + "\n")
    sys.stdout.flush()


def next_command():
    """Worker side: block for the next ``run K`` (returns K) or ``quit`` (returns None)."""
    line = sys.stdin.readline()
    if not line or line.strip() == "quit":
        return None
    return int(line.split()[1])


# ----------------------------------------------------------------------------------------------
# RESULTS.md

TARGETS = {
    "trl_ratio": ("TRL best / ours, same work W", ">= 1.5x", lambda v: v >= 1.5),
    "floor_ratio": ("ours / bare floor loop doing the same work", "<= 1.15x", lambda v: v <= 1.15),
    "vllm_speedup": ("vLLM / HF generate tokens/s (~26M model)", ">= 2x", lambda v: v >= 2.0),
    "sync_share": ("weight sync share of a GAD iteration", "<= 5%", lambda v: v <= 0.05),
    "dedup_speedup": ("teacher once per prompt vs once per sample (n=8)", ">= 1.6x", lambda v: v >= 1.6),
    "lora_state_ratio": ("trainable parameters and optimizer state, full / LoRA r=16", ">= 20x", lambda v: v >= 20),
    "lora_memory_ratio": ("peak memory of a GAD stage, full / LoRA r=16 (166M Qwen2.5 shape)", ">= 2x",
                          lambda v: v >= 2.0),
    "lora_speed_ratio": ("seconds per GAD step, full / LoRA r=16 (same work)", ">= 1x", lambda v: v >= 1.0),
}


def serve_worker(build) -> None:
    """A worker's whole life: ``build()`` returns its ``one_step`` function (engine built); one untimed
    step, ``ready``, then answer each ``next_command()`` with that many timed steps. Any error is
    reported to the parent before the worker fails."""
    try:
        one_step = build()
        one_step()  # warm-up, not timed
        emit({"ready": True, "rss_mib": peak_rss_mib()})
        while (count := next_command()) is not None:
            emit({"steps": [one_step() for _ in range(count)], "rss_mib": peak_rss_mib()})
    except Exception as exc:  # noqa: BLE001 - report to the parent, then fail
        emit({"error": f"{type(exc).__name__}: {exc}"})
        raise


def add_work_arguments(parser) -> None:
    """The flags that define work W, shared by every side of the comparison."""
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True, help="JSON lines with messages and prompt_ids, in step order")
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--kl-coef", type=float, default=0.001)
    parser.add_argument("--lr", type=float, default=2e-4)


def _fmt(value, unit=""):
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "n/a"
        text = f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return text + unit
    return f"{value}{unit}"


def render_results() -> None:
    results = {}
    for path in sorted(RESULTS_DIR.glob("*.json")) if RESULTS_DIR.exists() else []:
        try:
            results[path.stem] = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
    lines = ["# Benchmark results", "",
             "Generated by the scripts in this folder (see README.md); do not edit by hand. Each section is the",
             "latest run of one script, with the machine, versions and date it ran on. Times are medians over",
             "the repetitions named; ratios are taken within one invocation (A/B repetitions interleaved), so",
             "they hold better than absolute times on this shared, noisy machine.", ""]
    # targets summary
    rows = []
    for name, res in results.items():
        for key, value in (res.get("targets") or {}).items():
            if key in TARGETS and value is not None:
                label, target, ok = TARGETS[key]
                shown = f"{value * 100:.1f}%" if key == "sync_share" else f"{value:.2f}x"
                rows.append(f"| {label} | {shown} | {target} | {'met' if ok(value) else 'MISSED'} | {name} |")
    if rows:
        lines += ["## Targets", "", "| measurement | value | target | status | from |", "|---|---|---|---|---|"]
        lines += rows + [""]
    for name, res in results.items():
        lines += [f"## {res.get('title', name)}", ""]
        if res.get("description"):
            lines += [res["description"], ""]
        table = res.get("table")
        if table:
            lines += ["| " + " | ".join(table["columns"]) + " |", "|" + "---|" * len(table["columns"])]
            for row in table["rows"]:
                lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
            lines.append("")
        for note in res.get("notes", []):
            lines.append(f"- {note}")
        if res.get("notes"):
            lines.append("")
        m = res.get("machine", {})
        versions = ", ".join(f"{k} {v}" for k, v in (res.get("versions") or {}).items())
        lines += [f"Command: `{res.get('command', '?')}`  ", f"Date: {res.get('date', '?')}, commit {res.get('commit', '?')}  ",
                  f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('ram_gib', '?')} GiB RAM, "
                  f"GPU: {m.get('gpu', 'none')}, load avg at start {_fmt(m.get('load_avg_1m_at_start'))}  ",
                  f"Versions: {versions or '?'}", ""]
        if res.get("extra_versions"):
            for label, vers in res["extra_versions"].items():
                lines.append(f"Versions ({label}): " + ", ".join(f"{k} {v}" for k, v in vers.items()) + "  ")
            lines.append("")
    RESULTS_MD.write_text("\n".join(lines).rstrip() + "\n")
