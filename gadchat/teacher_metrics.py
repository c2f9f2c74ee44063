"""Metrics that read a teacher we hold (the known-teacher benchmark and the GAD-stage diagnostics).

In real use the teacher is a black box and none of this is available. When the teacher is a model
we hold, its exact per-token log-probabilities tell how close a student is to it, and whether the
discriminator's reward points toward it. Teacher log-probs are only ever *read* here: they never
enter a loss.

Notation: for a response ``y`` of ``|y|`` tokens (its EOS included when it has one),
``lp_T[t] = log p_teacher(y_t | x, y_<t)`` and ``lp_S[t] = log p_student(y_t | x, y_<t)``; ``mask``
marks the response tokens. Per-token means are pooled over all tokens of all samples
(``sum / number of tokens``), so long samples weigh by their length, as a token-mean loss does.

All functions here are pure: tensors and lists in, floats out.
"""

from __future__ import annotations

import torch


def _pooled_token_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    mask = mask.to(values.dtype)
    tokens = float(mask.sum())
    if tokens == 0:
        raise ValueError("no response tokens under the mask")
    return float((values * mask).sum()) / tokens


def teacher_nll_per_token(teacher_log_probs: torch.Tensor, mask: torch.Tensor) -> float:
    """``-sum(lp_T * mask) / sum(mask)``: how unlikely the teacher finds the student's samples."""
    return -_pooled_token_mean(teacher_log_probs, mask)


def reverse_kl_per_token(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor,
                         mask: torch.Tensor) -> float:
    """``sum((lp_S - lp_T) * mask) / sum(mask)`` over samples drawn from the student: the Monte-Carlo
    estimate of ``KL(student || teacher)`` per token (the quantity on-policy distillation minimises)."""
    return _pooled_token_mean(student_log_probs - teacher_log_probs, mask)


def forward_nll_per_token(student_log_probs_on_teacher: torch.Tensor, mask: torch.Tensor) -> float:
    """``-sum(lp_S * mask) / sum(mask)`` over samples drawn from the *teacher*: the student's
    cross-entropy to the teacher, i.e. forward KL up to the teacher's entropy (what SeqKD minimises)."""
    return -_pooled_token_mean(student_log_probs_on_teacher, mask)


def length_ratio(student_lengths: list, teacher_lengths: list) -> float:
    """``mean(student lengths) / mean(teacher lengths)`` (response tokens)."""
    if not student_lengths or not teacher_lengths:
        raise ValueError("length_ratio needs samples on both sides")
    return (sum(student_lengths) / len(student_lengths)) / (sum(teacher_lengths) / len(teacher_lengths))


def eos_share(ended: list) -> float:
    """Share of samples that ended with an EOS (rather than at the token cap)."""
    if not ended:
        raise ValueError("eos_share of no samples")
    return sum(bool(e) for e in ended) / len(ended)


def distinct_n(token_lists: list, n: int = 2) -> float:
    """``distinct-n``: distinct n-grams over all n-grams, pooled over the samples (Li et al., 2016).
    0 when no sample has ``n`` tokens."""
    seen, total = set(), 0
    for tokens in token_lists:
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0


def ranks(values: list) -> list:
    """Ranks 1..N with ties given their average rank (as Spearman's rho needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        average = (i + j) / 2 + 1
        for k in range(i, j + 1):
            out[order[k]] = average
        i = j + 1
    return out


def spearman(x: list, y: list) -> float | None:
    """Spearman's rank correlation: Pearson's correlation of the (tie-averaged) ranks.
    ``None`` when either side is constant (the correlation is undefined)."""
    if len(x) != len(y):
        raise ValueError(f"spearman of lists of different lengths ({len(x)} and {len(y)})")
    rx, ry = ranks(list(x)), ranks(list(y))
    n = len(rx)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return None
    return cov / (vx * vy) ** 0.5


def within_group_spearman(scores: list, targets: list) -> dict:
    """Spearman correlation of ``scores`` with ``targets`` inside each prompt group, then summarised.

    ``scores`` and ``targets`` are lists of groups (one list of ``n`` values per prompt). GRPO only
    compares samples of the same prompt, so this is the correlation that decides whether the
    advantage points the way ``targets`` does. A group where either side is constant (say, every
    sample ended with an EOS) counts as 0: the target cannot explain any of that group's ranking.
    Returns ``mean`` (over all groups), ``positive_share`` (share of groups with a correlation > 0)
    and ``defined`` (share of groups where the correlation is defined); all 0 for no groups.
    """
    values, defined = [], 0
    for group_scores, group_targets in zip(scores, targets, strict=True):
        rho = spearman(list(group_scores), list(group_targets))
        defined += rho is not None
        values.append(rho or 0.0)
    if not values:
        return {"mean": 0.0, "positive_share": 0.0, "defined": 0.0}
    return {"mean": sum(values) / len(values), "positive_share": sum(v > 0 for v in values) / len(values),
            "defined": defined / len(values)}


def sequence_sums(token_log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row ``sum_t lp[t] * mask[t]``: a sequence's total log-probability."""
    return (token_log_probs * mask.to(token_log_probs.dtype)).sum(dim=-1)


def sequence_means(token_log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row ``sum_t lp[t] * mask[t] / sum_t mask[t]``: a sequence's log-probability per token."""
    mask = mask.to(token_log_probs.dtype)
    return (token_log_probs * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)


def reward_diagnostics(rewards: torch.Tensor, teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor,
                       mask: torch.Tensor, lengths: list, ended: list) -> dict:
    """What the discriminator's reward tracks, for one batch of ``[groups, n]`` rewards.

    ``teacher_log_probs``/``student_log_probs``/``mask`` are ``[groups * n, T]`` (prompt-major rows,
    the rollout layout); ``lengths`` and ``ended`` are per row. Within-group Spearman of the reward
    with: the teacher's total log-prob (``teacher_logp``), its per-token log-prob
    (``teacher_logp_per_token``), the Bayes-optimal discriminator's target
    ``log p_T(y|x) - log p_S(y|x)`` (``log_ratio``, where GRPO on the reward would be reverse-KL
    minimisation), its per-token version, the response length and whether the sample ended with an
    EOS. Also the teacher NLL per token of the batch. Keys are ``diag/...``.
    """
    groups, n = rewards.shape
    def grouped(values) -> list:
        flat = [float(v) for v in values]
        return [flat[g * n : (g + 1) * n] for g in range(groups)]

    reward_groups = grouped(rewards.reshape(-1))
    targets = {
        "teacher_logp": sequence_sums(teacher_log_probs, mask),
        "teacher_logp_per_token": sequence_means(teacher_log_probs, mask),
        "log_ratio": sequence_sums(teacher_log_probs - student_log_probs, mask),
        "log_ratio_per_token": sequence_means(teacher_log_probs - student_log_probs, mask),
        "length": torch.tensor(lengths, dtype=torch.float32),
        "ends_in_eos": torch.tensor([float(e) for e in ended]),
    }
    out = {"diag/teacher_nll": teacher_nll_per_token(teacher_log_probs, mask),
           "diag/reverse_kl": reverse_kl_per_token(student_log_probs, teacher_log_probs, mask)}
    for name, values in targets.items():
        summary = within_group_spearman(reward_groups, grouped(values))
        out[f"diag/reward_vs_{name}"] = summary["mean"]
    return out


def token_pearson(rewards: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> float:
    """Pearson correlation over all masked tokens of a per-token reward with a per-token target:

    ``rho = sum (r - r_bar)(s - s_bar) / sqrt(sum (r - r_bar)^2 sum (s - s_bar)^2)``

    over the tokens with ``mask`` 1 (pooled over rows; ``r_bar``, ``s_bar`` their means). The
    measure a per-token reward needs against the teacher's ``log p_T(y_t) - log pi(y_t)``: a sum-level
    correlation flatters any reward that only learned length. 0 when either side is constant."""
    keep = mask.reshape(-1) > 0
    r = rewards.reshape(-1)[keep].double()
    s = targets.reshape(-1)[keep].double()
    if r.numel() < 2:
        return 0.0
    r, s = r - r.mean(), s - s.mean()
    denominator = torch.sqrt((r * r).sum() * (s * s).sum())
    return float((r * s).sum() / denominator) if float(denominator) > 0 else 0.0
