"""Document attention: in a packed row every token attends causally to its own example, and no S x S mask is built.

The packer knows where each example lies in its row (:attr:`engine.packing.Batch.documents`). The engine passes
that explicitly to the model: it registers :func:`document_attention` with transformers' ``AttentionInterface``
under :data:`GUILD_ATTENTION`, sets the model's attention implementation to it (transformers then builds no mask
at all, since no mask function is registered under that name), and every forward call carries a
:class:`DocumentLayout` as the ``guild_layout`` keyword, which transformers hands down to each attention layer.
Nothing infers example boundaries from position ids.

Paths (:class:`AttentionPath`), chosen by :func:`choose_path` from ``hyperparams.attention``:

* ``per_document``: causal SDPA on each example's slice of its row; padding is skipped. The CPU training path:
  on the tiny hero at 2048 tokens a row, fp32, 2 threads, forward + backward of one layer's attention takes
  0.35 s per document against 0.70 s for plain causal SDPA over whole rows and 3.1 s with the dense document
  mask. Grouping equal-length documents into one call gains nothing there: the kernel time dominates, not the
  ~35 calls a micro-batch makes.
* ``flex``: ``flex_attention`` with a BlockMask of (causal and same example), built once per micro-batch
  (:meth:`DocumentLayout.materialize`) and compiled; blocks across examples are skipped. CUDA (on the CPU
  FlexAttention has a forward only, which the tests use to check the per-document path).
* ``flash_varlen``: the rows flattened into one sequence and flash attention's variable-length kernel with
  explicit ``cu_seqlens`` (the ``flash_attn`` package when installed, else torch's own
  ``torch.nn.attention.varlen``). CUDA, bf16/fp16.
* ``sdpa_dense``: SDPA with an explicit dense (rows, 1, S, S) mask of (causal and same example). The reference
  the others are tested against, and the path for a compiled CPU run (static shapes, no Python loop).

A model that will not take this attention function would fall back to inferring boundaries from position ids,
which transformers does only at batch size 1 and not at all for flash kernels: :func:`install` refuses that
for packed data (:class:`AttentionConfigError`), and :func:`document_attention` refuses to run without a layout.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from engine.errors import AttentionConfigError

logger = logging.getLogger(__name__)

GUILD_ATTENTION = "guild_documents"  # the name under which the attention function is registered
LAYOUT_KWARG = "guild_layout"  # the forward keyword that carries a DocumentLayout down to the attention layers


class AttentionPath(str, Enum):
    """How attention keeps the examples of a packed row apart."""

    PER_DOCUMENT = "per_document"
    FLEX = "flex"
    FLASH_VARLEN = "flash_varlen"
    SDPA_DENSE = "sdpa_dense"


ATTENTION_CHOICES = ("auto", *(p.value for p in AttentionPath))


# ------------------------------------------------------------------------------------------------- choosing


def flash_varlen_available(device: torch.device) -> bool:
    """True on a CUDA device of compute capability 8.0+ with a variable-length flash kernel to call."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability(device)[0] < 8:
        return False
    return _varlen_kernel() is not None


def choose_path(
    requested: str,
    device: torch.device,
    *,
    compiled: bool = False,
    deterministic: bool = False,
    attention_dropout: float = 0.0,
) -> AttentionPath:
    """The path for ``hyperparams.attention = requested`` on ``device``.

    ``auto``: on CUDA the flash variable-length kernel where there is one (flex when ``deterministic``, since
    flash's backward accumulates with atomics, or when there is none); on the CPU per-document SDPA, or the dense
    mask when compiled (per-document slicing would recompile for every new set of example lengths).

    Raises:
        AttentionConfigError: the path cannot train on this device or this model, with the fix.
    """
    if requested == "auto":
        if device.type == "cuda":
            usable = flash_varlen_available(device) and not deterministic and attention_dropout == 0
            path = AttentionPath.FLASH_VARLEN if usable else AttentionPath.FLEX
            if path is AttentionPath.FLEX and attention_dropout > 0:
                path = AttentionPath.PER_DOCUMENT
            return path
        return AttentionPath.SDPA_DENSE if compiled else AttentionPath.PER_DOCUMENT
    try:
        path = AttentionPath(requested)
    except ValueError:
        raise AttentionConfigError(
            f"hyperparams.attention={requested!r} is not a known attention path; use one of "
            f"{', '.join(ATTENTION_CHOICES)}"
        ) from None
    if path is AttentionPath.FLEX and device.type != "cuda":
        raise AttentionConfigError(
            f"hyperparams.attention=flex cannot train on {device.type}: FlexAttention has no backward pass there; "
            "set hyperparams.attention=auto (per-document attention on the CPU)"
        )
    if path is AttentionPath.FLASH_VARLEN and not flash_varlen_available(device):
        raise AttentionConfigError(
            f"hyperparams.attention=flash_varlen needs a CUDA GPU of compute capability 8.0+ and a variable-length "
            f"flash kernel (torch >= 2.10 or the flash_attn package); this is {device.type}. "
            "Set hyperparams.attention=auto"
        )
    if attention_dropout > 0 and path in (AttentionPath.FLEX, AttentionPath.FLASH_VARLEN):
        raise AttentionConfigError(
            f"hyperparams.attention={path.value} has no attention dropout, and the model's config sets "
            f"attention_dropout={attention_dropout}; set hyperparams.attention=per_document or sdpa_dense"
        )
    return path


def install(model, *, packed: bool) -> bool:
    """Route ``model``'s attention through :func:`document_attention`; True when it now does.

    A model that cannot switch (its attention does not go through transformers' ``AttentionInterface``, or has
    sliding-window layers this function does not implement) keeps its own attention. That is exact for unpacked
    rows (one example per row, padding at the end, causal), and refused for packed ones.

    Raises:
        AttentionConfigError: ``packed`` and the model cannot take document attention.
    """
    _register()
    config = model.config
    reason = None
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        reason = "it has sliding-window or other non-full attention layers"
    else:
        setter = getattr(model, "set_attn_implementation", None)
        try:
            if setter is not None:
                setter(GUILD_ATTENTION)
            else:  # transformers before set_attn_implementation: the config property does the same
                config._attn_implementation = GUILD_ATTENTION
        except (ValueError, KeyError, AttributeError) as exc:
            reason = f"it refused the attention function ({exc})"
        if reason is None and getattr(config, "_attn_implementation", None) != GUILD_ATTENTION:
            reason = f"it keeps attn_implementation={config._attn_implementation!r}"
    if reason is None:
        return True
    if packed:
        raise AttentionConfigError(
            f"{type(model).__name__} cannot use Guild's document attention ({reason}), so examples packed in one "
            "row would attend to each other (transformers infers boundaries from position ids only at batch size "
            "1, and never for flash kernels). Set data.enable_packing=false to train one example per row"
        )
    logger.warning(
        "%s keeps its own attention (%s); rows are unpacked, which it handles exactly", type(model).__name__, reason
    )
    return False


def uses_document_attention(model) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == GUILD_ATTENTION


# ------------------------------------------------------------------------------------------------- the layout


@dataclass
class DocumentLayout:
    """Where each example lies in each row of one micro-batch, in the form ``path`` needs.

    Built on the host from the packer's rows (:func:`layout_for`), moved to the device with the batch, then
    :meth:`materialize` builds what the kernel needs there (the flex BlockMask, the dense mask) once, before the
    forward: the attention layers only read it, so compiled layers see plain tensors of fixed shapes.
    """

    path: AttentionPath
    documents: tuple[tuple[int, ...], ...]  # per row: the length of each example, in order; padding follows
    rows: int
    width: int  # tokens per row
    example_index: torch.Tensor | None = None  # (rows, width): example of each token, -1 on padding (flex, dense)
    cu_seqlens: torch.Tensor | None = None  # (segments + 1,) int32 over the flattened rows (flash_varlen)
    max_seqlen: int = 0
    compiled: bool = False  # flex: compile the kernel and the mask construction
    dense_mask: torch.Tensor | None = None  # sdpa_dense, after materialize()
    block_mask: Any = None  # flex, after materialize()

    def to(self, device: torch.device, non_blocking: bool = False) -> DocumentLayout:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> DocumentLayout:
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn) -> DocumentLayout:
        return replace(
            self,
            example_index=None if self.example_index is None else fn(self.example_index),
            cu_seqlens=None if self.cu_seqlens is None else fn(self.cu_seqlens),
            dense_mask=None,
            block_mask=None,
        )

    def materialize(self) -> DocumentLayout:
        """Build the device-side mask of this path, once (idempotent); returns self."""
        if self.path is AttentionPath.SDPA_DENSE and self.dense_mask is None:
            self.dense_mask = dense_document_mask(self.example_index)
        elif self.path is AttentionPath.FLEX and self.block_mask is None:
            self.block_mask = _block_mask(self.example_index, self.compiled)
        return self


def layout_for(
    path: AttentionPath,
    documents: tuple[tuple[int, ...], ...],
    width: int,
    example_index: torch.Tensor,
    *,
    compiled: bool = False,
) -> DocumentLayout:
    """The layout of a micro-batch whose row ``r`` holds examples of lengths ``documents[r]``, then padding."""
    layout = DocumentLayout(path, documents, len(documents), width, compiled=compiled)
    if path in (AttentionPath.FLEX, AttentionPath.SDPA_DENSE):
        layout.example_index = example_index
    elif path is AttentionPath.FLASH_VARLEN:
        # Every token belongs to one segment of the flattened batch: each example, and each row's padding.
        bounds = [0]
        for r, row in enumerate(documents):
            start = r * width
            for n in row:
                start += n
                bounds.append(start)
            if start < (r + 1) * width:
                bounds.append((r + 1) * width)
        layout.cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
        # The row length bounds every segment; a constant keeps compiled graphs from specialising on it.
        layout.max_seqlen = width
    return layout


# ------------------------------------------------------------------------------------------------- the kernels


def document_attention(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: (B, H, S, D) query, (B, H_kv, S, D) key/value in, (B, S, H, D)
    out. Needs ``guild_layout`` (a :class:`DocumentLayout`) among the keywords.

    Raises:
        AttentionConfigError: called without a layout (a caller that did not pass one, e.g. ``generate``).
    """
    layout: DocumentLayout | None = kwargs.get(LAYOUT_KWARG)
    if layout is None:
        raise AttentionConfigError(
            f"the model's attention is Guild's document attention ({GUILD_ATTENTION}) but this call passed no "
            f"{LAYOUT_KWARG}: go through engine.loss, or call model.set_attn_implementation('sdpa') first"
        )
    if query.shape[2] != layout.width or query.shape[0] != layout.rows:
        raise AttentionConfigError(
            f"the document layout is for {layout.rows} rows of {layout.width} tokens, the batch is "
            f"{query.shape[0]} x {query.shape[2]}"
        )
    if layout.path is AttentionPath.PER_DOCUMENT:
        out = _per_document(query, key, value, layout, scaling, dropout)
    elif layout.path is AttentionPath.SDPA_DENSE:
        mask = layout.dense_mask if layout.dense_mask is not None else dense_document_mask(layout.example_index)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=_gqa(query, key)
        )
    elif layout.path is AttentionPath.FLEX:
        out = _flex(query, key, value, layout, scaling)
    else:
        return _flash_varlen(query, key, value, layout, scaling), None
    return out.transpose(1, 2).contiguous(), None


def dense_document_mask(example_index: torch.Tensor) -> torch.Tensor:
    """(rows, 1, S, S) boolean: query i may see key j when j <= i and both belong to one example. Padding (-1)
    sees only padding, so no query row is empty."""
    width = example_index.shape[1]
    same = example_index[:, :, None] == example_index[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool, device=example_index.device).tril()
    return (same & causal).unsqueeze(1)


def _gqa(query: torch.Tensor, key: torch.Tensor) -> bool:
    return query.shape[1] != key.shape[1]


def _per_document(query, key, value, layout: DocumentLayout, scaling, dropout) -> torch.Tensor:
    """Causal SDPA on each example's slice; the padding's output is zeros (it carries no loss and is seen by no
    real token)."""
    gqa = _gqa(query, key)
    rows = []
    for r, lengths in enumerate(layout.documents):
        parts, start = [], 0
        for n in lengths:
            end = start + n
            parts.append(
                F.scaled_dot_product_attention(
                    query[r : r + 1, :, start:end],
                    key[r : r + 1, :, start:end],
                    value[r : r + 1, :, start:end],
                    dropout_p=dropout,
                    is_causal=True,
                    scale=scaling,
                    enable_gqa=gqa,
                )
            )
            start = end
        if start < layout.width:
            parts.append(query.new_zeros((1, query.shape[1], layout.width - start, value.shape[-1])))
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


_compiled_flex = None


def _block_mask(example: torch.Tensor, compiled: bool):
    """The flex BlockMask of (causal and same example) for ``example`` (rows, width); -1 (padding) sees padding."""

    def same_example_causal(b, h, q, kv):
        return (q >= kv) & (example[b, q] == example[b, kv])

    rows, width = example.shape
    return create_block_mask(same_example_causal, rows, None, width, width, device=example.device, _compile=compiled)


def _flex(query, key, value, layout: DocumentLayout, scaling) -> torch.Tensor:
    global _compiled_flex
    block_mask = layout.block_mask if layout.block_mask is not None else _block_mask(layout.example_index, False)
    kernel = flex_attention
    if layout.compiled:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        kernel = _compiled_flex
    # FlexAttention wants one dtype for q, k and v; under autocast the projections may differ (rotary in fp32).
    dtype = _compute_dtype(query, value)
    return kernel(
        query.to(dtype),
        key.to(dtype),
        value.to(dtype),
        block_mask=block_mask,
        scale=scaling,
        enable_gqa=_gqa(query, key),
    )


def _flash_varlen(query, key, value, layout: DocumentLayout, scaling) -> torch.Tensor:
    """Flatten (B, H, S, D) to (B*S, H, D) and attend within each cu_seqlens segment; returns (B, S, H, D)."""
    rows, heads, width, dim = query.shape
    dtype = _compute_dtype(query, value)
    if query.is_cuda and dtype not in (torch.float16, torch.bfloat16):
        dtype = torch.bfloat16  # flash kernels take half precision only
    q = query.transpose(1, 2).reshape(rows * width, heads, dim).to(dtype)
    k = key.transpose(1, 2).reshape(rows * width, key.shape[1], dim).to(dtype)
    v = value.transpose(1, 2).reshape(rows * width, value.shape[1], value.shape[-1]).to(dtype)
    cu, longest = layout.cu_seqlens, layout.max_seqlen
    kind, kernel, params = _VARLEN if _VARLEN is not None else _varlen_kernel()
    if kind == "flash_attn":
        out = kernel(
            q,
            k,
            v,
            cu,
            cu,
            longest,
            longest,
            softmax_scale=scaling,
            causal=True,
            deterministic=torch.are_deterministic_algorithms_enabled(),
        )
    else:
        extra: dict[str, Any] = {"scale": scaling}
        if "window_size" in params:
            extra["window_size"] = (-1, 0)  # causal
        else:
            extra["is_causal"] = True
        if k.shape[1] != q.shape[1]:
            if "enable_gqa" in params:
                extra["enable_gqa"] = True
            else:
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        out = kernel(q, k, v, cu, cu, longest, longest, **extra)
    return out.view(rows, width, heads, -1)


def _compute_dtype(query: torch.Tensor, value: torch.Tensor) -> torch.dtype:
    if query.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return value.dtype if value.dtype == query.dtype else torch.promote_types(query.dtype, value.dtype)


_VARLEN: tuple[str, Any, frozenset] | None = None  # resolved once, outside compiled code


def _varlen_kernel() -> tuple[str, Any, frozenset] | None:
    """The variable-length flash kernel: ("flash_attn", fn, params) when that package imports, else torch's own
    ("torch", varlen_attn, its parameter names), else None."""
    global _VARLEN
    if _VARLEN is None:
        try:
            from flash_attn import flash_attn_varlen_func

            _VARLEN = ("flash_attn", flash_attn_varlen_func, frozenset())
        except Exception:  # noqa: BLE001 - not installed, or built for another torch: use torch's own kernel
            try:
                from torch.nn.attention.varlen import varlen_attn
            except ImportError:
                return None
            _VARLEN = ("torch", varlen_attn, frozenset(inspect.signature(varlen_attn).parameters))
    return _VARLEN


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(GUILD_ATTENTION, document_attention)
    _registered = True
