"""The discriminator scores the last valid response token, and teacher and student sequences end
the same way (EOS symmetry, docs/algorithm.md section 3.3)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from gadchat.config import DataConfig
from gadchat.data import encode_prompt, encode_response, load_teacher_data
from gadchat.batch import SequenceBatch
from gadchat.models import load_discriminator
from gadchat.generation import trim_at_eos


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def discriminator(tiny_model, tokenizer):
    model = load_discriminator(str(tiny_model), tokenizer.pad_token_id, torch.float32, "sdpa", seed=3)
    return model.eval()


def score(discriminator, batch: SequenceBatch) -> torch.Tensor:
    with torch.no_grad():
        return discriminator(batch.input_ids, batch.attention_mask, batch.last_index)


def test_same_text_as_teacher_and_as_student_scores_the_same(discriminator, tokenizer):
    messages = [{"role": "user", "content": "Name three primary colours."}]
    text = "Red, yellow and blue are the traditional primary colours."
    prompt = encode_prompt(tokenizer, messages)
    teacher_response = encode_response(tokenizer, text)  # the data pipeline's teacher tokens
    eos = tokenizer.eos_token_id
    # What a rollout backend returns for a student that wrote the same text: the generated ids
    # cut after the EOS it produced (anything after it, e.g. HF's padding, is dropped).
    generated = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos, tokenizer.pad_token_id, 17]
    student_response = trim_at_eos(generated, {eos})
    assert teacher_response == student_response and teacher_response[-1] == eos

    # Scored inside batches of different widths (right padding), as in training.
    long_prompt = prompt + tokenizer(" and more words to pad", add_special_tokens=False)["input_ids"]
    teacher_batch = SequenceBatch.build([prompt, long_prompt], [teacher_response, teacher_response], tokenizer.pad_token_id)
    student_batch = SequenceBatch.build([prompt] * 3, [student_response, student_response[:3], student_response],
                                        tokenizer.pad_token_id)
    teacher_scores, student_scores = score(discriminator, teacher_batch), score(discriminator, student_batch)
    assert torch.allclose(teacher_scores[0], student_scores[0], atol=1e-5)
    assert torch.allclose(student_scores[0], student_scores[2], atol=1e-5)
    # The score sits on the EOS: the last valid position of each row.
    assert teacher_batch.input_ids[0, teacher_batch.last_index[0]] == eos
    assert student_batch.input_ids[1, student_batch.last_index[1]] != eos

    # Control: a teacher sequence without the EOS is scored on another token and differs, which is
    # the shortcut EOS symmetry prevents.
    no_eos = SequenceBatch.build([prompt], [teacher_response[:-1]], tokenizer.pad_token_id)
    assert not torch.allclose(score(discriminator, no_eos)[0], student_scores[0], atol=1e-4)


def test_teacher_data_ends_with_the_student_eos(tokenizer):
    examples, _ = load_teacher_data(DataConfig(max_prompt_tokens=256, max_response_tokens=512), tokenizer, max_rows=20)
    for example in examples:
        assert example.response_ids[-1] == tokenizer.eos_token_id
        assert tokenizer.eos_token_id not in example.response_ids[:-1]
        assert tokenizer.decode(example.response_ids[:-1]) == example.response


def test_head_is_initialised_explicitly_and_deterministically(tiny_model, tokenizer):
    a = load_discriminator(str(tiny_model), tokenizer.pad_token_id, torch.float32, "sdpa", seed=5)
    b = load_discriminator(str(tiny_model), tokenizer.pad_token_id, torch.float32, "sdpa", seed=5)
    c = load_discriminator(str(tiny_model), tokenizer.pad_token_id, torch.float32, "sdpa", seed=6)
    weight = a.seqcls.score.weight
    assert torch.equal(weight, b.seqcls.score.weight) and not torch.equal(weight, c.seqcls.score.weight)
    expected_std = 1.0 / (tiny_hidden(a) + 1) ** 0.5
    assert 0.5 * expected_std < float(weight.detach().std()) < 1.5 * expected_std


def tiny_hidden(model) -> int:
    return model.seqcls.config.hidden_size


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_token_pooling_sums_the_head_over_response_tokens(tiny_model, tokenizer, pooling):
    """``--discriminator.pooling sum|mean``: D is the sum (mean) of the head's output over the response
    tokens only; prompt and padding positions do not count; ``last`` stays the last-token score."""
    pooled = load_discriminator(str(tiny_model), tokenizer.pad_token_id, torch.float32, "sdpa", seed=3,
                                pooling=pooling).eval()
    last = load_discriminator(str(tiny_model), tokenizer.pad_token_id, torch.float32, "sdpa", seed=3).eval()
    prompts = [[5, 6, 7], [8, 9]]
    responses = [[10, 11, tokenizer.eos_token_id], [12, tokenizer.eos_token_id]]
    batch = SequenceBatch.build(prompts, responses, tokenizer.pad_token_id)
    with torch.no_grad():
        got = pooled(batch.input_ids, batch.attention_mask, batch.last_index, batch.response_mask)
        hidden = pooled.seqcls.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        per_token = pooled.seqcls.score(hidden).squeeze(-1)
        expected = [per_token[0, 3:6].sum(), per_token[1, 2:4].sum()]
        if pooling == "mean":
            expected = [expected[0] / 3, expected[1] / 2]
        assert torch.allclose(got, torch.stack(expected), atol=1e-6)
        same_last = last(batch.input_ids, batch.attention_mask, batch.last_index)
        assert torch.allclose(same_last, torch.stack([per_token[0, 5], per_token[1, 3]]), atol=1e-6)
    with pytest.raises(ValueError, match="response mask"):
        pooled(batch.input_ids, batch.attention_mask, batch.last_index)
