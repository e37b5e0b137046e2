"""engine.attention: every path that runs on the CPU keeps packed examples apart exactly (losses and gradients
equal to each example alone), no path infers boundaries from position ids, and configurations that would leak or
cannot train are refused with the key and the fix."""

from __future__ import annotations

import json

import pytest
import torch

from engine.attention import (
    ATTENTION_CHOICES,
    GUILD_ATTENTION,
    AttentionPath,
    choose_path,
    document_attention,
    install,
    layout_for,
)
from engine.errors import AttentionConfigError
from engine.loss import loss_sum, per_example_losses
from engine.packing import collate, pack_best_fit
from engine.tokenize import tokenize_examples
from tests.engine_fixtures import chat_examples, one_torch_thread, small_config  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")


def load(tiny_hero_dir, guild: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_hero_dir, dtype=torch.float32)
    if guild:
        install(model, packed=True)
    return model


@pytest.fixture(scope="module")
def plain(tiny_hero_dir):
    """The reference: the tiny hero with its own attention, run on one example at a time (nothing to separate)."""
    return load(tiny_hero_dir, guild=False).eval()


@pytest.fixture(scope="module")
def guild(tiny_hero_dir):
    return load(tiny_hero_dir, guild=True).eval()


@pytest.fixture(scope="module")
def examples(tiny_hero_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_hero_dir)
    return tokenize_examples(chat_examples(0, 12), tokenizer, max_length=128).examples


@pytest.fixture(scope="module")
def rows(examples):
    rows = pack_best_fit([len(e) for e in examples], capacity=256)
    assert sum(len(r) > 1 for r in rows) >= 3  # several rows hold several examples
    return rows


@pytest.fixture(scope="module")
def alone(plain, examples):
    with torch.no_grad():
        return {i: per_example_losses(plain, collate([[i]], examples, pad_id=0))[i] for i in range(len(examples))}


def packed_batch(rows, examples, path: AttentionPath):
    batch = collate(rows, examples, pad_id=0)
    batch.layout = layout_for(path, batch.documents, batch.input_ids.shape[1], batch.example_index)
    return batch


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("path", [AttentionPath.PER_DOCUMENT, AttentionPath.SDPA_DENSE, AttentionPath.FLEX])
def test_packed_losses_equal_one_by_one_on_every_cpu_path(guild, rows, examples, alone, path):
    """fp32, several rows of several examples each plus padding: each example's loss is its loss alone. FlexAttention
    runs its forward only (it has no backward on the CPU)."""
    with torch.no_grad():
        packed = per_example_losses(guild, packed_batch(rows, examples, path))
    assert packed.keys() == alone.keys()
    worst = max(abs(packed[i] - alone[i]) for i in alone)
    assert worst < 1e-5, f"{path.value}: {worst}"


def test_per_document_gradients_equal_the_dense_mask_and_each_example_alone(tiny_hero_dir, rows, examples):
    """The CPU training path: the gradient of the packed batch's summed loss equals the dense-mask reference's and
    the sum of each example's own gradient."""
    model = load(tiny_hero_dir, guild=True).train()

    def gradients(batches):
        model.zero_grad(set_to_none=True)
        for batch in batches:
            loss_sum(model, batch).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    per_document = gradients([packed_batch(rows, examples, AttentionPath.PER_DOCUMENT)])
    dense = gradients([packed_batch(rows, examples, AttentionPath.SDPA_DENSE)])
    one_by_one = gradients([collate([[i]], examples, pad_id=0) for i in range(len(examples))])
    for name in per_document:
        scale = dense[name].abs().max().item() + 1e-12
        assert (per_document[name] - dense[name]).abs().max().item() <= 1e-5 * scale + 1e-7, name
        assert (per_document[name] - one_by_one[name]).abs().max().item() <= 1e-5 * scale + 1e-7, name


def test_flash_varlen_layout_covers_every_token_once(examples):
    batch = collate([[0, 1], [2]], examples, pad_id=0, length=200)
    layout = layout_for(AttentionPath.FLASH_VARLEN, batch.documents, 200, batch.example_index)
    n0, n1, n2 = (len(examples[i]) for i in range(3))
    # examples 0 and 1, the padding of row 0, example 2, the padding of row 1: nothing crosses a boundary
    assert layout.cu_seqlens.tolist() == [0, n0, n0 + n1, 200, 200 + n2, 400]
    assert layout.cu_seqlens.dtype == torch.int32 and layout.max_seqlen == 200


def test_the_model_keeps_no_trace_of_guild_attention_on_disk(guild, tmp_path):
    """A checkpoint must load anywhere with plain from_pretrained."""
    assert guild.config._attn_implementation == GUILD_ATTENTION
    guild.config.save_pretrained(tmp_path)
    assert GUILD_ATTENTION not in (tmp_path / "config.json").read_text()
    assert "attn_implementation" not in json.loads((tmp_path / "config.json").read_text())


def test_attention_without_a_layout_is_refused(guild, examples):
    batch = collate([[0, 1]], examples, pad_id=0)
    with pytest.raises(AttentionConfigError, match="guild_layout"), torch.no_grad():
        guild(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    q = torch.zeros(1, 4, 8, 16)
    with pytest.raises(AttentionConfigError, match="guild_layout"):
        document_attention(None, q, q, q, None)


def test_auto_picks_per_document_on_the_cpu_and_dense_when_compiled():
    assert choose_path("auto", CPU) is AttentionPath.PER_DOCUMENT
    assert choose_path("auto", CPU, compiled=True) is AttentionPath.SDPA_DENSE
    assert choose_path("sdpa_dense", CPU) is AttentionPath.SDPA_DENSE
    assert set(ATTENTION_CHOICES) == {"auto", *(p.value for p in AttentionPath)}


@pytest.mark.parametrize(
    ("requested", "dropout", "message"),
    [
        ("flex", 0.0, "hyperparams.attention=flex cannot train on cpu: FlexAttention has no backward"),
        ("flash_varlen", 0.0, "hyperparams.attention=flash_varlen needs a CUDA GPU"),
        ("bogus", 0.0, "hyperparams.attention='bogus' is not a known attention path"),
    ],
)
def test_paths_that_cannot_train_here_are_refused(requested, dropout, message):
    with pytest.raises(AttentionConfigError, match=message):
        choose_path(requested, CPU, attention_dropout=dropout)


def test_a_model_that_would_infer_boundaries_from_positions_is_refused_for_packed_rows(
    tiny_hero_dir, monkeypatch, tmp_path
):
    """A model whose attention cannot be switched (as with one forcing flash_attention_2 or its own kernels) would
    leave transformers to find packed examples from position ids, which it does only at batch size 1: refused for
    packed data, naming the key and the fix; unpacked rows (one example each, padding at the end) run exactly."""
    from transformers import PreTrainedModel

    from engine.trainer import TrainerEngine

    monkeypatch.setattr(PreTrainedModel, "_can_set_attn_implementation", classmethod(lambda cls: False))
    model = load(tiny_hero_dir, guild=False)
    with pytest.raises(AttentionConfigError, match="data.enable_packing=false"):
        install(model, packed=True)
    assert model.config._attn_implementation != GUILD_ATTENTION
    assert install(model, packed=False) is False

    engine = TrainerEngine()
    run = dict(model_path=str(tiny_hero_dir), run_id="leak")
    with pytest.raises(AttentionConfigError, match="would attend to each other"):
        engine.run_job(chat_examples(), small_config(max_steps=1), checkpoint_dir=tmp_path / "a", **run)
    result = engine.run_job(
        chat_examples(), small_config(max_steps=1), checkpoint_dir=tmp_path / "b", enable_packing=False, **run
    )
    assert result.status == "completed" and result.attention == "model"


def test_a_job_reports_its_attention_path(tiny_hero_dir, tmp_path):
    from engine.trainer import TrainerEngine

    result = TrainerEngine().run_job(
        chat_examples(),
        small_config(max_steps=1, attention="sdpa_dense"),
        model_path=str(tiny_hero_dir),
        checkpoint_dir=tmp_path,
        run_id="dense",
    )
    assert (result.status, result.attention, result.loss_kernel) == ("completed", "sdpa_dense", "chunked")


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
    """A stand-in for a variable-length flash kernel on the CPU: causal SDPA on each cu_seqlens segment of
    (total, heads, dim) inputs. Takes both keyword conventions (flash_attn's and torch's)."""
    assert torch.equal(cu_q, cu_k) and max_q == max_k and cu_q.dtype == torch.int32
    assert kwargs.get("causal", kwargs.get("is_causal", kwargs.get("window_size") == (-1, 0)))
    scale = kwargs.get("softmax_scale", kwargs.get("scale"))
    out = torch.empty_like(q)
    bounds = cu_q.tolist()
    for start, end in zip(bounds, bounds[1:]):
        seg = [x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v)]
        attended = torch.nn.functional.scaled_dot_product_attention(
            *seg, is_causal=True, scale=scale, enable_gqa=seg[0].shape[1] != seg[1].shape[1]
        )
        out[start:end] = attended.squeeze(0).transpose(0, 1)
    return out


@pytest.mark.parametrize(
    "kernel",
    [
        ("flash_attn", frozenset()),  # flash_attn.flash_attn_varlen_func's keywords
        ("torch", frozenset({"scale", "window_size", "enable_gqa"})),  # torch.nn.attention.varlen, torch >= 2.12
        ("torch", frozenset({"scale", "is_causal"})),  # an older varlen_attn: no GQA, K/V heads repeated
    ],
)
def test_flash_varlen_plumbing_with_a_reference_kernel(guild, rows, examples, alone, monkeypatch, kernel):
    """The flash path's flattening, cu_seqlens and reshaping, checked on the CPU with a reference kernel in place of
    flash attention (which needs CUDA): each example's loss is its loss alone."""
    import engine.attention as attention

    kind, params = kernel
    monkeypatch.setattr(attention, "_VARLEN", (kind, reference_varlen, params))
    with torch.no_grad():
        packed = per_example_losses(guild, packed_batch(rows, examples, AttentionPath.FLASH_VARLEN))
    assert max(abs(packed[i] - alone[i]) for i in alone) < 1e-5
