"""Cross-entropy of a causal LM on a :class:`engine.packing.Batch`, computed only where there are targets, and
never with the logits of every loss token at once.

The model body runs once over the batch; the output projection (``lm_head``) and the softmax then run only on the
positions that carry loss, in chunks (:class:`ChunkedLinearCrossEntropy`): each chunk's logits live only while
that chunk's loss and gradients are computed. On Qwen3-0.6B (vocabulary 151,936) the full fp32 logits of a
16k-token micro-batch would be ~9 GB per copy; a chunk is ~1 GiB. On CUDA the fused Triton kernel of
``liger-kernel`` (the ``gpu`` extra) does the same job in fewer passes over memory, when installed.

Every forward goes through :func:`model_inputs`, which gives the model its document layout (see
:mod:`engine.attention`), so examples packed in a row never see each other.
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F

from engine.attention import AttentionPath, dense_document_mask, layout_for, uses_document_attention
from engine.errors import AttentionConfigError
from engine.packing import Batch

logger = logging.getLogger(__name__)

# Elements of one chunk's logits (rows x vocabulary). On a GPU 2^28 fp32 is 1 GiB (1,766 tokens of Qwen3's
# vocabulary): large matmuls, bounded memory. On the CPU a 16 MiB chunk stays in cache: measured on the tiny hero
# (15,757 loss tokens, vocabulary 4,096, 1 thread, forward + backward), 1.31 CPU-s at 1,024 tokens a chunk against
# 1.6 s at 2,048 and more, and 1.75 s for the plain full-logits path: chunking is faster there, not slower.
CHUNK_ELEMENTS = {"cuda": 2**28, "cpu": 2**22}
DEFAULT_CHUNK_ELEMENTS = 2**26


class LossKernel(str, Enum):
    """How the output projection and cross-entropy are computed."""

    CHUNKED = "chunked"  # ChunkedLinearCrossEntropy: pure torch, any device
    LIGER = "liger"  # liger-kernel's fused linear cross-entropy (CUDA, the optional ``gpu`` extra)


LOSS_KERNEL_CHOICES = ("auto", *(k.value for k in LossKernel))


def liger_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed or not importable here: the chunked kernel does the job
        return False
    return True


def choose_loss_kernel(requested: str, device: torch.device) -> LossKernel:
    """``auto``: liger on CUDA where it is installed, else chunked.

    Raises:
        AttentionConfigError: ``liger`` was asked for where it cannot run (the message names the key and the fix).
    """
    if requested == "auto":
        return LossKernel.LIGER if liger_available(device) else LossKernel.CHUNKED
    kernel = LossKernel(requested)
    if kernel is LossKernel.LIGER and not liger_available(device):
        raise AttentionConfigError(
            f"hyperparams.loss_kernel=liger needs CUDA and the liger-kernel package (pip install 'guild[gpu]'); "
            f"this is {device.type}. Set hyperparams.loss_kernel=auto"
        )
    return kernel


def chunk_tokens(vocab_size: int, device: torch.device) -> int:
    """Loss tokens per chunk: the device's logits budget over the vocabulary size, at least 64."""
    return max(64, CHUNK_ELEMENTS.get(device.type, DEFAULT_CHUNK_ELEMENTS) // max(1, vocab_size))


# ----------------------------------------------------------------------------------------------- the forward


def model_inputs(model, batch: Batch) -> dict:
    """The keyword arguments of one forward of ``model`` over ``batch``.

    With Guild's document attention installed (:func:`engine.attention.install`), the batch's layout goes along
    (a per-document one is made when the batch has none). A model with its own attention gets an explicit dense
    mask when a row holds several examples (it is never left to infer boundaries from position ids).
    """
    kwargs = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    if uses_document_attention(model):
        layout = batch.layout
        if layout is None:
            layout = layout_for(
                AttentionPath.PER_DOCUMENT, batch.documents, batch.input_ids.shape[1], batch.example_index
            )
        kwargs["guild_layout"] = layout.materialize()
        return kwargs
    if any(len(row) > 1 for row in batch.documents):
        implementation = getattr(model.config, "_attn_implementation", None)
        mask = dense_document_mask(batch.example_index)
        if implementation == "eager":
            dtype = next(model.parameters()).dtype
            kwargs["attention_mask"] = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
                ~mask, torch.finfo(dtype).min
            )
        elif implementation == "sdpa":
            kwargs["attention_mask"] = mask
        else:
            raise AttentionConfigError(
                f"a packed batch reached a model with attn_implementation={implementation!r}, which takes no explicit "
                "document mask; install engine.attention on it or set data.enable_packing=false"
            )
    return kwargs


def _loss_hidden(model, batch: Batch):
    """The final hidden states at the loss positions, ``(n, hidden)``, and the output layer; or, for a model that
    post-processes its logits, ``(logits at the loss positions, None)``."""
    kwargs = model_inputs(model, batch)
    decoder = _decoder(model)
    if decoder is None:
        logits = model(**kwargs).logits
        return logits.flatten(0, 1).index_select(0, batch.loss_positions).float(), None
    hidden = decoder(**kwargs).last_hidden_state
    return hidden.flatten(0, 1).index_select(0, batch.loss_positions), model.get_output_embeddings()


# ------------------------------------------------------------------------------------------------ the losses


def loss_sum(model, batch: Batch, kernel: LossKernel = LossKernel.CHUNKED) -> torch.Tensor:
    """The summed cross-entropy of every loss token of the batch (a 0-d float32 tensor; divide by the count)."""
    hidden, head = _loss_hidden(model, batch)
    if head is None:
        return F.cross_entropy(hidden, batch.loss_targets, reduction="sum")
    if kernel is LossKernel.LIGER and hidden.is_cuda:
        return _liger_sum(hidden, head, batch.loss_targets)
    return linear_cross_entropy_sum(hidden, head.weight, head.bias, batch.loss_targets)


def token_losses(model, batch: Batch) -> torch.Tensor:
    """Per-loss-token cross-entropy, shape ``(batch.num_loss_tokens,)``, chunk by chunk (for diagnostics)."""
    hidden, head = _loss_hidden(model, batch)
    if head is None:
        return F.cross_entropy(hidden, batch.loss_targets, reduction="none")
    step = chunk_tokens(head.weight.shape[0], hidden.device)
    parts = [
        F.cross_entropy(
            F.linear(hidden[s : s + step], head.weight, head.bias).float(),
            batch.loss_targets[s : s + step],
            reduction="none",
        )
        for s in range(0, hidden.shape[0], step)
    ]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def per_example_losses(model, batch: Batch) -> dict[int, float]:
    """The mean loss of each example in the batch, by example index (for tests and diagnostics)."""
    losses = token_losses(model, batch).detach().double()
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for example, value in zip(batch.loss_examples.tolist(), losses.tolist()):
        sums[example] = sums.get(example, 0.0) + value
        counts[example] = counts.get(example, 0) + 1
    return {example: sums[example] / counts[example] for example in sums}


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk: int | None = None,
) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T + bias, targets, reduction="sum")`` without all the logits at once.

    Args:
        hidden: ``(n, d)``; weight: ``(vocab, d)``; targets: ``(n,)`` (every one a real target).
        chunk: tokens per chunk; by default :func:`chunk_tokens` for the device.
    """
    chunk = chunk or chunk_tokens(weight.shape[0], hidden.device)
    wants_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if wants_grad:
        return ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk)
    dtype = _matmul_dtype(hidden, weight)
    exact = _softmax_dtype(dtype)
    total = torch.zeros((), dtype=exact, device=hidden.device)
    for s in range(0, hidden.shape[0], chunk):
        logits = F.linear(hidden[s : s + chunk].to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
        total = total + F.cross_entropy(logits.to(exact), targets[s : s + chunk], reduction="sum")
    return total


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias``, chunk by chunk, with the gradients computed in the
    forward pass.

    The loss is the last operation of the graph, so its gradient with respect to each chunk's logits
    (softmax minus one-hot) is known in the forward pass: each chunk computes its logits, its loss and its share of
    the input, weight and bias gradients, then frees its logits. Backward only scales the stored gradients by the
    incoming one. That is three matmuls per chunk, as many as the plain path, and no recomputation; what stays in
    memory is one gradient the size of ``hidden`` and one the size of ``weight`` (float32).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        needs_hidden, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        needs_bias = bias is not None and ctx.needs_input_grad[2]
        # The matmuls run in autocast's dtype when it is on (cast once here, not once per chunk), else as given;
        # softmax and sums in float32 at least.
        dtype = _matmul_dtype(hidden, weight)
        exact = _softmax_dtype(dtype)
        total = torch.zeros((), dtype=exact, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=exact, device=weight.device) if needs_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=exact, device=bias.device) if needs_bias else None
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk].to(dtype)
            t = targets[s : s + chunk]
            loss, grad = _logit_loss_and_grad(F.linear(h, w, b), t)
            total += loss
            if needs_hidden:
                grad_hidden[s : s + chunk] = grad @ w
            if needs_weight:
                grad_weight += grad.t() @ h
            if needs_bias:
                grad_bias += grad.to(exact).sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        # grad_output is a 0-d tensor on the device: scaling by it needs no host sync.
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_output).to(ctx.bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def _logit_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's summed cross-entropy and its gradient with respect to the logits (softmax minus one-hot), the
    gradient in the logits' dtype. ``logits`` is a temporary: it may be overwritten. On CUDA a compiled kernel does
    it in two passes over the chunk instead of ~8."""
    if logits.is_cuda:
        fused = _fused_logit_loss_and_grad()
        if fused is not None:
            try:
                return fused(logits, targets)
            except Exception as exc:  # noqa: BLE001 - a compiler problem costs speed, never the job
                _disable_fused(exc)
    exact = logits.to(_softmax_dtype(logits.dtype))
    lse = torch.logsumexp(exact, dim=-1)
    loss = (lse - exact.gather(1, targets.unsqueeze(1)).squeeze(1)).sum()
    grad = exact.sub_(lse.unsqueeze(1)).exp_()  # in place: one chunk-sized buffer
    grad[torch.arange(grad.shape[0], device=grad.device), targets] -= 1.0
    return loss, grad.to(logits.dtype)


def logit_loss_and_grad_reference(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The functional form the CUDA kernel is compiled from (out-of-place, so the compiler can fuse it)."""
    x = logits.to(_softmax_dtype(logits.dtype))
    lse = torch.logsumexp(x, dim=-1)
    loss = (lse - x.gather(1, targets.unsqueeze(1)).squeeze(1)).sum()
    one_hot = torch.zeros_like(x).scatter_(1, targets.unsqueeze(1), 1.0)
    return loss, (torch.exp(x - lse.unsqueeze(1)) - one_hot).to(logits.dtype)


_FUSED: dict[str, Any] = {}


def _fused_logit_loss_and_grad():
    if "fn" not in _FUSED:
        _FUSED["fn"] = torch.compile(logit_loss_and_grad_reference, dynamic=True)
    return _FUSED["fn"]


def _disable_fused(exc: Exception) -> None:
    logger.warning("the compiled cross-entropy kernel failed (%s: %s); using the eager one", type(exc).__name__, exc)
    _FUSED["fn"] = None


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _liger_sum(hidden: torch.Tensor, head, targets: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    # "mean" then times n: some liger versions ignore the reduction argument and always average.
    fused = LigerFusedLinearCrossEntropyLoss(reduction="mean")
    dtype = _matmul_dtype(hidden, head.weight)
    out = fused(head.weight.to(dtype), hidden.to(dtype), targets, None if head.bias is None else head.bias.to(dtype))
    loss = out[0] if isinstance(out, tuple) else out
    return loss.float() * targets.shape[0]


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
