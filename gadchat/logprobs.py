"""Per-token log-probs (and entropies) of a ``SequenceBatch`` in float32, on ``logits / temperature``,
with or without the full ``[B, T, V]`` logits (chunked over the response tokens from the final
hidden states and the LM head)."""

from __future__ import annotations

import torch

from gadchat.batch import SequenceBatch
from gadchat.losses import chunked_token_log_probs, token_entropy, token_log_probs


def sequence_log_probs(call, module, batch: SequenceBatch, chunk_tokens: int, temperature: float = 1.0,
                       with_entropy: bool = False):
    """Next-token log-probs ``[B, T-1]`` (and entropies or None) of ``batch`` on ``logits /
    temperature`` in float32. ``call`` runs the forward (a DeepSpeed engine, or the model itself),
    ``module`` is the Hugging Face causal LM inside it. ``chunk_tokens > 0``: chunked path over the
    response positions (0 elsewhere); 0, or a model without ``logits_to_keep``: plain path."""
    labels = batch.input_ids[:, 1:]
    head = module.get_output_embeddings() if chunk_tokens > 0 and hasattr(module, "get_output_embeddings") else None
    if head is None or not _takes_logits_to_keep(module):
        logits = call(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        log_probs = token_log_probs(logits, labels, temperature)
        entropy = token_entropy(logits, temperature) if with_entropy else None
        return log_probs, entropy
    hidden = _final_hidden_states(call, module, batch)[:, :-1]
    positions = batch.target_mask > 0
    values, entropy = _head_log_probs(head, hidden[positions], labels[positions], chunk_tokens, temperature,
                                      with_entropy)
    log_probs = values.new_zeros(positions.shape)
    log_probs[positions] = values
    if entropy is not None:
        full = entropy.new_zeros(positions.shape)
        full[positions] = entropy
        entropy = full
    return log_probs, entropy


def _takes_logits_to_keep(module) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _final_hidden_states(call, module, batch: SequenceBatch) -> torch.Tensor:
    """The backbone's final (normed) hidden states ``[B, T, H]``, from the engine's own forward.

    The forward runs through the DeepSpeed engine (ZeRO-3 hooks, the root module's step
    bookkeeping) with ``logits_to_keep=1`` (logits of one position only); a forward hook on the
    decoder (registered after DeepSpeed's, so it sees the output as DeepSpeed passes it on) keeps
    its ``last_hidden_state``. No per-layer hidden states are retained."""
    decoder = module.get_decoder()
    captured = []

    def keep(_module, _inputs, output):
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = decoder.register_forward_hook(keep)
    try:
        call(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[-1]


def _head_log_probs(head, hidden, labels, chunk_tokens: int, temperature: float, with_entropy: bool):
    """Chunked log-probs in ONE call of the LM head module.

    Under ZeRO-3 the head's weight (tied to the embedding or not) is gathered by DeepSpeed's hooks
    around a module call, and again before that call's backward. Calling the module once per
    micro-batch, with the chunk loop inside its forward, keeps the number of module calls the
    same on every rank (the chunk count is not: ranks hold different response lengths), which
    ZeRO-3's recorded module trace requires, and the per-chunk recomputation in the backward runs
    while the weight is gathered for that module's backward."""
    plain_forward = type(head).forward

    def chunked_forward(h, y):
        values, entropy = chunked_token_log_probs(lambda part: plain_forward(head, part), h, y, chunk_tokens,
                                                  temperature, with_entropy)
        return (values,) if entropy is None else (values, entropy)  # tensors only through DeepSpeed's hooks

    own = head.__dict__.get("forward")
    head.forward = chunked_forward
    try:
        outputs = head(hidden, labels)
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own
    return outputs[0], (outputs[1] if with_entropy else None)
