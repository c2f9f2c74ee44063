"""The generation backend interface: both implementations, the name -> class factory, and the two
ways of building a backend (colocated with training, from a model folder), on a tiny random model.
vLLM runs for real where it is installed (in a subprocess, as the launchers run it)."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import HAS_VLLM, REPO, subprocess_env
from gadchat.generation import (
    BACKEND_CLASSES,
    BACKENDS,
    GenerationBackend,
    HFBackend,
    VLLMBackend,
    backend_class,
    choose_backend,
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}],
    [{"role": "user", "content": "Write a haiku about rain."}],
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    from gadchat.data import encode_prompt

    return [encode_prompt(tokenizer, messages) for messages in CONVERSATIONS]


def test_both_backends_implement_the_interface():
    assert set(BACKEND_CLASSES.values()) == {VLLMBackend, HFBackend}
    for name, cls in BACKEND_CLASSES.items():
        assert issubclass(cls, GenerationBackend) and not getattr(cls, "__abstractmethods__", None)
        assert cls.name == name
        assert isinstance(cls.follows_actor, bool) and isinstance(cls.streams, bool)
    assert VLLMBackend.follows_actor is True  # holds its own weights: the trainer pushes the actor's
    assert HFBackend.follows_actor is False  # generates with the training module itself
    assert HFBackend.streams is True and VLLMBackend.streams is False
    assert VLLMBackend.available() == HAS_VLLM and HFBackend.available()
    with pytest.raises(TypeError):
        GenerationBackend()  # the interface itself is abstract


def test_factory_maps_names_to_classes_and_refuses_others():
    assert BACKENDS == ("auto", "vllm", "hf")
    assert backend_class("hf") is HFBackend
    assert backend_class("auto") is (VLLMBackend if HAS_VLLM else HFBackend)
    assert choose_backend("auto") == backend_class("auto").name
    if HAS_VLLM:
        assert backend_class("vllm") is VLLMBackend
    else:
        with pytest.raises(ValueError, match="backend 'vllm' asked for but vLLM is not installed"):
            backend_class("vllm")
    for unknown in ("tgi", "VLLM", ""):
        with pytest.raises(ValueError, match=rf"unknown generation backend {unknown!r} \(choose from auto, vllm, hf\)"):
            backend_class(unknown)


def test_hf_backend_colocated_and_from_folder_agree(tiny_model, tokenizer, prompts):
    from transformers import AutoModelForCausalLM

    from_folder = HFBackend.from_model_folder(str(tiny_model), tokenizer, dtype="float32", batch_size=4)
    eos = {tokenizer.eos_token_id}
    assert from_folder.eos_ids == eos and from_folder.pad_token_id == tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.train()  # as the actor is between updates
    colocated = HFBackend(SimpleNamespace(module=model), tokenizer.pad_token_id, eos, synced_gpus=False,
                          micro_batch_size=4)

    sampled = colocated.generate(prompts, 2, 1.0, 0.9, 10, seed=3)
    assert model.training and model.config.use_cache is False  # the actor's modes are given back
    assert sampled == from_folder.generate(prompts, 2, 1.0, 0.9, 10, seed=3)
    assert sampled == colocated.generate(prompts, 2, 1.0, 0.9, 10, seed=3)  # seeded: reproducible
    assert [len(group) for group in sampled] == [2] * len(prompts)
    for response in (r for group in sampled for r in group):
        assert 1 <= len(response) <= 10
        assert not eos & set(response[:-1])  # trimmed after the first EOS
    greedy = from_folder.generate(prompts, 3, 1.0, 1.0, 10, seed=0, greedy=True)
    assert all(group == [group[0]] * 3 for group in greedy)
    assert greedy == colocated.generate(prompts, 3, 0.5, 0.5, 10, seed=9, greedy=True)

    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    streamed = from_folder.stream(prompts[0], 1.0, 0.9, 10, 3, False, streamer)
    assert streamed == from_folder.generate(prompts[:1], 1, 1.0, 0.9, 10, seed=3)[0][0]
    assert "".join(streamer) == tokenizer.decode(streamed)
    with pytest.raises(NotImplementedError, match="no weights of its own"):
        colocated.load_weights(model.named_parameters())
    from_folder.close()


VLLM_SCRIPT = r"""
import json, sys
from types import SimpleNamespace
from gadchat import runtime
runtime.set_process_defaults()
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from gadchat.generation import HFBackend, VLLMBackend

folder, prompts = sys.argv[1], json.loads(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(folder)
eos = {tokenizer.eos_token_id}
out = {}
colocated = VLLMBackend(folder, folder, torch.float32, max_model_len=256, eos_ids=eos, seed=0)
out["colocated"] = colocated.generate(prompts, 2, 1.0, 1.0, 10, seed=0, greedy=True)
colocated.close()
backend = VLLMBackend.from_model_folder(folder, tokenizer, max_model_len=256)
out["eos"] = sorted(backend.eos_ids)
out["from_folder"] = backend.generate(prompts, 2, 1.0, 1.0, 10, seed=0, greedy=True)
out["sampled"] = [backend.generate(prompts, 3, 1.0, 0.9, 10, seed=4) for _ in range(2)]
try:
    backend.stream(prompts[0], 1.0, 1.0, 10, 0, True, None)
except NotImplementedError as err:
    out["stream"] = str(err)
# follows_actor: push moved weights, then vLLM's greedy answers are the moved model's
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
torch.manual_seed(1)
with torch.no_grad():
    for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
actor = HFBackend(SimpleNamespace(module=model), tokenizer.pad_token_id, eos, synced_gpus=False)
out["hf_before"] = actor.generate(prompts, 1, 1.0, 1.0, 10, seed=0, greedy=True)
backend.load_weights(iter(list(model.named_parameters())))
out["after"] = backend.generate(prompts, 1, 1.0, 1.0, 10, seed=0, greedy=True)
print("@@" + json.dumps(out))
"""


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed")
def test_vllm_backend_both_constructors_and_weight_push(tiny_model, tokenizer, prompts):
    hf = HFBackend.from_model_folder(str(tiny_model), tokenizer, dtype="float32")
    hf_greedy = hf.generate(prompts, 2, 1.0, 1.0, 10, seed=0, greedy=True)
    result = subprocess.run([sys.executable, "-c", VLLM_SCRIPT, str(tiny_model), json.dumps(prompts)], cwd=REPO,
                            env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads([line for line in result.stdout.splitlines() if line.startswith("@@")][-1][2:])
    assert out["eos"] == [tokenizer.eos_token_id]
    assert out["colocated"] == out["from_folder"] == hf_greedy  # fp32 on CPU: the same argmax
    first, second = out["sampled"]
    assert first == second  # seeded, and no KV reused from the earlier call
    assert [len(group) for group in first] == [3] * len(prompts) and len({tuple(r) for g in first for r in g}) > 1
    assert all(1 <= len(r) <= 10 and tokenizer.eos_token_id not in r[:-1] for g in first for r in g)
    assert "does not stream" in out["stream"]
    assert out["after"] == out["hf_before"] != [group[:1] for group in hf_greedy]


def test_zero3_actor_generates_the_same_tokens_with_its_weights_gathered_once(tiny_model, tmp_path):
    """rollout.hf_gather_weights (the default): the actor's ZeRO-3 weights gathered once per generate
    call give the tokens the per-layer gathers give, and leave the weights partitioned and the
    partitioning hooks in place, so the next update trains as before (2 ranks, real DeepSpeed)."""
    from conftest import launch_probe, tiny_args

    probe = tmp_path / "probe.pt"
    launch_probe("gather_probe.py", 2, tiny_args(tiny_model, tmp_path / "run", "--rollout.backend", "hf"), probe,
                 timeout=300)
    seen = torch.load(probe)
    assert seen["gather_True"] and not seen["gather_False"]
    assert seen["tokens_True"] == seen["tokens_False"]
    assert all(len(sample) > 0 for samples in seen["tokens_True"] for sample in samples)
    assert seen["partitioned_before"] and seen["partitioned_after_True"] and seen["partitioned_after_False"]
    assert seen["hooks_restored"]
    assert seen["partitioned_after_update"] and seen["update_loss"] > 0


SWITCH_SCRIPT = r"""
import json, sys
import torch
from gadchat.generation import GenerationSettings, Generator
a, b = sys.argv[1], sys.argv[2]
conversations = json.loads(sys.argv[3])
def run(generator):
    greedy = generator.generate(conversations, GenerationSettings(max_new_tokens=12))
    sampled = generator.generate(conversations, GenerationSettings(max_new_tokens=12, temperature=1.0, n=2, seed=3))
    return [[list(c.token_ids) for c in group] for group in greedy + sampled]
first = Generator(a, backend="vllm", seed=0)
out = {"a": run(first), "switched": first.switch_model(b)}
out["b_switched"] = run(first)
first.close()
fresh = Generator(b, backend="vllm", seed=0)
out["b_fresh"] = run(fresh)
fresh.close()
print("@@" + json.dumps(out))
"""


@pytest.mark.vllm
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed")
def test_a_generator_switched_to_other_weights_generates_what_a_fresh_engine_does(tiny_model, tmp_path):
    """One vLLM engine for several models of a shape (the known-teacher evaluation): the weights of
    the second folder loaded in place give the fresh engine's greedy and seeded samples exactly."""
    import shutil

    from safetensors.torch import load_file, save_file

    from gadchat.generation.generator import same_model_shape

    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    weights = load_file(str(other / "model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in weights.items()},
              str(other / "model.safetensors"), metadata={"format": "pt"})
    assert same_model_shape(str(tiny_model), str(other))
    reshaped = tmp_path / "reshaped"
    shutil.copytree(tiny_model, reshaped)
    config = json.loads((reshaped / "config.json").read_text())
    (reshaped / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    assert not same_model_shape(str(tiny_model), str(reshaped))
    result = subprocess.run([sys.executable, "-c", SWITCH_SCRIPT, str(tiny_model), str(other), json.dumps(CONVERSATIONS)],
                            cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads([line for line in result.stdout.splitlines() if line.startswith("@@")][-1][2:])
    assert out["switched"]
    assert out["b_switched"] == out["b_fresh"]
    assert out["a"] != out["b_fresh"]  # the weights matter: a switch that loaded nothing would fail above
