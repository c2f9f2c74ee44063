"""GAD-Chat as an installed project: console scripts that answer from any directory, field docs in
``--help``, package data read through importlib.resources, and the algorithm documented in the
repository (no reference to notes outside it).

The console-script tests run the scripts that ``scripts/setup_cpu.sh`` installs into the venv
(editable install); they are skipped, saying so, where the project is not installed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SCRIPTS = {
    "gadchat-train": "gadchat.cli:train_main",
    "gadchat-export": "inference.export:main",
    "gadchat-chat": "inference.chat:main",
    "gadchat-generate": "inference.batch_generate:main",
    "gadchat-collect": "applications.collect_teacher_data:main",
    "gadchat-eval": "applications.evaluate:main",
    "gadchat-pipeline": "applications.run_pipeline:main",
    "gadchat-known-teacher": "applications.known_teacher:main",
}
# Not the project's files: skipped when searching the repository for references to outside notes.
SKIP_DIRS = {".git", ".venv", ".venv-trl", "outputs", ".cache", "runs", "build", "__pycache__", ".pytest_cache"}


def declared_scripts() -> dict:
    tomllib = pytest.importorskip("tomllib")
    with open(REPO / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)["project"]["scripts"]


def installed(name: str) -> Path:
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed in {BIN}: run `bash scripts/setup_cpu.sh` (installs the project editable)")
    return path


def run_script(name: str, args: list, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([str(installed(name)), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def words(text: str) -> str:
    return " ".join(text.split())


# -- console scripts ---------------------------------------------------------------------------


def test_every_console_script_is_declared_with_its_entry_point():
    assert declared_scripts() == SCRIPTS


def test_installed_entry_points_match_pyproject():
    try:
        dist = metadata.distribution("gadchat")
    except metadata.PackageNotFoundError:
        pytest.skip("gadchat is not installed in this venv: run `bash scripts/setup_cpu.sh`")
    installed_scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert installed_scripts == SCRIPTS, "the venv's install is stale: rerun `bash scripts/setup_cpu.sh`"


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_answers_help_from_any_directory(name, tmp_path):
    result = run_script(name, ["--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("usage: "), result.stdout[:500]
    assert name in result.stdout.splitlines()[0]  # the usage line names the command that was run
    assert not list(tmp_path.iterdir())  # --help writes nothing


def test_train_help_lists_the_stages_and_stage_help_shows_field_docs(tmp_path):
    from gadchat.cli import known_stages
    from gadchat.config import TrainerConfig
    from gadchat.config_docs import field_doc

    top = run_script("gadchat-train", ["--help"], cwd=tmp_path)
    assert top.returncode == 0, top.stderr[-3000:]
    for stage in known_stages():
        assert re.search(rf"^  {stage}\b", top.stdout, re.MULTILINE), top.stdout

    stage = run_script("gadchat-train", ["gad", "--help"], cwd=tmp_path)
    assert stage.returncode == 0, stage.stderr[-3000:]
    assert stage.stdout.startswith("usage: gadchat-train gad ")
    doc = field_doc(TrainerConfig, "discriminator_warmup")
    assert "step >= discriminator_warmup" in doc
    assert words(doc) in words(stage.stdout)
    assert "--trainer.discriminator_warmup" in stage.stdout


def test_train_refuses_a_missing_or_unknown_stage(tmp_path):
    missing = run_script("gadchat-train", [], cwd=tmp_path)
    assert missing.returncode == 2 and "name a stage" in missing.stderr
    unknown = run_script("gadchat-train", ["--local_rank=0", "sft"], cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown stage 'sft'" in unknown.stderr


def test_the_stage_is_found_after_the_launchers_local_rank(capsys):
    """``deepspeed $(which gadchat-train) gad ...`` runs ``gadchat-train --local_rank=N gad ...``."""
    from gadchat.cli import split_launcher_args, train_main

    assert split_launcher_args(["--local_rank=1", "gad", "--rollout.n", "4"]) == (["--local_rank=1"], ["gad", "--rollout.n", "4"])
    assert split_launcher_args(["--local-rank", "0", "seqkd"]) == (["--local-rank", "0"], ["seqkd"])
    assert split_launcher_args(["warmup", "--local_rank=3"]) == ([], ["warmup", "--local_rank=3"])
    assert train_main(["--local_rank=1", "warmup", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: gadchat-train warmup ")


# -- field docs in --help ------------------------------------------------------------------------


@dataclass
class _Documented:
    plain: int = 1
    """A doc with ``code``, 50% of it
    on two lines."""
    undocumented: str = "x"

    @dataclass
    class Inner:
        depth: int = 2
        """Nested."""


def test_field_docs_are_read_from_attribute_docstrings():
    from gadchat.config_docs import field_doc, help_text

    assert field_doc(_Documented, "plain") == "A doc with ``code``, 50% of it\non two lines."
    assert field_doc(_Documented, "undocumented") == ""
    assert field_doc(_Documented.Inner, "depth") == "Nested."
    assert help_text(_Documented, "plain") == "A doc with `code`, 50%% of it on two lines."  # argparse-safe


def test_every_flag_help_carries_its_field_doc():
    import dataclasses

    from gadchat.config import GADConfig, build_parser
    from gadchat.config_docs import field_doc

    help_of = {action.dest: action.help for action in build_parser()._actions}
    documented = 0
    for section in dataclasses.fields(GADConfig):
        obj = getattr(GADConfig(), section.name)
        for f in dataclasses.fields(obj):
            text = help_of[f"{section.name}.{f.name}"]
            assert text.endswith(f"(default: {getattr(obj, f.name)!r})")
            doc = field_doc(type(obj), f.name)
            if doc:
                documented += 1
                assert words(doc).replace("``", "`").replace("%", "%%") in text
    assert documented >= 40  # most fields are documented; a lost extraction would show here


# -- package data --------------------------------------------------------------------------------


def test_judge_prompt_is_package_data():
    from gadchat.judge import DEFAULT_JUDGE_PROMPT, load_judge_template

    packaged = resources.files("gadchat.resources") / "judge_prompt.txt"
    assert packaged.is_file()
    text = packaged.read_text(encoding="utf-8")
    assert "{question}" in text and "{answer}" in text
    assert load_judge_template() == text and DEFAULT_JUDGE_PROMPT.name == "judge_prompt.txt"


def test_tokenizer_corpus_is_package_data_and_matches_the_shipped_data():
    """The packaged corpus is the text of data/alpaca_eval_gpt4o/train.jsonl in training order: the
    builtin:tiny tokenizer (and every cached tiny model) depends on it byte for byte."""
    from gadchat.tiny import _corpus_lines, default_corpus

    packaged = resources.files("gadchat.resources") / "tokenizer_corpus.jsonl"
    assert packaged.is_file() and default_corpus().name == packaged.name
    texts = list(_corpus_lines())
    assert texts == list(_corpus_lines(REPO / "data" / "alpaca_eval_gpt4o" / "train.jsonl"))
    assert len(texts) == 1400 and all(isinstance(t, str) for t in texts)


def test_a_built_wheel_carries_the_package_data_and_works_outside_the_repository(tmp_path):
    """A regular (non-editable) install: build a wheel from a copy of the project, install it into a
    folder of its own and read the package data from there, run from an unrelated directory."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("gadchat", "applications", "inference"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"),
                            str(source)], capture_output=True, text=True, timeout=600)
    if built.returncode != 0 and "No module named" in built.stderr:
        pytest.skip(f"cannot build a wheel here: {built.stderr[-500:]}")
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("gadchat-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "gadchat/resources/judge_prompt.txt" in names and "gadchat/resources/tokenizer_corpus.jsonl" in names
    assert "gadchat/resources/alpaca_eval_gpt4o/train.jsonl" in names  # the known-teacher builds' data
    target = tmp_path / "site"
    installed_wheel = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                                     capture_output=True, text=True, timeout=600)
    assert installed_wheel.returncode == 0, installed_wheel.stderr[-3000:]
    probe = ("import json, gadchat, gadchat.tiny as tiny; from gadchat.judge import load_judge_template; "
             "from gadchat.known_teacher_models import SHIPPED, read_rows; "
             "print(json.dumps([gadchat.__file__, len(load_judge_template()), len(list(tiny._corpus_lines())), "
             "len(read_rows(SHIPPED / 'train.jsonl'))]))")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target))
    result = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    where, prompt_chars, texts, shipped_rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(where).is_relative_to(target) and prompt_chars > 100 and texts == 1400 and shipped_rows == 700


# -- the algorithm's documentation ---------------------------------------------------------------


def test_algorithm_doc_is_in_the_repository_and_nothing_points_outside_it():
    doc = REPO / "docs" / "algorithm.md"
    assert doc.is_file()
    text = doc.read_text(encoding="utf-8")
    for section in ("## 2. The stages", "### 3.3 EOS symmetry", "## 4. Losses and advantages",
                    "## 6. Published hyper-parameters", "## 7. The hybrid engine", "## 8. Running on a CPU machine"):
        assert section in text
    pattern = re.compile(r"\bDESIGN\b|FEASIBILITY\.md|(?<![\w-])shared/")  # the old notes and their folder
    offenders = []
    for folder, subfolders, files in os.walk(REPO):
        subfolders[:] = sorted(d for d in subfolders if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(files):
            path = Path(folder) / name
            if path == Path(__file__).resolve() or path.suffix in (".pyc", ".safetensors", ".bin", ".pt", ".whl"):
                continue
            try:
                content = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            for number, line in enumerate(content.splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "references to notes outside the repository (point them at docs/algorithm.md):\n" + "\n".join(offenders)
