"""Memory-lean log-probs (issue 11): the chunked path over the final hidden states and the LM head
equals the plain full-logits path in value (1e-5) and gradient, with and without temperature
scaling, on the tiny model in float32; and the temperature scaling is the verl one."""

from __future__ import annotations

import math

import pytest
import torch

from gadchat.batch import SequenceBatch
from gadchat.logprobs import sequence_log_probs
from gadchat.losses import chunked_token_log_probs, token_entropy, token_log_probs


def test_temperature_scaled_log_probs_and_entropy_are_those_of_logits_over_t():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=generator) * 3
    labels = torch.randint(0, 7, (2, 3), generator=generator)
    for t in (0.5, 0.8, 1.3):
        expected = torch.log_softmax(logits / t, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(token_log_probs(logits, labels, t), expected, atol=1e-6)
        p = torch.softmax(logits.double() / t, -1)
        assert torch.allclose(token_entropy(logits, t).double(), -(p * p.log()).sum(-1), atol=1e-5)
    # T = 1 is bit for bit the unscaled computation
    assert torch.equal(token_log_probs(logits, labels, 1.0), token_log_probs(logits, labels))
    # hand value: logits log([1, 2, 5]) at T = 0.5 -> probabilities [1, 4, 25] / 30
    hand = torch.tensor([[math.log(1.0), math.log(2.0), math.log(5.0)]])
    assert token_log_probs(hand, torch.tensor([2]), 0.5).item() == pytest.approx(math.log(25 / 30), abs=1e-6)


@pytest.mark.parametrize("chunk", [1, 3, 16, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_token_log_probs_equal_plain_values_and_gradients(chunk, temperature):
    generator = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(8, 29, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(29, 8, generator=generator))
    hidden = torch.randn(11, 8, generator=generator, requires_grad=True)
    labels = torch.randint(0, 29, (11,), generator=generator)
    weights = torch.rand(11, generator=generator)

    def run(chunked):
        hidden.grad, head.weight.grad = None, None
        if chunked:
            lp, ent = chunked_token_log_probs(head, hidden, labels, chunk, temperature, with_entropy=True)
        else:
            logits = head(hidden)
            lp, ent = token_log_probs(logits, labels, temperature), token_entropy(logits, temperature)
        ((lp * weights).sum() + 0.3 * (ent * weights).sum()).backward()
        return lp.detach(), ent.detach(), hidden.grad.clone(), head.weight.grad.clone()

    for mine, plain in zip(run(True), run(False)):
        assert torch.allclose(mine, plain, atol=1e-5, rtol=1e-5)


def test_chunked_empty_input_keeps_a_graph():
    head = torch.nn.Linear(4, 5)
    lp, ent = chunked_token_log_probs(head, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 8)
    assert lp.shape == (0,) and ent is None and lp.requires_grad


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.config.use_cache = False
    return model


def _batch(vocab: int) -> SequenceBatch:
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in (5, 9, 3)]
    responses = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in (7, 2, 12)]
    return SequenceBatch.build(prompts, responses, pad_token_id=0)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_chunked_sequence_log_probs_equal_plain_on_the_tiny_model(model, checkpointing, temperature):
    """Values at the response positions and every parameter's gradient of a PPO-like loss (log-prob
    and entropy terms) agree with the plain path within 1e-5; with gradient checkpointing in
    training mode too."""
    batch = _batch(model.config.vocab_size)
    mask = batch.target_mask
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    try:
        results = {}
        for chunk in (0, 4, 1024):
            model.zero_grad(set_to_none=True)
            lp, ent = sequence_log_probs(model, model, batch, chunk, temperature, with_entropy=True)
            loss = (lp * mask).sum() / mask.sum() - 0.1 * (ent * mask).sum() / mask.sum()
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            results[chunk] = (lp.detach() * mask, ent.detach() * mask, grads)
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
    plain = results[0]
    for chunk in (4, 1024):
        lp, ent, grads = results[chunk]
        assert torch.allclose(lp, plain[0], atol=1e-5, rtol=0), (chunk, (lp - plain[0]).abs().max())
        assert torch.allclose(ent, plain[1], atol=1e-5, rtol=0)
        for name, grad in grads.items():
            assert torch.allclose(grad, plain[2][name], atol=1e-5, rtol=1e-4), (chunk, name)
    # the plain path is today's: token_log_probs of the model's own logits
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        today = token_log_probs(logits, batch.input_ids[:, 1:], temperature)
    assert torch.allclose(plain[0], today * mask, atol=1e-6)


def test_chunked_path_without_grad_matches(model):
    batch = _batch(model.config.vocab_size)
    mask = batch.target_mask
    with torch.no_grad():
        chunked, _ = sequence_log_probs(model, model, batch, 5, 0.8)
        plain, _ = sequence_log_probs(model, model, batch, 0, 0.8)
    assert torch.allclose(chunked * mask, plain * mask, atol=1e-5)
    assert torch.all(chunked[mask == 0] == 0)  # outside the response: not computed
