"""Losses of GAD (docs/algorithm.md section 4) against numbers worked out by hand on tiny tensors.

Every expected value below is written out from the formula, not computed by calling the function
under test again; the Bradley-Terry test additionally compares against the naive formulation that
pairs every student sample with its own copy of the teacher sequence.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gadchat.losses import (bradley_terry_loss, bradley_terry_teacher_gradient, discriminator_metrics, grpo_advantages,
                            k3_kl, kl_loss, masked_mean, masked_sum, ppo_clip_loss, sft_loss, token_entropy,
                            token_log_probs)

LN2, LN3 = math.log(2.0), math.log(3.0)


def close(actual, expected, tol=1e-6):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, atol=tol, rtol=tol), (actual, expected)


# ----------------------------------------------------------------------------------------------
# masked_mean / masked_sum

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_masked_sum_and_token_mean():
    assert masked_sum(VALUES, MASK).item() == 7.0  # 1 + 2 + 4
    close(masked_mean(VALUES, MASK), 7.0 / 3.0)  # three valid tokens
    close(masked_mean(VALUES, torch.ones(2, 3)), 21.0 / 6.0)


def test_masked_mean_is_a_token_mean_not_a_mean_of_sequence_means():
    # sequence means would be (1.5 + 4) / 2 = 2.75; the token mean is 7 / 3
    assert abs(masked_mean(VALUES, MASK).item() - 2.75) > 0.4


def test_masked_mean_empty_mask_is_zero_not_nan():
    out = masked_mean(VALUES, torch.zeros(2, 3))
    assert out.item() == 0.0


def test_masked_mean_denominator_override():
    close(masked_mean(VALUES, MASK, denominator=10.0), 0.7)
    close(masked_mean(VALUES, MASK, denominator=torch.tensor(2.0)), 3.5)


def test_micro_batch_shares_sum_to_the_whole_batch_token_mean():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0], [10.0, 11.0, 12.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    # whole batch: (1+2+3 + 4 + 7+8) / 6 = 25 / 6
    whole = 25.0 / 6.0
    close(masked_mean(values, mask), whole)
    total_tokens = mask.sum()
    shares = [masked_mean(values[i:i + 2], mask[i:i + 2], denominator=total_tokens) for i in (0, 2)]
    close(shares[0], 10.0 / 6.0)
    close(shares[1], 15.0 / 6.0)
    close(sum(shares), whole)
    # without the override, the micro-batch means average to something else: (10/4 + 15/2) / 2 = 5.0
    naive = (masked_mean(values[:2], mask[:2]) + masked_mean(values[2:], mask[2:])) / 2
    close(naive, 5.0)


# ----------------------------------------------------------------------------------------------
# token_log_probs / token_entropy

# softmax(log([1, 2, 5])) = [1/8, 2/8, 5/8]; softmax(zeros(3)) = [1/3, 1/3, 1/3]
LOGITS = torch.tensor([[[math.log(1.0), math.log(2.0), math.log(5.0)], [0.0, 0.0, 0.0]],
                       [[math.log(5.0) + 7.0, math.log(2.0) + 7.0, math.log(1.0) + 7.0], [10.0, 0.0, 0.0]]])


def test_token_log_probs_hand_values():
    labels = torch.tensor([[2, 1], [0, 0]])
    out = token_log_probs(LOGITS, labels)
    z = math.log(1.0 + 2.0 * math.exp(-10.0))  # log(e^10 + 1 + 1) - 10
    close(out, [[math.log(5 / 8), math.log(1 / 3)], [math.log(5 / 8), -z]])
    assert out.dtype == torch.float32


def test_token_log_probs_equals_log_softmax_gather():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=generator) * 4
    labels = torch.randint(0, 11, (3, 5), generator=generator)
    expected = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    close(token_log_probs(logits, labels), expected, tol=1e-5)
    # bfloat16 logits are upcast: the result is float32 and equals the float32 computation on the same values
    low = logits.bfloat16()
    out = token_log_probs(low, labels)
    assert out.dtype == torch.float32
    close(out, torch.log_softmax(low.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1), tol=1e-5)


def test_token_log_probs_gradient_matches_cross_entropy():
    logits = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(1), requires_grad=True)
    labels = torch.tensor([[0, 6, 3, 3], [1, 2, 5, 4]])
    token_log_probs(logits, labels).sum().backward()
    mine = logits.grad.clone()
    logits.grad = None
    (-F.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1), reduction="sum")).backward()
    close(mine, logits.grad, tol=1e-5)


def test_token_entropy_hand_values():
    out = token_entropy(LOGITS)
    h_125 = -(1 / 8 * math.log(1 / 8) + 2 / 8 * math.log(2 / 8) + 5 / 8 * math.log(5 / 8))
    p = [math.exp(10.0) / (math.exp(10.0) + 2.0), 1.0 / (math.exp(10.0) + 2.0), 1.0 / (math.exp(10.0) + 2.0)]
    h_peaked = -sum(q * math.log(q) for q in p)
    close(out, [[h_125, math.log(3.0)], [h_125, h_peaked]], tol=1e-6)
    close(token_entropy(torch.zeros(1, 4)), [math.log(4.0)])


def test_token_entropy_equals_minus_sum_p_log_p():
    logits = torch.randn(4, 6, 13, generator=torch.Generator().manual_seed(2)) * 3
    p = torch.softmax(logits.double(), -1)
    expected = -(p * torch.log(p)).sum(-1)
    close(token_entropy(logits), expected, tol=1e-5)


# ----------------------------------------------------------------------------------------------
# SFT loss


def test_sft_loss_hand_values():
    log_probs = torch.tensor([[-0.5, -1.0, -2.0], [-0.25, -0.75, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 2: two teacher tokens, then padding
    close(sft_loss(log_probs, mask), (0.5 + 1.0 + 2.0 + 0.25 + 0.75) / 5)
    close(sft_loss(log_probs, mask, denominator=9.0), 4.5 / 9.0)


def test_sft_loss_is_token_mean_cross_entropy_including_the_eos():
    """Teacher response = two text tokens + EOS (id 3); the EOS position counts like any other token."""
    eos = 3
    # position t predicts label t. Probabilities of the labels: 1/2, 1/4, 1/8 (the EOS), then a pad.
    logits = torch.full((1, 4, 4), -1e9)
    logits[0, 0, [0, 1]] = 0.0  # label 0 with p = 1/2
    logits[0, 1, :] = 0.0  # label 2 with p = 1/4
    logits[0, 2, :] = torch.tensor([math.log(7.0 / 3.0), math.log(7.0 / 3.0), math.log(7.0 / 3.0), 0.0])  # EOS p=1/8
    logits[0, 3, :] = 0.0
    labels = torch.tensor([[0, 2, eos, 0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # teacher tokens incl. EOS, not the pad
    loss = sft_loss(token_log_probs(logits, labels), mask)
    close(loss, (LN2 + 2 * LN2 + 3 * LN2) / 3)  # = 2 ln 2; without the EOS it would be 1.5 ln 2
    close(loss, F.cross_entropy(logits[0, :3], labels[0, :3]))


# ----------------------------------------------------------------------------------------------
# Bradley-Terry loss


def test_bradley_terry_loss_hand_values():
    teacher = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    student = torch.tensor([[1.0, 1.0 - LN3], [2.0 + LN3, 2.0]], dtype=torch.float64, requires_grad=True)
    # margins r_t - r_s = [[0, ln3], [-ln3, 0]] -> -logsigmoid = log(1 + e^-d) = [[ln2, ln(4/3)], [ln4, ln2]]
    loss = bradley_terry_loss(teacher, student)
    close(loss, (LN2 + math.log(4 / 3) + math.log(4.0) + LN2) / 4)
    close(loss, (6 * LN2 - LN3) / 4)
    loss.backward()
    # d/d r_t of -logsigmoid(d) is -sigmoid(-d): sigmoid(0)=1/2, sigmoid(-ln3)=1/4, sigmoid(ln3)=3/4; 4 pairs
    close(teacher.grad, [-(0.5 + 0.25) / 4, -(0.75 + 0.5) / 4])
    close(student.grad, [[0.5 / 4, 0.25 / 4], [0.75 / 4, 0.5 / 4]])


def test_bradley_terry_loss_prefers_teacher_above_student():
    teacher = torch.tensor([0.0])
    assert bradley_terry_loss(teacher, torch.tensor([[-5.0]])).item() < 0.01
    assert bradley_terry_loss(teacher, torch.tensor([[5.0]])).item() > 5.0
    close(bradley_terry_loss(teacher, torch.tensor([[0.0]])), LN2)


class CountingLinear(torch.nn.Linear):
    """A discriminator head over fixed sequence features that counts the sequences it scores."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows_scored = 0

    def forward(self, x):
        self.rows_scored += x.reshape(-1, x.shape[-1]).shape[0]
        return super().forward(x).squeeze(-1)


@pytest.mark.parametrize("prompts,n", [(1, 1), (2, 3), (3, 8)])
def test_bradley_terry_teacher_scored_once_equals_naive_pairing(prompts, n):
    """Scoring the teacher once per prompt gives the same loss and the same gradients (teacher and
    student scores, and the discriminator's parameters) as the naive version that repeats the
    teacher sequence n times and scores every copy."""
    hidden = 5
    generator = torch.Generator().manual_seed(10 * prompts + n)
    teacher_feats = torch.randn(prompts, hidden, generator=generator, dtype=torch.float64)
    student_feats = torch.randn(prompts, n, hidden, generator=generator, dtype=torch.float64)
    torch.manual_seed(0)
    disc = CountingLinear(hidden, 1).double()
    naive_disc = CountingLinear(hidden, 1).double()
    naive_disc.load_state_dict(disc.state_dict())

    # efficient: one teacher score per prompt
    r_t = disc(teacher_feats)
    r_s = disc(student_feats)
    r_t.retain_grad()
    r_s.retain_grad()
    loss = bradley_terry_loss(r_t, r_s)
    loss.backward()
    assert disc.rows_scored == prompts + prompts * n

    # naive: every sample paired with its own copy of its prompt's teacher sequence
    teacher_copies = teacher_feats.repeat_interleave(n, dim=0)  # [P*n, hidden]
    nr_t = naive_disc(teacher_copies)
    nr_s = naive_disc(student_feats.reshape(prompts * n, hidden))
    nr_t.retain_grad()
    nr_s.retain_grad()
    pair_losses = [-F.logsigmoid(nr_t[k] - nr_s[k]) for k in range(prompts * n)]
    naive_loss = sum(pair_losses) / (prompts * n)
    naive_loss.backward()
    assert naive_disc.rows_scored == 2 * prompts * n

    close(loss, naive_loss, tol=1e-12)
    close(disc.weight.grad, naive_disc.weight.grad, tol=1e-12)
    close(disc.bias.grad, naive_disc.bias.grad, tol=1e-12)
    close(r_s.grad, nr_s.grad.reshape(prompts, n), tol=1e-12)
    # the single teacher score receives the sum of its n copies' gradients
    close(r_t.grad, nr_t.grad.reshape(prompts, n).sum(-1), tol=1e-12)
    # and each teacher copy's gradient is -sigmoid(r_s - r_t) / (P n)
    close(nr_t.grad, -torch.sigmoid(nr_s - nr_t).detach() / (prompts * n), tol=1e-12)


def test_discriminator_metrics_hand_values():
    teacher = torch.tensor([1.0, 2.0])
    student = torch.tensor([[0.0, 1.0, 3.0], [2.0, 1.5, 5.0]])
    # pairs r_t > r_s: 1>0 yes, 1>1 no (a tie is not a win), 1>3 no; 2>2 no, 2>1.5 yes, 2>5 no
    metrics = discriminator_metrics(teacher, student)
    assert metrics["d_acc"] == pytest.approx(2 / 6)
    assert metrics["teacher_score"] == pytest.approx(1.5)
    assert metrics["student_score"] == pytest.approx(12.5 / 6)
    assert set(metrics) == {"d_acc", "teacher_score", "student_score"}
    perfect = discriminator_metrics(torch.tensor([9.0]), torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert perfect["d_acc"] == 1.0


# ----------------------------------------------------------------------------------------------
# GRPO advantages


def test_grpo_advantages_hand_values():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 6.0]])
    # row 1: mean 2.5, unbiased std sqrt((2.25+0.25+0.25+2.25)/3) = sqrt(5/3)
    # row 2: mean 1.5, unbiased std sqrt((3*2.25 + 20.25)/3) = 3
    s1 = math.sqrt(5.0 / 3.0) + 1e-6
    s2 = 3.0 + 1e-6
    expected = [[-1.5 / s1, -0.5 / s1, 0.5 / s1, 1.5 / s1], [-1.5 / s2, -1.5 / s2, -1.5 / s2, 4.5 / s2]]
    close(grpo_advantages(scores), expected)


def test_grpo_advantages_are_per_group():
    # adding a constant to one group changes nothing; groups do not see each other
    a = grpo_advantages(torch.tensor([[1.0, 3.0], [10.0, 30.0]]))
    s = math.sqrt(2.0)  # unbiased std of {1, 3}
    close(a[0], [-1.0 / (s + 1e-6), 1.0 / (s + 1e-6)])
    s2 = math.sqrt(200.0)
    close(a[1], [-10.0 / (s2 + 1e-6), 10.0 / (s2 + 1e-6)])
    close(grpo_advantages(torch.tensor([[101.0, 103.0]])), a[:1], tol=1e-4)


@pytest.mark.parametrize("value", [0.0, 0.1, 0.7, 1.0 / 3.0, -2.3, 3.14159, 123.456])
@pytest.mark.parametrize("n", [2, 3, 7, 8, 16])
def test_grpo_equal_rewards_give_exactly_zero(value, n):
    advantages = grpo_advantages(torch.full((2, n), value))
    assert not torch.isnan(advantages).any()
    assert torch.equal(advantages, torch.zeros(2, n)), advantages


def test_grpo_equal_group_next_to_varied_group():
    advantages = grpo_advantages(torch.tensor([[0.1, 0.1, 0.1, 0.1], [0.0, 1.0, 0.0, 1.0]]))
    assert torch.equal(advantages[0], torch.zeros(4))
    s = math.sqrt(1.0 / 3.0) + 1e-6  # unbiased std of {0, 1, 0, 1}
    close(advantages[1], [-0.5 / s, 0.5 / s, -0.5 / s, 0.5 / s])


def test_grpo_group_of_one_gives_zero():
    advantages = grpo_advantages(torch.tensor([[3.7], [-1.0], [0.0]]))
    assert torch.equal(advantages, torch.zeros(3, 1))


def test_grpo_advantages_of_bfloat16_scores_are_float32():
    advantages = grpo_advantages(torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.bfloat16))
    assert advantages.dtype == torch.float32
    close(advantages, [[-1.0 / (1.0 + 1e-6), 0.0, 1.0 / (1.0 + 1e-6)]])


# ----------------------------------------------------------------------------------------------
# PPO-clip

RATIOS = torch.tensor([[1.5, 0.5, 1.1], [1.5, 0.5, 1.1]], dtype=torch.float64)
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.2]], dtype=torch.float64)
ADV = torch.tensor([2.0, -2.0], dtype=torch.float64)
# max(-A rho, -A clip(rho, 0.8, 1.2)) per token:
#   A=+2: rho 1.5 -> max(-3.0, -2.4) = -2.4 (clipped); rho 0.5 -> max(-1.0, -1.6) = -1.0; rho 1.1 -> -2.2
#   A=-2: rho 1.5 -> max( 3.0,  2.4) =  3.0;            rho 0.5 -> max( 1.0,  1.6) =  1.6 (clipped); 1.1 -> 2.2
PER_TOKEN = [[-2.4, -1.0, -2.2], [3.0, 1.6, 2.2]]
CLIPPED = [[1, 0, 0], [0, 1, 0]]


def test_ppo_clip_per_token_values_and_clipping():
    log_probs = OLD + torch.log(RATIOS)
    for b in range(2):
        for t in range(3):
            mask = torch.zeros(2, 3, dtype=torch.float64)
            mask[b, t] = 1.0
            loss, clip_fraction = ppo_clip_loss(log_probs, OLD, ADV, mask, clip_eps=0.2)
            close(loss, PER_TOKEN[b][t])
            assert clip_fraction.item() == CLIPPED[b][t], (b, t)


def test_ppo_clip_token_mean_and_clip_fraction():
    log_probs = OLD + torch.log(RATIOS)
    loss, clip_fraction = ppo_clip_loss(log_probs, OLD, ADV, torch.ones(2, 3), clip_eps=0.2)
    close(loss, (-2.4 - 1.0 - 2.2 + 3.0 + 1.6 + 2.2) / 6)  # = 0.2
    close(clip_fraction, 2 / 6)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss, clip_fraction = ppo_clip_loss(log_probs, OLD, ADV, mask, clip_eps=0.2)
    close(loss, (-2.4 - 1.0 + 3.0 + 1.6 + 2.2) / 5)
    close(clip_fraction, 2 / 5)


def test_ppo_clip_per_token_advantages_equal_broadcast_sequence_advantages():
    log_probs = OLD + torch.log(RATIOS)
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    a = ppo_clip_loss(log_probs, OLD, ADV, mask)
    b = ppo_clip_loss(log_probs, OLD, ADV.unsqueeze(-1).expand(2, 3), mask)
    close(a[0], b[0])
    close(a[1], b[1])


def test_ppo_clip_gradients_vanish_on_clipped_tokens():
    log_probs = (OLD + torch.log(RATIOS)).clone().requires_grad_(True)
    loss, _ = ppo_clip_loss(log_probs, OLD, ADV, torch.ones(2, 3), clip_eps=0.2)
    loss.backward()
    # d/dlogp of -A rho is -A rho; clipped tokens have zero gradient; 6 tokens
    expected = [[0.0, -2.0 * 0.5 / 6, -2.0 * 1.1 / 6], [2.0 * 1.5 / 6, 0.0, 2.0 * 1.1 / 6]]
    close(log_probs.grad, expected)


def test_ppo_clip_eps_is_respected():
    log_probs = OLD + torch.log(RATIOS)
    mask = torch.zeros(2, 3)
    mask[0, 0] = 1.0  # A=+2, rho=1.5
    close(ppo_clip_loss(log_probs, OLD, ADV, mask, clip_eps=0.1)[0], -2.0 * 1.1)
    close(ppo_clip_loss(log_probs, OLD, ADV, mask, clip_eps=0.6)[0], -2.0 * 1.5)  # inside [0.4, 1.6]


def test_ppo_ratio_one_is_reinforce():
    old = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.7, -0.9]], dtype=torch.float64)
    log_probs = old.clone().requires_grad_(True)
    advantages = torch.tensor([2.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    loss, clip_fraction = ppo_clip_loss(log_probs, old, advantages, mask)
    close(loss, -(2.0 + 2.0 + 2.0 - 1.0) / 4)  # -A token-mean = -1.25
    assert clip_fraction.item() == 0.0
    loss.backward()
    # REINFORCE: gradient -A / N on each response token, nothing on padding
    close(log_probs.grad, [[-0.5, -0.5, -0.5], [0.25, 0.0, 0.0]])


def test_ppo_clip_denominator_shares_sum_to_whole_batch():
    log_probs = OLD + torch.log(RATIOS)
    mask = torch.ones(2, 3, dtype=torch.float64)
    whole, _ = ppo_clip_loss(log_probs, OLD, ADV, mask)
    parts = [ppo_clip_loss(log_probs[i:i + 1], OLD[i:i + 1], ADV[i:i + 1], mask[i:i + 1], denominator=6.0)[0]
             for i in range(2)]
    close(parts[0], -5.6 / 6)
    close(parts[1], 6.8 / 6)
    close(sum(parts), whole)


# ----------------------------------------------------------------------------------------------
# k3 KL


def test_k3_hand_values():
    log_probs = torch.tensor([[0.0, 0.0, LN2], [-1.0, 0.0, 20.0]], dtype=torch.float64)
    ref = torch.tensor([[0.0, LN2, 0.0], [-1.0, 20.0, 0.0]], dtype=torch.float64)
    # kl = ref - logp = [[0, ln2, -ln2], [0, 20, -20]]; k3 = e^kl - kl - 1
    expected = [[0.0, 2.0 - LN2 - 1.0, 0.5 + LN2 - 1.0], [0.0, 10.0, 10.0]]  # e^20-21 and e^-20+19 clamp to 10
    close(k3_kl(log_probs, ref), expected)


def test_k3_direction_is_ref_minus_logp():
    # swapping the arguments changes the value: k3(kl=ln2) = 1 - ln2 = 0.307, k3(kl=-ln2) = ln2 - 0.5 = 0.193
    close(k3_kl(torch.tensor([0.0]), torch.tensor([LN2])), [1.0 - LN2])
    close(k3_kl(torch.tensor([LN2]), torch.tensor([0.0])), [LN2 - 0.5])


def test_k3_zero_when_equal_and_non_negative():
    generator = torch.Generator().manual_seed(3)
    log_probs = -torch.rand(8, 16, generator=generator, dtype=torch.float64) * 5
    ref = -torch.rand(8, 16, generator=generator, dtype=torch.float64) * 5
    assert torch.equal(k3_kl(log_probs, log_probs), torch.zeros(8, 16, dtype=torch.float64))
    values = k3_kl(log_probs, ref)
    assert (values >= 0).all()
    assert (values <= 10).all()
    assert (values > 0).any()


def test_kl_loss_token_mean_and_gradient():
    log_probs = torch.tensor([[0.0, 0.0, 0.0], [LN2, 0.0, 5.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[0.0, LN2, 0.0], [0.0, 0.0, -7.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)  # the third column is padding
    loss = kl_loss(log_probs, ref, mask)
    close(loss, (0.0 + (1.0 - LN2) + (LN2 - 0.5) + 0.0) / 4)  # = 0.125
    loss.backward()
    # d k3 / d logp = -(e^kl - 1) with kl = ref - logp; / 4 tokens
    close(log_probs.grad, [[0.0, -(2.0 - 1.0) / 4, 0.0], [-(0.5 - 1.0) / 4, 0.0, 0.0]])
    close(kl_loss(log_probs, ref, mask, denominator=8.0), 0.5 / 8)


def test_bradley_terry_teacher_gradient_is_the_loss_gradient():
    torch.manual_seed(0)
    t = torch.randn(3, requires_grad=True)
    s = torch.randn(3, 4)
    bradley_terry_loss(t, s).backward()
    assert torch.allclose(bradley_terry_teacher_gradient(t.detach(), s), t.grad, atol=1e-7)
    # hand value: one prompt, one sample, a tie: dL/dt = -sigmoid(0) = -0.5
    assert bradley_terry_teacher_gradient(torch.zeros(1), torch.zeros(1, 1)).item() == -0.5


def test_bradley_terry_by_rows_gives_the_whole_loss_gradient_in_any_grouping():
    """Teacher and student rows in uneven micro-batches that mix prompts (as a token budget makes
    them) accumulate exactly the gradient of the whole Bradley-Terry loss, and return the scores."""
    from gadchat.stages.common import bradley_terry_by_rows

    torch.manual_seed(1)
    prompts, n, dim = 3, 4, 5
    x_t, x_s = torch.randn(prompts, dim), torch.randn(prompts * n, dim)
    w = torch.randn(dim, requires_grad=True)
    bradley_terry_loss(x_t @ w, (x_s @ w).view(prompts, n)).backward()
    whole = w.grad.clone()
    w.grad = None
    teacher_parts = [(idx, x_t[idx]) for idx in (torch.tensor([2]), torch.tensor([0, 1]))]
    student_parts = [(idx, x_s[idx]) for idx in (torch.tensor([11, 0, 5]), torch.tensor([3]),
                                                torch.tensor([1, 2, 4, 6, 7, 8, 9, 10]))]
    backwards = []

    def backward(loss):
        backwards.append(float(loss.detach()))
        loss.backward()

    t_all, s_all = bradley_terry_by_rows(lambda _rows, feats: feats @ w, lambda _rows, feats: feats @ w, backward, teacher_parts, student_parts, n)
    assert len(backwards) == len(teacher_parts) + len(student_parts)
    assert torch.allclose(w.grad, whole, atol=1e-6)
    assert torch.allclose(t_all, (x_t @ w).detach()) and torch.allclose(s_all, (x_s @ w).detach().view(prompts, n))
    # the student terms alone sum to the whole loss (the teacher backwards carry gradient, not loss)
    assert math.isclose(sum(backwards[:len(student_parts)]), float(bradley_terry_loss(t_all, s_all)), rel_tol=1e-6)
