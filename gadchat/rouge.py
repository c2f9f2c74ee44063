"""ROUGE-L F1 against the teacher response, through the maintained ``rouge-score`` package
(Google's reimplementation of ROUGE-1.5.5), with its default tokenizer and stemming on."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure in [0, 1] (longest common subsequence of tokens)."""
    return _scorer().score(reference, prediction)["rougeL"].fmeasure
