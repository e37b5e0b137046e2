"""engine.loss: the chunked linear cross-entropy gives the plain path's loss and gradients (any chunk size, with
and without a bias, with and without autograd), and the model-level loss equals cross-entropy over full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.errors import AttentionConfigError
from engine.loss import LossKernel, choose_loss_kernel, chunk_tokens, linear_cross_entropy_sum, loss_sum
from engine.packing import collate, pack_best_fit
from engine.tokenize import tokenize_examples
from tests.engine_fixtures import chat_examples, one_torch_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def problem(n=37, d=24, vocab=101, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_()
    weight = (torch.randn(vocab, d, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    b = (torch.randn(vocab, generator=g, dtype=torch.float64) * 0.1).requires_grad_() if bias else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    return hidden, weight, b, targets


def grads_of(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("chunk", [1, 5, 37, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_loss_and_gradients_equal_the_plain_path(chunk, bias):
    hidden, weight, b, targets = problem(bias=bias)
    plain = F.cross_entropy(F.linear(hidden, weight, b), targets, reduction="sum")
    chunked = linear_cross_entropy_sum(hidden, weight, b, targets, chunk=chunk)
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-6)
    # A scaled upstream gradient, as the trainer's division by the step's token count gives.
    for mine, theirs in zip(grads_of(chunked * 0.25, (hidden, weight, b)), grads_of(plain * 0.25, (hidden, weight, b))):
        assert torch.allclose(mine.double(), theirs, rtol=1e-5, atol=1e-7)


def test_chunked_loss_in_float32_matches_within_tolerance():
    hidden, weight, _, targets = problem(n=300, d=64, vocab=4096)
    hidden32 = hidden.detach().float().requires_grad_()
    weight32 = weight.detach().float().requires_grad_()
    plain = F.cross_entropy(F.linear(hidden32, weight32), targets, reduction="sum")
    chunked = linear_cross_entropy_sum(hidden32, weight32, None, targets, chunk=128)
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)
    for mine, theirs in zip(grads_of(chunked, (hidden32, weight32)), grads_of(plain, (hidden32, weight32))):
        assert (mine - theirs).abs().max().item() <= 1e-5 * theirs.abs().max().item(), (mine - theirs).abs().max()


def test_without_autograd_no_gradient_is_computed():
    hidden, weight, _, targets = problem()
    with torch.no_grad():
        value = linear_cross_entropy_sum(hidden, weight, None, targets, chunk=8)
    assert value.grad_fn is None
    assert value.item() == pytest.approx(F.cross_entropy(hidden @ weight.T, targets, reduction="sum").item(), rel=1e-9)


def test_only_the_inputs_that_need_gradients_get_them():
    hidden, weight, _, targets = problem()
    frozen = weight.detach()  # a frozen output layer (adapters train the body only)
    loss = linear_cross_entropy_sum(hidden, frozen, None, targets, chunk=8)
    (grad,) = torch.autograd.grad(loss, [hidden])
    expected = torch.autograd.grad(F.cross_entropy(hidden @ frozen.T, targets, reduction="sum"), [hidden])[0]
    assert torch.allclose(grad, expected, rtol=1e-6)


def test_chunk_size_follows_the_vocabulary_and_device():
    assert chunk_tokens(151_936, torch.device("cuda")) == 2**28 // 151_936  # 1,766 tokens: ~1 GiB of fp32 logits
    assert chunk_tokens(4096, torch.device("cpu")) == 1024  # 16 MiB of fp32 logits: faster than one big chunk
    assert chunk_tokens(10**9, torch.device("cpu")) == 64


def test_model_loss_equals_cross_entropy_over_full_logits(tiny_hero_dir):
    """Through the tiny hero (vocabulary 4,096), with chunks smaller than the batch's loss tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine import loss as loss_module
    from engine.attention import install

    model = AutoModelForCausalLM.from_pretrained(tiny_hero_dir, dtype=torch.float32)
    install(model, packed=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_hero_dir)
    examples = tokenize_examples(chat_examples(0, 8), tokenizer, max_length=128).examples
    batch = collate(pack_best_fit([len(e) for e in examples], 256), examples, pad_id=0)
    assert batch.num_loss_tokens > 200

    def full_logits_loss():
        out = model.model(**loss_module.model_inputs(model, batch)).last_hidden_state
        logits = model.lm_head(out).flatten(0, 1)[batch.loss_positions]
        return F.cross_entropy(logits, batch.loss_targets, reduction="sum")

    reference = full_logits_loss()
    expected = torch.autograd.grad(reference, list(model.parameters()))
    original = loss_module.CHUNK_ELEMENTS["cpu"]
    loss_module.CHUNK_ELEMENTS["cpu"] = 64 * 4096  # 64-token chunks
    try:
        chunked = loss_sum(model, batch, LossKernel.CHUNKED)
    finally:
        loss_module.CHUNK_ELEMENTS["cpu"] = original
    got = torch.autograd.grad(chunked, list(model.parameters()))
    assert chunked.item() == pytest.approx(reference.item(), rel=1e-5)
    for mine, theirs in zip(got, expected):
        assert (mine - theirs).abs().max().item() <= 1e-5 * theirs.abs().max().item(), (mine - theirs).abs().max()


def test_liger_is_refused_where_it_cannot_run():
    assert choose_loss_kernel("auto", torch.device("cpu")) is LossKernel.CHUNKED
    with pytest.raises(AttentionConfigError, match="hyperparams.loss_kernel=liger needs CUDA"):
        choose_loss_kernel("liger", torch.device("cpu"))


def test_the_compiled_kernels_source_equals_the_eager_chunk_step():
    """What CUDA compiles (out of place) computes what the eager, in-place path does."""
    from engine.loss import _logit_loss_and_grad, logit_loss_and_grad_reference

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(50, 300, generator=g)
    targets = torch.randint(0, 300, (50,), generator=g)
    loss, grad = logit_loss_and_grad_reference(logits, targets)
    eager_loss, eager_grad = _logit_loss_and_grad(logits.clone(), targets)
    assert loss.item() == pytest.approx(eager_loss.item(), rel=1e-6)
    assert torch.allclose(grad, eager_grad, atol=1e-7)
    assert torch.allclose(grad, torch.softmax(logits, -1) - F.one_hot(targets, 300), atol=1e-6)


def test_liger_call_returns_the_summed_loss(monkeypatch):
    """liger's module (CUDA only) stands in with the plain computation: the engine asks it for a mean, whatever
    the installed version does with its reduction argument, and turns that into the sum; a (loss, z_loss) tuple
    from newer versions is taken too."""
    import sys
    import types

    from engine.loss import _liger_sum

    class FakeLiger(torch.nn.Module):
        def __init__(self, reduction="mean"):
            super().__init__()
            assert reduction == "mean"

        def forward(self, weight, hidden, targets, bias=None):
            loss = F.cross_entropy(F.linear(hidden, weight, bias), targets)
            return loss, None

    module = types.ModuleType("liger_kernel.transformers")
    module.LigerFusedLinearCrossEntropyLoss = FakeLiger
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", module)
    hidden, weight, _, targets = problem()
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.float64)
    head.weight.data.copy_(weight.detach())
    expected = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    assert _liger_sum(hidden, head, targets).item() == pytest.approx(expected.item(), rel=1e-6)
