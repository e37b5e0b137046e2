"""engine.stepping: a step that is not finite is skipped on the device without the host looking, a finite one is
the ordinary update, figures are read back later, and the random generators can be rewound."""

from __future__ import annotations

import math
import random

import pytest
import torch

from engine.stepping import PendingStep, RngState, apply_update, not_finite_flag, optimizer_can_skip


def model_and_optimizer(fused=True):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1, fused=fused)


def take_step(model, optimizer, scale: float):
    loss = (model(torch.ones(2, 4)) * scale).sum()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    apply_update(optimizer, 0.1, not_finite_flag(loss.detach(), norm))
    return loss.detach(), norm


def snapshot(model, optimizer):
    return [p.detach().clone() for p in model.parameters()], {
        k: v.clone() for s in optimizer.state.values() for k, v in s.items()
    }


def test_only_fused_adamw_can_skip_on_the_device():
    assert optimizer_can_skip(model_and_optimizer(fused=True)[1])
    assert not optimizer_can_skip(model_and_optimizer(fused=False)[1])


def test_a_non_finite_step_leaves_weights_and_optimizer_state_untouched():
    model, optimizer = model_and_optimizer()
    take_step(model, optimizer, 1.0)
    weights, state = snapshot(model, optimizer)
    take_step(model, optimizer, math.nan)
    after, after_state = snapshot(model, optimizer)
    assert all(torch.equal(a, b) for a, b in zip(weights, after))
    assert all(torch.equal(state[k], after_state[k]) for k in state)  # the step count too
    assert all(p.grad is None for p in model.parameters())


def test_a_finite_step_is_the_plain_update_bitwise():
    model, optimizer = model_and_optimizer()
    twin, twin_optimizer = model_and_optimizer()
    take_step(model, optimizer, 1.0)
    (twin(torch.ones(2, 4))).sum().backward()
    torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
    twin_optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert not hasattr(optimizer, "found_inf")


def test_pending_step_reads_the_mean_loss_and_norm_back():
    pending = PendingStep(3, 0.1, 100, torch.tensor(12.0), 4, torch.tensor(0.5))
    pending.start_copy()
    assert pending.read() == (3.0, 0.5) and pending.finite()
    assert not PendingStep(4, 0.1, 100, torch.tensor(math.inf), 4, torch.tensor(0.5)).finite()


def test_rng_state_rewinds_torch_and_python_generators():
    state = RngState.capture()
    drawn = (torch.rand(3), random.random())
    state.restore()
    again = (torch.rand(3), random.random())
    assert torch.equal(drawn[0], again[0]) and drawn[1] == again[1]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_not_finite_flag(bad):
    assert not_finite_flag(torch.tensor(1.0), torch.tensor(2.0)).item() == 0.0
    assert not_finite_flag(torch.tensor(bad), torch.tensor(2.0)).item() == 1.0
    assert not_finite_flag(torch.tensor(1.0), torch.tensor(bad)).item() == 1.0
