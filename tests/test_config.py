"""The configuration layer: flags for every field, YAML then flags, per-stage published defaults,
clear errors, the DeepSpeed JSON merge, and the published defaults of docs/algorithm.md section 6."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import torch

from gadchat.config import GADConfig, config_from_dict, save_config
from gadchat.stages.configure import build_parser, load_config, validate

REPO = Path(__file__).resolve().parent.parent


def all_fields():
    cfg = GADConfig()
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            yield section.name, f.name, hints[f.name], getattr(obj, f.name)


SPECIAL_VALUES = {"trainer.stage": "gad", "rollout.backend": "hf", "data.overlong": "error",
                  "actor.betas": "0.8,0.95", "discriminator.betas": "0.85,0.9", "trainer.resume": "none",
                  "model.dtype": "bfloat16", "trainer.on_nonfinite": "skip", "discriminator.pooling": "sum",
                  "discriminator.baseline": "reference", "actor.reward_form": "sequence"}


def non_default(section, name, kind, default):
    """A valid value that differs from the default, as (flag text, parsed value)."""
    key = f"{section}.{name}"
    if key in SPECIAL_VALUES:
        return SPECIAL_VALUES[key], SPECIAL_VALUES[key]
    if kind is bool:
        return ("false" if default else "true"), (not default)
    if kind is int:
        value = 2 if default != 2 else 1
        return str(value), value
    if kind is float:
        value = default + 0.5 if default + 0.5 <= 1 or key != "rollout.top_p" else default - 0.5
        return repr(value), value
    assert kind is str, (key, kind)
    return f"value-of-{name}", f"value-of-{name}"


# Flags whose non-default value another field's non-default value forbids (a LoRA rank: a fresh adapter
# takes no previous optimizer state); set on their own in the tests that set every field.
ALONE = {"trainer.init_optimizer_states"}


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_every_field_is_a_flag():
    parser = build_parser()
    options = {opt for action in parser._actions for opt in action.option_strings}
    fields = list(all_fields())
    assert len(fields) > 50
    for section, name, _, _ in fields:
        assert f"--{section}.{name}" in options


def test_every_flag_sets_its_field():
    argv, expected, alone = [], {}, []
    for section, name, kind, default in all_fields():
        text, value = non_default(section, name, kind, default)
        assert value != default
        if f"{section}.{name}" in ALONE:
            alone.append((section, name, text, value))
            continue
        argv += [f"--{section}.{name}", text]
        expected[(section, name)] = value
    cfg = load_config(argv)
    for (section, name), value in expected.items():
        actual = getattr(getattr(cfg, section), name)
        assert actual == value and type(actual) is type(value), (section, name, actual, value)
    for section, name, text, value in alone:
        assert getattr(getattr(load_config([f"--{section}.{name}", text]), section), name) == value


def test_every_field_can_be_set_from_yaml(tmp_path):
    lines, expected = [], {}
    current = None
    for section, name, kind, default in all_fields():
        _, value = non_default(section, name, kind, default)
        if f"{section}.{name}" in ALONE:
            alone = write_yaml(tmp_path / f"{section}.{name}.yaml", f"{section}:\n  {name}: {json.dumps(value)}\n")
            assert getattr(getattr(load_config(["--config", str(alone)]), section), name) == value, (section, name)
            continue
        if section != current:
            lines.append(f"{section}:")
            current = section
        lines.append(f"  {name}: {json.dumps(value)}")
        expected[(section, name)] = value
    path = write_yaml(tmp_path / "all.yaml", "\n".join(lines) + "\n")
    cfg = load_config(["--config", str(path)])
    for (section, name), value in expected.items():
        assert getattr(getattr(cfg, section), name) == value, (section, name)


def test_yaml_then_flags_override(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", "actor:\n  lr: 3.0e-4\n  micro_batch_size: 4\nrollout:\n  n: 4\n"
                                             "trainer:\n  output_dir: out/yaml\n")
    cfg = load_config(["--config", str(path), "--rollout.n", "2", "--trainer.output_dir", "out/flag"], stage="gad")
    assert cfg.actor.lr == 3e-4
    assert cfg.actor.micro_batch_size == 4
    assert cfg.rollout.n == 2
    assert cfg.trainer.output_dir == "out/flag"
    assert cfg.rollout.temperature == 0.8  # untouched default


def test_yaml_float_without_dot_is_read_as_float(tmp_path):
    # YAML 1.1 reads 1e-6 as a string; the config layer converts it to the field's float type
    path = write_yaml(tmp_path / "lr.yaml", "actor:\n  lr: 1e-5\ndiscriminator:\n  lr: 2\n")
    cfg = load_config(["--config", str(path)])
    assert cfg.actor.lr == 1e-5 and isinstance(cfg.actor.lr, float)
    assert cfg.discriminator.lr == 2.0 and isinstance(cfg.discriminator.lr, float)


def test_shipped_cpu_tiny_yaml_loads():
    cfg = load_config(["--config", str(REPO / "configs" / "cpu_tiny.yaml")], stage="gad")
    assert cfg.trainer.stage == "gad"
    # discriminator_warmup comes from the stage defaults: the GAD stage honours the gate too (issue 11)
    assert cfg.rollout.n == 4 and cfg.trainer.prompts_per_step == 8 and cfg.trainer.discriminator_warmup == 0
    assert load_config(["--config", str(REPO / "configs" / "cpu_tiny.yaml")], stage="warmup").trainer.discriminator_warmup == 10


# ----------------------------------------------------------------------------------------------
# Stage defaults


def test_stage_defaults_per_entry_point():
    seqkd = load_config([], stage="seqkd")
    assert (seqkd.trainer.stage, seqkd.actor.lr, seqkd.actor.kl_coef, seqkd.trainer.discriminator_warmup,
            seqkd.trainer.epochs) == ("seqkd", 5e-6, 0.0, 0, 3.0)
    warmup = load_config([], stage="warmup")
    assert (warmup.trainer.stage, warmup.actor.lr, warmup.discriminator.lr, warmup.actor.kl_coef,
            warmup.trainer.discriminator_warmup, warmup.trainer.epochs) == ("warmup", 1e-6, 1e-6, 0.001, 10, 1.0)
    gad = load_config([], stage="gad")
    assert (gad.trainer.stage, gad.actor.lr, gad.discriminator.lr, gad.actor.kl_coef, gad.trainer.discriminator_warmup,
            gad.trainer.epochs) == ("gad", 1e-6, 1e-6, 0.001, 0, 2.0)
    # the default stage without an entry point is the warm-up
    assert load_config([]).trainer.stage == "warmup"
    assert load_config([]).trainer.discriminator_warmup == 10


def test_stage_defaults_lie_under_yaml_and_flags(tmp_path):
    path = write_yaml(tmp_path / "stage.yaml", "actor:\n  lr: 7.0e-6\ntrainer:\n  discriminator_warmup: 3\n")
    seqkd = load_config(["--config", str(path)], stage="seqkd")
    assert seqkd.actor.lr == 7e-6 and seqkd.trainer.discriminator_warmup == 3
    assert seqkd.actor.kl_coef == 0.0 and seqkd.trainer.epochs == 3.0  # stage defaults YAML did not touch
    gad = load_config(["--config", str(path), "--trainer.discriminator_warmup", "5", "--trainer.epochs", "1.5"], stage="gad")
    assert gad.trainer.discriminator_warmup == 5 and gad.trainer.epochs == 1.5 and gad.actor.lr == 7e-6
    assert load_config(["--actor.lr", "1e-4"], stage="seqkd").actor.lr == 1e-4


def test_stage_chosen_by_flag_or_yaml_brings_its_defaults(tmp_path):
    cfg = load_config(["--trainer.stage", "seqkd"])
    assert (cfg.trainer.stage, cfg.actor.lr, cfg.trainer.discriminator_warmup) == ("seqkd", 5e-6, 0)
    path = write_yaml(tmp_path / "gad.yaml", "trainer:\n  stage: gad\n")
    cfg = load_config(["--config", str(path)])
    assert (cfg.trainer.stage, cfg.trainer.discriminator_warmup, cfg.trainer.epochs) == ("gad", 0, 2.0)
    path = write_yaml(tmp_path / "seqkd.yaml", "trainer:\n  stage: seqkd\n")
    cfg = load_config(["--config", str(path)])
    assert (cfg.trainer.stage, cfg.actor.lr, cfg.actor.kl_coef) == ("seqkd", 5e-6, 0.0)


def test_entry_point_stage_wins_over_a_shared_yaml_and_conflicting_flag_errors(tmp_path):
    path = write_yaml(tmp_path / "shared.yaml", "trainer:\n  stage: gad\n")
    cfg = load_config(["--config", str(path)], stage="seqkd")
    assert cfg.trainer.stage == "seqkd" and cfg.actor.lr == 5e-6
    with pytest.raises(ValueError, match=r"runs the 'seqkd' stage; got --trainer.stage gad"):
        load_config(["--trainer.stage", "gad"], stage="seqkd")


def test_stage_defaults_table_matches_design():
    from gadchat.stages import RECIPES

    assert RECIPES["seqkd"].defaults["actor"]["lr"] == 5e-6
    assert RECIPES["warmup"].defaults["trainer"]["discriminator_warmup"] == 10
    assert RECIPES["gad"].defaults["trainer"]["discriminator_warmup"] == 0


# ----------------------------------------------------------------------------------------------
# Booleans


@pytest.mark.parametrize("text,value", [("true", True), ("false", False), ("True", True), ("FALSE", False),
                                        ("1", True), ("0", False), ("yes", True), ("no", False)])
def test_boolean_flags(text, value):
    cfg = load_config(["--discriminator.freeze", text, "--trainer.tensorboard", text])
    assert cfg.discriminator.freeze is value and cfg.trainer.tensorboard is value


def test_bad_boolean_flag_names_the_flag(capsys):
    with pytest.raises(SystemExit) as info:
        load_config(["--discriminator.freeze", "maybe"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--discriminator.freeze" in err and "maybe" in err


def test_yaml_booleans(tmp_path):
    path = write_yaml(tmp_path / "b.yaml", "discriminator:\n  freeze: true\ntrainer:\n  tensorboard: 'false'\n"
                                           "  progress_bar: no\n")
    cfg = load_config(["--config", str(path)])
    assert cfg.discriminator.freeze is True and cfg.trainer.tensorboard is False and cfg.trainer.progress_bar is False


# ----------------------------------------------------------------------------------------------
# Errors


def test_unknown_yaml_section_and_field(tmp_path):
    path = write_yaml(tmp_path / "sec.yaml", "optimizer:\n  lr: 1.0\n")
    with pytest.raises(ValueError, match=r"sec\.yaml: unknown section 'optimizer'") as info:
        load_config(["--config", str(path)])
    assert str(path) in str(info.value) and "actor" in str(info.value)  # lists the known sections
    path = write_yaml(tmp_path / "field.yaml", "actor:\n  learning_rate: 1.0\n")
    with pytest.raises(ValueError, match=r"field\.yaml: unknown field actor\.learning_rate"):
        load_config(["--config", str(path)])
    path = write_yaml(tmp_path / "scalar.yaml", "actor: 5\n")
    with pytest.raises(ValueError, match=r"scalar\.yaml: section 'actor' must be a mapping"):
        load_config(["--config", str(path)])


@pytest.mark.parametrize("yaml_text,field", [
    ("rollout:\n  n: many\n", "rollout.n"),
    ("actor:\n  lr: fast\n", "actor.lr"),
    ("trainer:\n  prompts_per_step: [1, 2]\n", "trainer.prompts_per_step"),
    ("discriminator:\n  freeze: maybe\n", "discriminator.freeze"),
    ("trainer:\n  tensorboard: 2\n", "trainer.tensorboard"),
    ("rollout:\n  n: 2.5\n", "rollout.n"),
    ("rollout:\n  n: true\n", "rollout.n"),
])
def test_bad_yaml_values_name_source_and_field(tmp_path, yaml_text, field):
    path = write_yaml(tmp_path / "bad.yaml", yaml_text)
    with pytest.raises(ValueError) as info:
        load_config(["--config", str(path)])
    message = str(info.value)
    assert str(path) in message and field in message, message


def test_bad_flag_values_name_the_flag(capsys):
    for argv, flag in ([["--rollout.n", "abc"], "--rollout.n"], [["--actor.lr", "x"], "--actor.lr"]):
        with pytest.raises(SystemExit):
            load_config(argv)
        err = capsys.readouterr().err
        assert flag in err and "invalid" in err


def test_unknown_flag_is_rejected(capsys):
    with pytest.raises(SystemExit):
        load_config(["--actor.learning_rate", "1"])
    assert "unrecognized arguments: --actor.learning_rate" in capsys.readouterr().err


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--config: no such file .*nope\.yaml"):
        load_config(["--config", str(tmp_path / "nope.yaml")])


def test_empty_yaml_is_fine(tmp_path):
    path = write_yaml(tmp_path / "empty.yaml", "# nothing\n")
    assert load_config(["--config", str(path)]).rollout.n == 8


def test_local_rank_is_accepted():
    assert load_config(["--local_rank", "0", "--rollout.n", "3"]).rollout.n == 3
    assert load_config(["--local_rank=1"]).rollout.n == 8
    assert load_config(["--local-rank", "2"], stage="gad").trainer.stage == "gad"


@pytest.mark.parametrize("section,name,value,text", [
    ("trainer", "stage", "ppo", "trainer.stage must be one of"),
    ("rollout", "backend", "tpu", "--rollout.backend must be one of auto, vllm, hf, got 'tpu'"),
    ("deepspeed", "zero_stage", 4, "--deepspeed.zero_stage must be one of 0, 1, 2, 3, got 4"),
    ("deepspeed", "zero_stage", -1, "--deepspeed.zero_stage must be one of 0, 1, 2, 3, got -1"),
    ("data", "overlong", "truncate", "--data.overlong must be one of skip, error"),
    ("trainer", "prompts_per_step", 0, "--trainer.prompts_per_step must be >= 1, got 0"),
    ("rollout", "n", 0, "--rollout.n must be >= 1, got 0"),
    ("actor", "mini_batches", 0, "--actor.mini_batches must be >= 1, got 0"),
    # issue 10: every field with a range is checked up front, naming its flag
    ("rollout", "temperature", -1.0, "--rollout.temperature must be > 0, got -1.0"),
    ("rollout", "temperature", 0.0, "--rollout.temperature must be > 0, got 0.0"),
    ("rollout", "top_p", 2.0, "--rollout.top_p must be > 0 and <= 1, got 2.0"),
    ("rollout", "top_p", 0.0, "--rollout.top_p must be > 0 and <= 1"),
    ("rollout", "max_new_tokens", 0, "--rollout.max_new_tokens must be >= 1, got 0"),
    ("actor", "betas", "0.9", "--actor.betas must be two comma-separated numbers in [0, 1)"),
    ("discriminator", "betas", "0.9,x", "--discriminator.betas must be two comma-separated numbers in [0, 1)"),
    ("actor", "betas", "0.9,1.0", "--actor.betas must be two"),
    ("actor", "micro_batch_size", 0, "--actor.micro_batch_size must be >= 1, got 0"),
    ("discriminator", "micro_batch_prompts", 0, "--discriminator.micro_batch_prompts must be >= 1, got 0"),
    ("trainer", "max_steps", -3, "--trainer.max_steps must be >= 0, got -3"),
    ("trainer", "epochs", 0.0, "--trainer.epochs must be > 0, got 0.0"),
    ("trainer", "save_every", -1, "--trainer.save_every must be >= 0, got -1"),
    ("trainer", "keep_last", 0, "--trainer.keep_last must be >= 1, got 0"),
    ("trainer", "log_every", 0, "--trainer.log_every must be >= 1, got 0"),
    ("actor", "lr", -1.0, "--actor.lr must be >= 0, got -1.0"),
    ("actor", "lr", float("nan"), "--actor.lr must be >= 0, got nan"),
    ("discriminator", "lr", float("inf"), "--discriminator.lr must be >= 0, got inf"),
    ("actor", "kl_coef", -0.1, "--actor.kl_coef must be >= 0, got -0.1"),
    ("actor", "clip_eps", 0.0, "--actor.clip_eps must be > 0, got 0.0"),
    ("actor", "grad_clip", -1.0, "--actor.grad_clip must be >= 0, got -1.0"),
    ("actor", "weight_decay", -0.01, "--actor.weight_decay must be >= 0"),
    ("data", "max_prompt_tokens", 0, "--data.max_prompt_tokens must be >= 1, got 0"),
    ("data", "max_response_tokens", 0, "--data.max_response_tokens must be >= 1, got 0"),
    ("data", "max_rows", -1, "--data.max_rows must be >= 0, got -1"),
    ("data", "eval_split", 1.0, "--data.eval_split must be 0 (off) or a fraction > 0 and < 1, got 1.0"),
    ("data", "eval_split", -0.1, "--data.eval_split must be 0 (off)"),
    ("trainer", "on_nonfinite", "ignore", "--trainer.on_nonfinite must be one of error, skip, got 'ignore'"),
    ("model", "dtype", "fp8", "--model.dtype must be one of auto"),
    ("rollout", "vllm_gpu_memory_utilization", 1.5, "--rollout.vllm_gpu_memory_utilization must be > 0 and <= 1"),
])
def test_validate_rejects_bad_values(section, name, value, text):
    cfg = GADConfig()
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(ValueError, match="invalid configuration") as info:
        validate(cfg)
    assert text in str(info.value)


def test_validate_reports_all_problems_and_runs_on_flags():
    cfg = GADConfig()
    cfg.trainer.stage, cfg.rollout.backend, cfg.deepspeed.zero_stage = "x", "y", 9
    with pytest.raises(ValueError) as info:
        validate(cfg)
    message = str(info.value)
    assert "trainer.stage" in message and "rollout.backend" in message and "deepspeed.zero_stage" in message
    with pytest.raises(ValueError, match="deepspeed.zero_stage must be one of 0, 1, 2, 3, got 5"):
        load_config(["--deepspeed.zero_stage", "5"])
    with pytest.raises(ValueError, match="rollout.backend"):
        load_config(["--rollout.backend", "tpu"])
    with pytest.raises(ValueError, match="trainer.stage must be one of"):
        load_config(["--trainer.stage", "rlhf"])
    for stage in ("seqkd", "warmup", "gad"):
        assert validate(GADConfig()) is not None
        assert validate(load_config([], stage=stage)).trainer.stage == stage


# ----------------------------------------------------------------------------------------------
# DeepSpeed JSON


def test_deepspeed_config_without_user_file():
    from gadchat.engine import deepspeed_config

    cfg = load_config(["--deepspeed.zero_stage", "2"])
    ds = deepspeed_config(cfg, cfg.actor, train=True, dtype=torch.float32)
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["gradient_clipping"] == 0.2
    assert ds["train_micro_batch_size_per_gpu"] == 1 and ds["gradient_accumulation_steps"] == 1
    assert "train_batch_size" not in ds
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}
    assert "gradient_clipping" not in deepspeed_config(cfg, cfg.actor, train=False, dtype=torch.float32)
    assert deepspeed_config(cfg, cfg.actor, train=True, dtype=torch.bfloat16)["bf16"] == {"enabled": True}


def test_user_deepspeed_json_is_merged(tmp_path):
    from gadchat.engine import deepspeed_config

    user = {
        "zero_optimization": {"stage": 2, "overlap_comm": True, "offload_optimizer": {"device": "cpu"}},
        "train_batch_size": 999, "train_micro_batch_size_per_gpu": 7, "gradient_accumulation_steps": 5,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "communication_data_type": "fp32",
    }
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user), encoding="utf-8")
    cfg = load_config(["--deepspeed.config_file", str(path), "--actor.grad_clip", "0.5"])
    ds = deepspeed_config(cfg, cfg.actor, train=True, dtype=torch.float32)
    assert ds["zero_optimization"] == user["zero_optimization"]  # the user's zero settings win
    assert "train_batch_size" not in ds  # the user's batch geometry is dropped; the trainer's stays
    assert ds["train_micro_batch_size_per_gpu"] == 1 and ds["gradient_accumulation_steps"] == 1
    assert ds["communication_data_type"] == "fp32"
    assert ds["optimizer"] == user["optimizer"]
    assert ds["gradient_clipping"] == 0.5
    frozen = deepspeed_config(cfg, cfg.actor, train=False, dtype=torch.float32)
    assert "optimizer" not in frozen and "offload_optimizer" not in frozen["zero_optimization"]
    assert frozen["zero_optimization"]["stage"] == 2


def test_missing_user_deepspeed_json_is_a_clear_error(tmp_path):
    from gadchat.engine import deepspeed_config

    cfg = load_config(["--deepspeed.config_file", str(tmp_path / "missing.json")])
    with pytest.raises(ValueError, match=r"--deepspeed.config_file .*missing\.json: no such file"):
        deepspeed_config(cfg, cfg.actor, train=True, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Published defaults (docs/algorithm.md section 6)


def test_published_defaults():
    cfg = GADConfig()
    assert cfg.trainer.prompts_per_step == 256
    assert cfg.rollout.n == 8
    assert cfg.rollout.temperature == 0.8
    assert cfg.rollout.top_p == 1.0
    assert cfg.data.max_prompt_tokens == 2048
    assert cfg.data.max_response_tokens == 1536
    assert cfg.rollout.max_new_tokens == 1536
    assert cfg.actor.lr == 1e-6 and cfg.discriminator.lr == 1e-6
    assert cfg.actor.grad_clip == 0.2 and cfg.discriminator.grad_clip == 0.2
    assert cfg.actor.kl_coef == 0.001
    assert cfg.actor.clip_eps == 0.2
    assert cfg.actor.entropy_coef == 0.0
    assert cfg.actor.weight_decay == 0.01 and cfg.discriminator.weight_decay == 0.01
    assert cfg.actor.ppo_epochs == 1 and cfg.actor.mini_batches == 1
    assert cfg.trainer.discriminator_warmup == 10
    assert cfg.discriminator.freeze is False


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(["--rollout.n", "3", "--discriminator.freeze", "true", "--actor.lr", "2e-5"], stage="gad")
    save_config(cfg, tmp_path / "sub" / "config.json")
    loaded = config_from_dict(json.loads((tmp_path / "sub" / "config.json").read_text()))
    assert loaded == cfg
    assert loaded.to_dict() == cfg.to_dict()


def test_yaml_that_is_not_a_mapping_is_a_clear_error(tmp_path):
    path = write_yaml(tmp_path / "list.yaml", "- actor\n- discriminator\n")
    with pytest.raises(ValueError, match=r"list\.yaml: expected a mapping of sections, got list"):
        load_config(["--config", str(path)])
    path = write_yaml(tmp_path / "stage_list.yaml", "trainer:\n  stage: [gad]\n")
    with pytest.raises(ValueError, match="trainer.stage must be one of"):
        load_config(["--config", str(path)])


def test_gad_stage_needs_two_samples_per_prompt_and_discriminator_lr_is_free_when_frozen():
    with pytest.raises(ValueError, match=r"--rollout.n must be >= 2 in the GAD stage"):
        load_config(["--rollout.n", "1"], stage="gad")
    assert load_config(["--rollout.n", "1"], stage="warmup").rollout.n == 1  # the BT loss is defined with one sample
    with pytest.raises(ValueError, match=r"--discriminator.lr must be >= 0"):
        load_config(["--discriminator.lr", "-1"], stage="gad")
    assert load_config(["--discriminator.lr", "-1", "--discriminator.freeze", "true"], stage="gad").discriminator.lr == -1
    assert load_config(["--discriminator.lr", "-1"], stage="seqkd").discriminator.lr == -1  # SeqKD trains no discriminator
    assert load_config(["--actor.lr", "0"], stage="gad").actor.lr == 0  # weights held: the hand-off probes


def test_validation_problems_come_on_one_line():
    with pytest.raises(ValueError) as info:
        load_config(["--rollout.temperature", "-1", "--actor.micro_batch_size", "0"])
    message = str(info.value)
    assert "\n" not in message
    assert "--rollout.temperature" in message and "--actor.micro_batch_size" in message


def test_broken_yaml_names_file_and_line(tmp_path):
    path = write_yaml(tmp_path / "broken.yaml", "actor:\n  lr: [1e-6\nrollout:\n  n: 4\n")
    with pytest.raises(ValueError, match=r"broken.yaml, line \d+, column \d+: not valid YAML") as info:
        load_config(["--config", str(path)])
    assert "\n" not in str(info.value)
    bom = tmp_path / "bom.yaml"
    bom.write_bytes("\ufeffrollout:\n  n: 3\n".encode("utf-8"))
    assert load_config(["--config", str(bom)]).rollout.n == 3


def test_paths_are_checked_before_any_engine(tmp_path):
    with pytest.raises(ValueError, match=r"--model.actor_path /nonexistent/model: no such folder"):
        load_config(["--model.actor_path", "/nonexistent/model"]).check_paths()
    with pytest.raises(ValueError, match=r"--model.discriminator_path ./nowhere: no such folder"):
        load_config(["--model.discriminator_path", "./nowhere"]).check_paths()
    load_config(["--model.actor_path", "Qwen/Qwen2.5-0.5B-Instruct"]).check_paths()  # a hub id is not checked
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match=r"--trainer.output_dir .*a_file: is a file, not a folder"):
        load_config(["--trainer.output_dir", str(a_file)]).check_paths()
    with pytest.raises(ValueError, match=r"a_file is a file, not a folder"):
        load_config(["--trainer.output_dir", str(a_file / "run")]).check_paths()
    broken = tmp_path / "ds.json"
    broken.write_text('{"zero_optimization": {"stage": 3,}')
    with pytest.raises(ValueError, match=r"--deepspeed.config_file .*ds.json: not valid JSON"):
        load_config(["--deepspeed.config_file", str(broken)]).check_paths()
    with pytest.raises(ValueError, match=r"--trainer.init_from .*: no such folder"):
        load_config(["--trainer.init_from", str(tmp_path / "none")], stage="gad").check_paths()


def test_the_official_name_critic_warmup_is_an_alias_in_flags_yaml_and_help(tmp_path):
    """The official GAD recipe and verl call the actor gate ``trainer.critic_warmup``."""
    assert load_config(["--trainer.critic_warmup", "4"], stage="warmup").trainer.discriminator_warmup == 4
    config = tmp_path / "official.yaml"
    config.write_text("trainer:\n  critic_warmup: 7\n")
    assert load_config(["--config", str(config)], stage="gad").trainer.discriminator_warmup == 7
    config.write_text("trainer:\n  critic_warmup: 7\n  discriminator_warmup: 3\n")
    with pytest.raises(ValueError, match="critic_warmup and trainer.discriminator_warmup name the same field"):
        load_config(["--config", str(config)])
    assert "--trainer.critic_warmup" in build_parser(stage="gad").format_help()
