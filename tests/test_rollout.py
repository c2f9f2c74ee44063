"""Rollout backend helpers that need no engine."""

from __future__ import annotations

import pytest
import torch

from gadchat.generation import VLLMBackend, choose_backend, trim_at_eos, vllm_available


def test_trim_at_eos_keeps_the_first_eos_and_drops_what_follows():
    assert trim_at_eos([5, 6, 2, 7, 2], {2}) == [5, 6, 2]
    assert trim_at_eos([5, 6, 7], {2}) == [5, 6, 7]  # cut at max_new_tokens: no EOS
    assert trim_at_eos([9, 3, 4], {3, 4}) == [9, 3]


def test_backend_choice():
    assert choose_backend("hf") == "hf"
    assert choose_backend("auto") == ("vllm" if vllm_available() else "hf")
    with pytest.raises(ValueError, match="unknown generation backend 'tgi'"):
        choose_backend("tgi")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_vllm_sleep_mode_is_refused_clearly_on_cpu():
    with pytest.raises(ValueError, match="rollout.vllm_sleep needs a GPU"):
        VLLMBackend("unused", "unused", torch.float32, max_model_len=64, eos_ids={0}, seed=0,
                    sleep_between_rollouts=True)
