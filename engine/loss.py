"""Cross-entropy of a causal LM on a :class:`engine.packing.Batch`, computed only where there are targets.

The output projection (``lm_head``) and the softmax run only on the positions that carry loss: prompt tokens
and padding never reach them, which saves most of the vocabulary-sized work on prompts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.packing import Batch


def loss_token_logits(model, batch: Batch) -> torch.Tensor:
    """The logits at ``batch.loss_positions``, shape ``(n, vocab)``, in float32."""
    kwargs = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    # use_cache=False matters beyond speed: with a cache object the model does not look for packed sequences in
    # the position ids, and examples in a row would attend to each other.
    decoder = _decoder(model)
    if decoder is None:
        logits = model(**kwargs).logits
        return logits.flatten(0, 1).index_select(0, batch.loss_positions).float()
    hidden = decoder(**kwargs).last_hidden_state
    hidden = hidden.flatten(0, 1).index_select(0, batch.loss_positions)
    return model.get_output_embeddings()(hidden).float()


def token_losses(model, batch: Batch) -> torch.Tensor:
    """Per-loss-token cross-entropy, shape ``(batch.num_loss_tokens,)``."""
    return F.cross_entropy(loss_token_logits(model, batch), batch.loss_targets, reduction="none")


def loss_sum(model, batch: Batch) -> torch.Tensor:
    """The summed cross-entropy of every loss token of the batch (a 0-d tensor; divide by the token count)."""
    return F.cross_entropy(loss_token_logits(model, batch), batch.loss_targets, reduction="sum")


def per_example_losses(model, batch: Batch) -> dict[int, float]:
    """The mean loss of each example in the batch, by example index (for tests and diagnostics)."""
    losses = token_losses(model, batch).detach().double()
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for example, value in zip(batch.loss_examples.tolist(), losses.tolist()):
        sums[example] = sums.get(example, 0.0) + value
        counts[example] = counts.get(example, 0) + 1
    return {example: sums[example] / counts[example] for example in sums}


def _decoder(model):
    """The model body below the output projection, when computing logits apart from it is exact.

    Models that post-process their logits (soft-capping, scaling) are run whole instead.
    """
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    get_decoder = getattr(model, "get_decoder", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = get_decoder() if get_decoder is not None else None
    if decoder is None or head is None or decoder is model:
        return None
    return decoder
