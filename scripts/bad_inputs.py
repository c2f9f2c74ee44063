"""Run bad inputs against the stages and tools and write the table of what each one answers.

    python scripts/bad_inputs.py                      # every case -> docs/bad_inputs.md
    python scripts/bad_inputs.py --only temperature,top_p --out /tmp/table.md

Every case is a real invocation (a step's main.py as a user runs it alone, the collection and
evaluation CLIs against a real local HTTP server speaking the OpenAI protocol, the offline export)
with a bad flag, config, data file or checkpoint. A case passes when the tool exits with the
expected status and its error line holds the expected text; the table records the exit status and
the error line the tool printed, so ``docs/bad_inputs.md`` stays true to the code. Exit status 1
when any case did not answer as expected.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from gadchat.stages import RECIPES, step_main  # noqa: E402  (the stages' step folders: the registry)

KEY = "sk-bad-inputs-SECRET-0000"


@dataclass
class Case:
    id: str
    tool: str
    """a stage of the registry (:data:`gadchat.stages.RECIPES`) | collect | evaluate | export"""
    title: str
    args: Callable
    """``(tmp: Path, server_url: str) -> list`` of command-line arguments."""
    expect: str
    """Text the error line must hold."""
    code: int = 2
    marker: str = "error:"
    """The line of stderr the table records: the last one holding this text."""


def write(path: Path, text, binary: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if binary:
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


ROW = {"content": [{"role": "user", "content": "Name a colour."}], "teacher_response": "Blue."}


def rows_file(tmp: Path, name: str = "prompts.jsonl", count: int = 3) -> Path:
    return write(tmp / name, "".join(json.dumps({**ROW, "id": i}) + "\n" for i in range(count)))


def train(tmp: Path, *extra) -> list:
    """A fast CPU configuration; the bad part comes in ``extra``."""
    return ["--config", str(REPO / "configs" / "cpu_tiny.yaml"), "--rollout.backend", "hf",
            "--trainer.output_dir", str(tmp / "run"), "--trainer.progress_bar", "false",
            "--trainer.tensorboard", "false", *map(str, extra)]


def torn_export(tmp: Path) -> Path:
    run = tmp / "torn"
    write(run / "final.partial" / "actor" / "config.json", "{}")
    return run


def finished_run(tmp: Path) -> Path:
    run = tmp / "finished"
    write(run / "metrics.jsonl", json.dumps({"step": 1, "actor/sft_loss": 1.0}) + "\n")
    write(run / "final" / "COMPLETE", "actor\n")
    return run


def malicious_checkpoint(tmp: Path) -> Path:
    import torch

    class Malicious:
        def __reduce__(self):
            return os.system, (f"touch {tmp / 'PWNED'}",)

    step = tmp / "evil" / "checkpoints" / "step_00000001"
    write(step / "actor_hf" / "config.json", "{}")
    write(step / "trainer_state.json", json.dumps({"stage": "warmup", "step": 1, "zero_stage": 0}))
    write(step.parent / "latest", step.name)
    (step / "actor").mkdir(parents=True, exist_ok=True)
    torch.save({"module": Malicious()}, step / "actor" / "mp_rank_00_model_states.pt")
    return tmp / "evil"


BEFORE_MODELS = {"folder_busy", "prefix_flag", "truncated_actor", "truncated_discriminator", "truncated_init_from",
                 "truncated_resume", "ds_schema"}
"""Cases that must be refused before any model loads (the run's "engine ready" line never comes)."""
HELD = []
"""Processes a case started (a run holding a folder), stopped once the case is done."""
UNCHANGED = {}
"""``case folder: (path, snapshot)`` of a folder a case must leave byte-identical."""
MOUNTS = []
"""tmpfs mounts a case made, unmounted once it is done."""


def tiny_model() -> Path:
    from gadchat.tiny import ensure_tiny_model

    return ensure_tiny_model(Path(tempfile.gettempdir()) / "gadchat_bad_inputs_tiny")


def truncated_model(tmp: Path, name: str = "model") -> Path:
    """A copy of the tiny model whose model.safetensors lost its last 100 bytes (a copy cut short)."""
    import shutil

    folder = tmp / name
    shutil.copytree(tiny_model(), folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return folder


def truncated_export(tmp: Path) -> Path:
    """A previous stage's output whose export is marked COMPLETE but whose actor weights are cut short."""
    run = tmp / "previous"
    truncated_model(run / "final", "actor")
    write(run / "final" / "COMPLETE", "actor\n")
    return run


def truncated_checkpoint(tmp: Path) -> Path:
    step = tmp / "ckpt" / "checkpoints" / "step_00000002"
    write(step / "trainer_state.json", json.dumps({"stage": "warmup", "step": 2, "zero_stage": 0}))
    write(step.parent / "latest", step.name)
    write(step / "actor" / "mp_rank_00_model_states.pt", b"PK\x03\x04" + b"\x00" * 64, binary=True)
    return tmp / "ckpt"


def nan_checkpoint(tmp: Path) -> Path:
    """A checkpoint of the tiny model whose first weight holds a NaN."""
    import shutil

    import torch
    from safetensors.torch import load_file

    step = tmp / "nan" / "checkpoints" / "step_00000001"
    shutil.copytree(tiny_model(), step / "actor_hf")
    (step / "actor_hf" / "model.safetensors").unlink()
    weights = load_file(str(tiny_model() / "model.safetensors"))
    weights["model.embed_tokens.weight"][0, 0] = float("nan")
    (step / "actor").mkdir(parents=True)
    torch.save({"module": weights}, step / "actor" / "mp_rank_00_model_states.pt")
    write(step / "trainer_state.json", json.dumps({"stage": "seqkd", "step": 1, "zero_stage": 0}))
    write(step.parent / "latest", step.name)
    return tmp / "nan"


def held_folder(tmp: Path) -> Path:
    """A folder whose lock another process holds (a run still going)."""
    folder = tmp / "busy"
    holder = subprocess.Popen([sys.executable, "-c", "import time; from gadchat.run_lock import FolderLock; "
                               f"lock = FolderLock({str(folder)!r}, 'the warmup stage').acquire(); "
                               "print('held', flush=True); time.sleep(600)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    holder.stdout.readline()
    HELD.append(holder)
    return folder


def full_disk(tmp: Path) -> Path:
    """An output folder on a 4 KiB tmpfs: the run's lock file fills it (mounting needs root)."""
    mount = tmp / "small_disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(mount)], check=True, capture_output=True)
    MOUNTS.append(mount)
    return mount / "run"


def finished_seqkd_run(tmp: Path) -> Path:
    """A real finished seqkd run (one step, one rank), to be rerun with other flags."""
    run = tmp / "done"
    subprocess.run([*command("seqkd"), *train(tmp, "--model.actor_path", tiny_model(),
                    "--trainer.output_dir", run, "--trainer.max_steps", 1, "--deepspeed.zero_stage", 0)],
                   cwd=REPO, check=True, capture_output=True)
    UNCHANGED[tmp] = (run, snapshot(run))
    return run


def killed_full_run(tmp: Path) -> Path:
    """A real seqkd run with full fine-tuning (one rank), as a kill after its step-1 checkpoint leaves it."""
    import shutil

    run = tmp / "killed"
    subprocess.run([*command("seqkd"), *train(tmp, "--model.actor_path", tiny_model(),
                    "--trainer.output_dir", run, "--trainer.max_steps", 2, "--trainer.save_every", 1,
                    "--deepspeed.zero_stage", 0)], cwd=REPO, check=True, capture_output=True)
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step_00000002")
    (run / "checkpoints" / "latest").write_text("step_00000001")
    return run


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def collect(tmp: Path, url: str, *extra) -> list:
    return ["--prompts", str(rows_file(tmp)), "--base-url", url, "--model", "teacher",
            "--output", str(tmp / "teacher.jsonl"), "--no-progress", *map(str, extra)]


def evaluate(tmp: Path, url: str, *extra) -> list:
    from gadchat.tiny import ensure_tiny_model

    model = ensure_tiny_model(Path(tempfile.gettempdir()) / "gadchat_bad_inputs_tiny")
    return ["--models", str(model), "--eval-sets", str(rows_file(tmp, "eval.jsonl", 2)), "--backend", "hf",
            "--max-new-tokens", "4", "--output-dir", str(tmp / "eval"), "--no-progress", *map(str, extra)]


CASES = [
    # --- training configuration: refused before any engine is built
    Case("temperature", "gad", "negative sampling temperature", lambda t, u: train(t, "--rollout.temperature", -1),
         "--rollout.temperature must be > 0, got -1.0"),
    Case("top_p", "gad", "top_p above 1", lambda t, u: train(t, "--rollout.top_p", 2), "--rollout.top_p must be > 0 and <= 1"),
    Case("max_new_tokens", "warmup", "no new tokens", lambda t, u: train(t, "--rollout.max_new_tokens", 0),
         "--rollout.max_new_tokens must be >= 1"),
    Case("betas", "warmup", "one beta instead of two", lambda t, u: train(t, "--actor.betas", "0.9"),
         "--actor.betas must be two comma-separated numbers"),
    Case("micro_batch", "warmup", "micro batch of 0", lambda t, u: train(t, "--actor.micro_batch_size", 0),
         "--actor.micro_batch_size must be >= 1"),
    Case("discriminator_micro_batch", "gad", "discriminator micro batch of 0", lambda t, u: train(t, "--discriminator.micro_batch_prompts", 0),
         "--discriminator.micro_batch_prompts must be >= 1"),
    Case("max_steps", "warmup", "negative max_steps", lambda t, u: train(t, "--trainer.max_steps", -3),
         "--trainer.max_steps must be >= 0, got -3"),
    Case("epochs", "seqkd", "zero epochs", lambda t, u: train(t, "--trainer.epochs", 0), "--trainer.epochs must be > 0"),
    Case("save_every", "warmup", "negative checkpoint period", lambda t, u: train(t, "--trainer.save_every", -1),
         "--trainer.save_every must be >= 0"),
    Case("keep_last", "warmup", "keep no checkpoint", lambda t, u: train(t, "--trainer.keep_last", 0),
         "--trainer.keep_last must be >= 1"),
    Case("lr", "warmup", "negative learning rate", lambda t, u: train(t, "--actor.lr", -1), "--actor.lr must be >= 0"),
    Case("lr_nan", "warmup", "NaN learning rate", lambda t, u: train(t, "--discriminator.lr", "nan"), "--discriminator.lr must be >= 0, got nan"),
    Case("kl", "gad", "negative KL coefficient", lambda t, u: train(t, "--actor.kl_coef", -0.1), "--actor.kl_coef must be >= 0"),
    Case("gad_n1", "gad", "GAD with one sample per prompt (GRPO advantages all 0)",
         lambda t, u: train(t, "--rollout.n", 1), "--rollout.n must be >= 2 in the GAD stage"),
    Case("on_nonfinite", "warmup", "unknown non-finite policy", lambda t, u: train(t, "--trainer.on_nonfinite", "ignore"),
         "--trainer.on_nonfinite must be one of error, skip"),
    Case("eval_split", "warmup", "eval split of 1.5", lambda t, u: train(t, "--data.eval_split", 1.5),
         "--data.eval_split must be 0 (off) or a fraction"),
    Case("not_a_number", "warmup", "a word where a number goes", lambda t, u: train(t, "--rollout.n", "two"),
         "argument --rollout.n: invalid int value"),
    Case("unknown_flag", "warmup", "a misspelt flag", lambda t, u: train(t, "--rollout.temprature", 1),
         "unrecognized arguments: --rollout.temprature"),
    Case("actor_path", "warmup", "model folder that does not exist",
         lambda t, u: train(t, "--model.actor_path", "/nonexistent/model"),
         "--model.actor_path /nonexistent/model: no such folder"),
    Case("output_file", "warmup", "output dir that is a file",
         lambda t, u: train(t, "--trainer.output_dir", write(t / "a_file", "x")), "is a file, not a folder"),
    Case("broken_yaml", "warmup", "YAML with an unclosed bracket",
         lambda t, u: ["--config", str(write(t / "run.yaml", "actor:\n  lr: [1e-6\nrollout:\n  n: 4\n"))],
         "not valid YAML"),
    Case("missing_yaml", "warmup", "--config file that does not exist", lambda t, u: ["--config", str(t / "none.yaml")],
         "--config: no such file"),
    Case("unknown_yaml_field", "warmup", "YAML field that does not exist",
         lambda t, u: ["--config", str(write(t / "run.yaml", "rollout:\n  temprature: 1\n"))],
         "unknown field rollout.temprature"),
    Case("ds_json", "warmup", "invalid DeepSpeed JSON",
         lambda t, u: train(t, "--deepspeed.config_file", write(t / "ds.json", '{"zero_optimization": {"stage": 3,}')),
         "ds.json: not valid JSON"),
    Case("init_from_missing", "gad", "hand-off from a folder that does not exist",
         lambda t, u: train(t, "--trainer.init_from", t / "nowhere"), "--trainer.init_from", ),
    Case("init_from_torn", "gad", "hand-off from a stage whose export was torn",
         lambda t, u: train(t, "--trainer.init_from", torn_export(t)), "no complete export"),
    Case("overwrite", "warmup", "--trainer.resume none into a finished run",
         lambda t, u: train(t, "--trainer.output_dir", finished_run(t), "--trainer.resume", "none"),
         "already holds a run"),
    # --- data: named file, row and field
    Case("data_missing", "warmup", "training file that does not exist",
         lambda t, u: train(t, "--data.train_files", t / "nope.jsonl"), "data file not found"),
    Case("data_not_utf8", "warmup", "a Latin-1 line in the data",
         lambda t, u: train(t, "--data.train_files", write(t / "latin1.jsonl", json.dumps(ROW).encode() + b"\n"
                                                         + b'{"content": "caf\xe9", "teacher_response": "x"}\n', True)),
         "latin1.jsonl, row 2, field '<line>': not UTF-8 text"),
    Case("data_truncated_array", "warmup", "a JSON array cut short",
         lambda t, u: train(t, "--data.train_files", write(t / "cut.json", json.dumps([ROW, ROW])[:-20])),
         "cut.json, row 1, field '<file>': invalid JSON array"),
    Case("data_not_data", "warmup", "a text file as training data",
         lambda t, u: train(t, "--data.train_files", write(t / "train.txt", "hello\n")), "train.txt: not a data file"),
    Case("data_empty_folder", "warmup", "a folder without data files",
         lambda t, u: train(t, "--data.train_files", (t / "empty").mkdir() or t / "empty"), "holds no .jsonl"),
    Case("data_missing_field", "warmup", "rows without the response field",
         lambda t, u: train(t, "--data.train_files", write(t / "rows.jsonl", json.dumps({"content": "hi"}) + "\n")),
         "rows.jsonl, row 1, field 'teacher_response': missing field"),
    Case("data_bad_role", "warmup", "a message with an unknown role",
         lambda t, u: train(t, "--data.train_files", write(t / "roles.jsonl", json.dumps(
             {"content": [{"role": "robot", "content": "hi"}], "teacher_response": "x"}) + "\n")),
         "field 'content[0].role': unknown role 'robot'"),
    Case("resume_missing", "warmup", "resume from a folder without checkpoint",
         lambda t, u: train(t, "--trainer.resume", t / "nowhere"), "no checkpoint there"),
    # --- one run per folder, weight files and DeepSpeed JSON before any model loads, full disk (issue 18)
    Case("folder_busy", "warmup", "a second run into a folder a running run holds",
         lambda t, u: train(t, "--trainer.output_dir", held_folder(t)), "is in use by the warmup stage (PID"),
    Case("prefix_flag", "warmup", "an abbreviated flag (--trainer.over for --trainer.overwrite)",
         lambda t, u: train(t, "--trainer.over", "true"), "unrecognized arguments: --trainer.over true"),
    Case("truncated_actor", "warmup", "a model.safetensors cut short (--model.actor_path)",
         lambda t, u: train(t, "--model.actor_path", truncated_model(t)), "/model.safetensors is truncated or corrupt"),
    Case("truncated_discriminator", "gad", "a discriminator whose model.safetensors is cut short",
         lambda t, u: train(t, "--model.discriminator_path", truncated_model(t, "disc")),
         "--model.discriminator_path $TMP/disc: $TMP/disc/model.safetensors is truncated or corrupt"),
    Case("truncated_init_from", "gad", "a COMPLETE hand-off export whose actor weights are cut short",
         lambda t, u: train(t, "--trainer.init_from", truncated_export(t)),
         "--trainer.init_from $TMP/previous: $TMP/previous/final/actor/model.safetensors is truncated or corrupt"),
    Case("truncated_resume", "warmup", "resume from a checkpoint whose weights file is cut short",
         lambda t, u: train(t, "--trainer.resume", truncated_checkpoint(t)),
         "mp_rank_00_model_states.pt is truncated or corrupt"),
    Case("ds_schema", "warmup", "DeepSpeed JSON with zero_optimization.stage 7",
         lambda t, u: train(t, "--deepspeed.config_file", write(t / "ds.json", '{"zero_optimization": {"stage": 7}}')),
         "ds.json: zero_optimization.stage: Input should be 0, 1, 2, 3"),
    Case("full_disk", "seqkd", "an output folder on a disk that is full (a 4 KiB tmpfs)",
         lambda t, u: train(t, "--model.actor_path", tiny_model(), "--trainer.output_dir", full_disk(t),
                            "--trainer.max_steps", 1, "--deepspeed.zero_stage", 0),
         "No space left on device"),
    Case("nan_lr", "seqkd", "actor lr 1e12: step 1 finite but huge, step 2 NaN",
         lambda t, u: train(t, "--model.actor_path", tiny_model(), "--actor.lr", "1e12", "--trainer.max_steps", 3,
                            "--trainer.save_every", 1, "--deepspeed.zero_stage", 0),
         "the last good checkpoint is none", code=3),
    Case("finished_other_flags", "seqkd", "a finished run rerun with other flags (--actor.lr 0.5)",
         lambda t, u: train(t, "--model.actor_path", tiny_model(), "--trainer.output_dir", finished_seqkd_run(t),
                            "--trainer.max_steps", 1, "--deepspeed.zero_stage", 0, "--actor.lr", 0.5),
         "--actor.lr 0.001 -> 0.5", code=0, marker="were not applied"),
    Case("lora_targets", "gad", "a LoRA rank on a model without the target modules",
         lambda t, u: train(t, "--actor.lora_rank", 4, "--actor.lora_target_modules", "c_attn,c_proj"),
         "--actor.lora_target_modules 'c_attn,c_proj': the model has no module named c_attn, c_proj"),
    Case("lora_resume_full", "seqkd", "a LoRA run resumed from a full-fine-tuning checkpoint",
         lambda t, u: train(t, "--model.actor_path", tiny_model(), "--trainer.output_dir", killed_full_run(t),
                            "--trainer.max_steps", 2, "--trainer.save_every", 1, "--deepspeed.zero_stage", 0,
                            "--actor.lora_rank", 4),
         "--actor.lora_rank/lora_alpha/lora_target_modules: the actor checkpoint was written with full fine-tuning"),
    # --- teacher collection
    Case("collect_retries", "collect", "--max-retries -1", lambda t, u: collect(t, u, "--max-retries", -1),
         "argument --max-retries: must be >= 0"),
    Case("collect_concurrency", "collect", "--concurrency 0", lambda t, u: collect(t, u, "--concurrency", 0),
         "argument --concurrency: must be >= 1"),
    Case("collect_no_key", "collect", "API-key variable not set",
         lambda t, u: collect(t, u, "--api-key-env", "GADCHAT_UNSET_KEY"), "environment variable GADCHAT_UNSET_KEY is not set"),
    Case("collect_401", "collect", "a wrong key (the server echoes it in its 401)",
         lambda t, u: collect(t, u + "/reject"), "refused the API key (HTTP 401"),
    Case("collect_two_teachers", "collect", "a second teacher into the same output",
         lambda t, u: collect(t, u) if (t / "teacher.jsonl").write_text(json.dumps(
             {**ROW, "teacher": "other-teacher", "collection_key": "0-x"}) + "\n") else [],
         "already holds answers of teacher other-teacher"),
    Case("collect_bad_rows", "collect", "a prompt row with an unknown role",
         lambda t, u: ["--prompts", str(write(t / "p.jsonl", json.dumps({"content": [{"role": "bot", "content": "x"}]}) + "\n")),
                       "--base-url", u, "--model", "m", "--output", str(t / "o.jsonl")], "unknown role 'bot'"),
    # --- evaluation
    Case("eval_model_missing", "evaluate", "a model folder that does not exist",
         lambda t, u: ["--models", "/nonexistent/model", "--output-dir", str(t / "eval")], "no such folder"),
    Case("eval_retries", "evaluate", "--judge-max-retries -1",
         lambda t, u: ["--models", "x", "--output-dir", str(t), "--judge-max-retries", "-1"],
         "argument --judge-max-retries: must be >= 0"),
    Case("eval_split_1", "evaluate", "--eval-split 1", lambda t, u: ["--models", "x", "--output-dir", str(t), "--eval-split", "1"],
         "--eval-split must be 0 (off) or a fraction"),
    Case("eval_judge_down", "evaluate", "a judge that fails every request",
         lambda t, u: evaluate(t, u, "--judge-base-url", u + "/down", "--judge-max-retries", 0), "the judge answered none", 1),
    Case("eval_judge_401", "evaluate", "a judge that refuses the key",
         lambda t, u: evaluate(t, u, "--judge-base-url", u + "/reject"), "refused the API key (HTTP 401"),
    Case("eval_busy", "evaluate", "an evaluation into a folder a running run holds",
         lambda t, u: evaluate(t, u)[:-3] + ["--output-dir", str(held_folder(t)), "--no-progress"], "is in use by"),
    # --- export
    Case("export_missing", "export", "a folder without checkpoint",
         lambda t, u: ["--checkpoint", str(t / "none"), "--out", str(t / "out")], "no checkpoint found"),
    Case("export_malicious", "export", "a crafted checkpoint whose unpickling runs a shell command",
         lambda t, u: ["--checkpoint", str(malicious_checkpoint(t)), "--out", str(t / "out")],
         "refused to load: it holds the Python object posix.system"),
    Case("export_nan", "export", "a checkpoint whose weights hold a NaN",
         lambda t, u: ["--checkpoint", str(nan_checkpoint(t)), "--out", str(t / "out")],
         "refused to export non-finite weights: model.embed_tokens.weight holds 1 NaN/Inf"),
    Case("export_busy", "export", "an export into a folder a running run holds",
         lambda t, u: ["--checkpoint", str(nan_checkpoint(t)), "--out", str(held_folder(t))], "is in use by"),
]


def command(tool: str) -> list:
    if tool in RECIPES:
        return [sys.executable, str(step_main(tool))]
    module = {"collect": "applications.collect_teacher_data", "evaluate": "applications.evaluate",
              "export": "inference.export"}[tool]
    return [sys.executable, "-m", module]


def error_line(stderr: str, marker: str = "error:") -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if marker in line:
            return line[line.index("error:"):] if marker == "error:" else line.split(": ", 1)[-1]
    return lines[-1] if lines else ""


def start_server():
    """The real local OpenAI-compatible server of the tests: ``/reject`` answers 401 echoing the
    key, ``/down`` answers 500, anything else echoes the prompt."""
    from fake_openai_server import FakeOpenAIServer, Status

    server = FakeOpenAIServer().start()
    handler = server._server.RequestHandlerClass
    original = handler.do_POST

    def do_post(self):
        for prefix, action in (("/reject/", Status(401, "Incorrect API key provided: {api_key}")),
                               ("/down/", Status(500, "judge down"))):
            if prefix in self.path:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                return self._act(action, None)
        return original(self)

    handler.do_POST = do_post
    return server


def run_case(case: Case, tmp: Path, url: str) -> dict:
    folder = tmp / case.id
    folder.mkdir(parents=True)
    env = dict(os.environ, OPENAI_API_KEY=KEY, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    try:
        args = case.args(folder, url)
        started = time.perf_counter()
        result = subprocess.run(command(case.tool) + [str(a) for a in args], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=600)
    finally:
        while HELD:
            HELD.pop().kill()
        while MOUNTS:
            subprocess.run(["umount", str(MOUNTS.pop())], check=False)
    message = error_line(result.stderr, case.marker).replace(str(folder), "$TMP")
    message = re.sub(r"\(PID \d+ on host [^)]+\)", "(PID $PID on host $HOST)", message)  # the table stays stable
    ok = result.returncode == case.code and case.expect in message and KEY not in result.stdout + result.stderr
    if case.id == "export_malicious":
        ok = ok and not (folder / "PWNED").exists()
    if folder in UNCHANGED:  # the folder must be byte-identical
        path, before = UNCHANGED.pop(folder)
        ok = ok and snapshot(path) == before
    if case.id in BEFORE_MODELS and "engine ready" in result.stderr:
        ok = False  # these must be refused before any model loads
    return {"case": case, "code": result.returncode, "message": message, "ok": ok,
            "seconds": time.perf_counter() - started, "stderr": result.stderr}


def markdown(results: list) -> str:
    lines = ["# Bad inputs and what they answer", "",
             "Generated by `python scripts/bad_inputs.py` (do not edit by hand): each row is a real invocation of a",
             "stage's `main.py`, `applications.collect_teacher_data`, `applications.evaluate` or `inference.export`",
             "with one bad input, the exit status it gave and the error line it printed (`$TMP` = the case's",
             "scratch folder). Configuration errors exit 2 before any engine is built (weight files, the",
             "DeepSpeed JSON and a held output folder included); a full disk exits 2 with no partial file; a",
             "diverged run exits 3; a judge that answers nothing exits 1; a finished run rerun with other flags",
             "exits 0, byte-identical, naming the flags it did not apply. `tests/test_bad_inputs.py` runs a fast subset.", "",
             "| # | tool | bad input | exit | message |", "|---|---|---|---|---|"]
    for number, r in enumerate(results, start=1):
        case = r["case"]
        message = r["message"].replace("|", "\\|")
        if len(message) > 400:
            message = message[:400] + " ..."
        mark = "" if r["ok"] else " **(unexpected)**"
        lines.append(f"| {number} | {case.tool} | {case.title}{mark} | {r['code']} | `{message}` |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated case ids (empty = all)")
    parser.add_argument("--out", default=str(REPO / "docs" / "bad_inputs.md"), help="markdown table to write")
    parser.add_argument("--list", action="store_true", help="list the case ids and exit")
    args = parser.parse_args(argv)
    if args.list:
        for case in CASES:
            print(f"{case.id}\t{case.tool}\t{case.title}")
        return 0
    wanted = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(wanted) - {c.id for c in CASES})
    if unknown:
        print(f"error: unknown case id(s) {', '.join(unknown)} (see --list)", file=sys.stderr)
        return 2
    cases = [c for c in CASES if not wanted or c.id in wanted]
    server = start_server()
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="gadchat_bad_inputs_") as tmp:
            for case in cases:
                result = run_case(case, Path(tmp), server.base_url)
                results.append(result)
                status = "ok  " if result["ok"] else "FAIL"
                print(f"[bad-inputs] {status} {case.id} ({result['seconds']:.1f} s): exit {result['code']}: "
                      f"{result['message'][:160]}", flush=True)
                if not result["ok"]:
                    print(result["stderr"][-2000:], file=sys.stderr)
    finally:
        server.stop()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(results), encoding="utf-8")
    failed = [r["case"].id for r in results if not r["ok"]]
    print(f"[bad-inputs] {len(results) - len(failed)}/{len(results)} cases as expected; table: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
