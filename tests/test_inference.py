"""Generation, the chat CLI and batch generation on a tiny random model folder (CPU)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gadchat.generation import GenerationSettings, Generator, choose_backend, resolve_model_path
from gadchat.tiny import ensure_tiny_model

REPO = Path(__file__).resolve().parent.parent
HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed")
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}],
]


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    return ensure_tiny_model(tmp_path_factory.getbasetemp() / "tiny_model_shared")


@pytest.fixture(scope="module")
def hf_generator(tiny_chat_model):
    generator = Generator(str(tiny_chat_model), backend="hf", batch_size=4)
    yield generator
    generator.close()


def run_module(module, args, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, **kwargs)


def test_model_path_resolution(tiny_chat_model, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_chat_model, run / "final" / "actor")
    assert resolve_model_path(str(run)) == str(run / "final" / "actor")
    assert resolve_model_path(str(tiny_chat_model)) == str(tiny_chat_model)
    assert resolve_model_path("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"  # a hub id, untouched
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ValueError, match="unknown generation backend"):
        choose_backend("tgi")


def test_hf_greedy_sampled_and_n(hf_generator):
    greedy = hf_generator.generate(CONVERSATIONS, GenerationSettings(max_new_tokens=16, temperature=0.0, n=3))
    assert [len(group) for group in greedy] == [3, 3]
    for group in greedy:
        assert len({c.text for c in group}) == 1  # greedy: n identical answers
        assert all(c.finish_reason in ("stop", "length") and 1 <= c.num_tokens <= 16 for c in group)
    assert greedy == hf_generator.generate(CONVERSATIONS, GenerationSettings(max_new_tokens=16, n=3))
    sampled = hf_generator.generate(CONVERSATIONS, GenerationSettings(max_new_tokens=16, temperature=1.0, n=3, seed=5))
    assert [len(group) for group in sampled] == [3, 3]
    assert len({c.text for c in sampled[0] + sampled[1]}) > 1
    again = hf_generator.generate(CONVERSATIONS, GenerationSettings(max_new_tokens=16, temperature=1.0, n=3, seed=5))
    assert [[c.text for c in g] for g in again] == [[c.text for c in g] for g in sampled]  # seeded: reproducible


def test_finish_reason_and_eos_trimming(hf_generator):
    tokenizer = hf_generator.tokenizer
    words = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    stopped = hf_generator._completion(words + [tokenizer.eos_token_id, tokenizer.pad_token_id], 8)
    assert (stopped.text, stopped.finish_reason, stopped.num_tokens) == ("hello world", "stop", len(words) + 1)
    cut = hf_generator._completion(words, len(words))
    assert (cut.text, cut.finish_reason) == ("hello world", "length")


def test_hf_streaming_yields_pieces_that_make_the_answer(hf_generator):
    pieces = []
    settings = GenerationSettings(max_new_tokens=16, temperature=1.0, seed=3)
    completion = hf_generator.stream(CONVERSATIONS[0], settings, on_text=pieces.append)
    assert len(pieces) > 1
    assert "".join(pieces).strip() == completion.text.strip()
    assert completion.num_tokens <= 16


def test_chat_cli_keeps_history_resets_and_exits(tiny_chat_model):
    lines = "hello there\nand what about cats?\n\n/reset\nstart again\n/exit\nthis line is never answered\n"
    result = run_module("inference.chat", ["--model", str(tiny_chat_model), "--max-new-tokens", "8", "--temperature", "1.0",
                                           "--system", "You are terse."], input=lines)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant> ") == 3
    assert "[history cleared]" in result.stdout
    turns = [line for line in result.stderr.splitlines() if line.startswith("[turn ")]
    assert len(turns) == 3
    prompt_tokens = [int(t.split(": ")[1].split()[0]) for t in turns]
    assert prompt_tokens[1] > prompt_tokens[0] + 5  # turn 2 sees turn 1 in its history
    assert "history=5 messages" in turns[1] and "history=3 messages" in turns[2]  # system + user + assistant after /reset
    assert prompt_tokens[2] < prompt_tokens[1]


def test_batch_generate_hf_with_mapped_prompt_key(tiny_chat_model, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": f"Write about topic {i}.", "id": i}) + "\n" for i in range(3)))
    out = tmp_path / "gen" / "out.jsonl"
    result = run_module("inference.batch_generate", ["--model", str(tiny_chat_model), "--prompts", str(prompts),
                                                     "--prompt-key", "instruction", "--output", str(out), "--n", "2",
                                                     "--temperature", "1.0", "--max-new-tokens", "10", "--backend", "hf"])
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in open(out)]
    assert [r["row"] for r in rows] == [0, 1, 2]
    for i, row in enumerate(rows):
        assert row["prompt"] == [{"role": "user", "content": f"Write about topic {i}."}]
        assert len(row["generations"]) == len(row["finish_reasons"]) == len(row["num_tokens"]) == 2
        assert all(reason in ("stop", "length") for reason in row["finish_reasons"])
        assert all(1 <= n <= 10 for n in row["num_tokens"])
    assert "3 prompts x 2 samples" in result.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": [{"role": "user"}]}) + "\n")
    result = run_module("inference.batch_generate", ["--model", str(tiny_chat_model), "--prompts", str(bad),
                                                     "--output", str(out), "--backend", "hf"])
    assert result.returncode == 2 and f"{bad}, row 1, field 'content[0].content'" in result.stderr


@needs_vllm
def test_batch_generate_vllm_matches_hf_greedy(tiny_chat_model, hf_generator, tmp_path):
    out = tmp_path / "vllm.jsonl"
    heldout = str(REPO / "data" / "alpaca_eval_gpt4o" / "test.jsonl")
    result = run_module("inference.batch_generate", ["--model", str(tiny_chat_model), "--prompts", heldout, "--limit", "3", "--output", str(out), "--max-new-tokens", "16",
                                                     "--backend", "vllm", "--max-model-len", "1024"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(vllm)" in result.stdout
    rows = [json.loads(line) for line in open(out)]
    hf = hf_generator.generate([r["prompt"] for r in rows], GenerationSettings(max_new_tokens=16))
    assert [r["generations"][0] for r in rows] == [group[0].text for group in hf]
    assert [r["finish_reasons"][0] for r in rows] == [group[0].finish_reason for group in hf]


@needs_vllm
def test_vllm_generator_sampled_n_and_stream(tiny_chat_model):
    script = (
        "import json\n"
        "from gadchat.generation import Generator, GenerationSettings\n"
        f"g = Generator({str(tiny_chat_model)!r}, backend='vllm', max_model_len=512)\n"
        f"convs = {CONVERSATIONS!r}\n"
        "s = GenerationSettings(max_new_tokens=12, temperature=1.0, n=3, seed=1)\n"
        "a = g.generate(convs, s); b = g.generate(convs, s)\n"
        "pieces = []; c = g.stream(convs[0], GenerationSettings(max_new_tokens=6), on_text=pieces.append)\n"
        "print('RESULT ' + json.dumps({'a': [[x.text for x in grp] for grp in a], 'b': [[x.text for x in grp] for grp in b],"
        " 'tokens': [x.num_tokens for grp in a for x in grp], 'pieces': pieces, 'stream': c.text}))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert [len(group) for group in data["a"]] == [3, 3]
    assert data["a"] == data["b"]  # seeded sampling is reproducible
    assert data["a"][0] != data["a"][1]  # prompts get distinct random streams
    assert len({text for group in data["a"] for text in group}) > 1
    assert all(1 <= n <= 12 for n in data["tokens"])
    assert data["pieces"] == [data["stream"]]
