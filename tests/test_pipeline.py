"""The one-command pipeline (warm-up, GAD, SeqKD beside them) completes and prints its table.
Its full CPU default's wall time is measured by benchmarks/, not asserted here."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env


@pytest.mark.slow
def test_pipeline_runs_every_stage_and_prints_the_table(tiny_model, tmp_path):
    out = tmp_path / "pipeline"
    result = subprocess.run(
        [sys.executable, "-m", "applications.run_pipeline", "--model", str(tiny_model), "--output-dir", str(out),
         "--with-seqkd", "--eval-prompts", "4", "--eval-max-new-tokens", "16", "--",
         "--trainer.max_steps", "3", "--trainer.discriminator_warmup", "1"],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    table = (out / "pipeline_results.md").read_text()
    assert table in result.stdout
    for stage in ("student (start)", "| seqkd | 3 |", "| warmup | 3 |", "| gad | 3 |"):
        assert stage in table, stage
    for stage in ("seqkd", "warmup", "gad"):
        assert (out / stage / "final" / "actor" / "model.safetensors").exists()
    assert (out / "eval" / "results.json").exists()
