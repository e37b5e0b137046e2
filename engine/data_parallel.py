"""Data-parallel training of one job over the ranks of a gang (:mod:`engine.gang`): everything a rank does
differently from a single process, in one place, so that the training loop reads the same at any width.

A single process (world size 1) never builds a :class:`DataParallel`: nothing here runs, and its path, numbers and
speed are exactly what they were. On N ranks:

* **The same global batch.** Optimizer step ``s`` consumes micro-batches ``s*M .. s*M+M-1`` of the job's data order
  (``M`` = global batch / ``batch_size``, :mod:`config.batching`), whatever N is; rank ``r`` takes the slice
  ``r*M/N .. (r+1)*M/N - 1``. So one rank and four ranks train the same rows in the same steps.
* **Token-weighted loss over the whole global step.** Every rank divides its summed loss by the step's loss tokens
  over *all* ranks, counted on the host from the data order (:class:`StepCounts`, no communication), and gradients
  are summed across ranks, not averaged (a DDP communication hook; FSDP's divide factor 1). The gradient is the
  single process's, up to the order of the sums (fp32: equal within ~1e-6).
* **One gradient exchange per step**: after a rank's last micro-batch (DDP ``no_sync`` / FSDP
  ``set_requires_gradient_sync`` before it).
* **The same decisions on every rank.** The step's loss is all-reduced (reporting, the finiteness test); the
  gradient norm is computed from the synchronised gradients; stop requests are agreed (:func:`agree`).
* **Checkpoints written once.** Rank 0 writes, atomically as always, while the others wait at a barrier
  (:meth:`DataParallel.save`); under FSDP the full weights and optimizer state are gathered first, so a checkpoint
  holds the same files at any width and resumes at any width.
* **Random generators.** Every rank starts from the same state (the checkpoint's, or the seed); ranks other than 0
  then reseed from (seed, global step, rank) (:func:`seed_rank`), so their dropout draws differ from rank 0's and a
  resume on the same width reproduces them; rank 0's stream is the one a single process has, and the one saved.
  Training without dropout (the default of full fine-tuning) draws nothing: 1 and N ranks then give the same
  trajectory. With LoRA dropout, N ranks draw other masks than one process: the same training in distribution.

``hyperparams.sharding`` chooses how the model is held: ``none`` (DDP: each rank holds all weights, gradients and
optimizer state) or ``fsdp`` (FSDP2 ``fully_shard`` per decoder layer: each rank holds 1/N of them, gathering a
layer's weights when it runs), for full fine-tuning whose optimizer state does not fit one GPU. Both run on the
CPU (gloo), where they are tested; CUDA uses NCCL.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from engine.loss import LossKernel, loss_sum
from engine.packing import Batch

logger = logging.getLogger(__name__)

SHARDINGS = ("none", "fsdp")
# A checkpoint written by rank 0 (a large model's full optimizer state on a slow shared file system) may take
# minutes; the other ranks wait for it this long at most (they beat meanwhile, so the gang's watchdog is quiet).
SAVE_TIMEOUT_S = 3600.0
BEAT_EVERY_S = 2.0


def _no_beat() -> None:
    return None


@dataclass(frozen=True)
class World:
    """Which rank of how many this process is, and its line to the gang's supervisor.

    Attributes:
        beat: tells the supervisor this rank is alive (:meth:`engine.gang.RankContext.beat`).
    """

    rank: int
    size: int
    beat: Callable[[], None] = field(default=_no_beat, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ------------------------------------------------------------------------------------------------ the data


class StepCounts:
    """Tokens and loss tokens of any set of rows, cached per row: what one optimizer step holds over all ranks,
    without asking the other ranks."""

    def __init__(self, rows: Sequence[Sequence[int]], examples: Sequence[Any]):
        self._rows, self._examples = rows, examples
        self._cache: dict[int, tuple[int, int]] = {}

    def of(self, row_indices: Sequence[int]) -> tuple[int, int]:
        """``(tokens, loss tokens)`` of the rows ``row_indices`` (indices into ``rows``)."""
        tokens = loss = 0
        for r in row_indices:
            counts = self._cache.get(r)
            if counts is None:
                row = [self._examples[i] for i in self._rows[r]]
                counts = self._cache[r] = (sum(len(e) for e in row), sum(e.num_loss_tokens for e in row))
            tokens += counts[0]
            loss += counts[1]
        return tokens, loss


# ------------------------------------------------------------------------------------------ the collectives


_HOST_GROUP: dict[str, Any] = {}


def _host_group():
    """A gloo group for small host-side values (stop flags, barriers): on CUDA they then never wait on the GPU's
    stream. Made once per process (a warm rank keeps it between jobs); the default group on the CPU."""
    if dist.get_backend() == "gloo":
        return None
    if "group" not in _HOST_GROUP:
        _HOST_GROUP["group"] = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=SAVE_TIMEOUT_S))
    return _HOST_GROUP["group"]


def agree(flag: bool) -> bool:
    """True on every rank when any rank says True (a collective: every rank must call it at the same point)."""
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_host_group())
    return bool(value.item())


@contextlib.contextmanager
def beating(beat: Callable[[], None], every_s: float = BEAT_EVERY_S) -> Iterator[None]:
    """Beat from a thread while the body runs: for long work of one rank that is not a step (a checkpoint
    write, loading and tokenising before the first step)."""
    done = threading.Event()

    def loop() -> None:
        while not done.wait(every_s):
            beat()

    thread = threading.Thread(target=loop, daemon=True, name="rank-beat")
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=every_s + 1)


def wait_for_all(world: World, timeout_s: float = SAVE_TIMEOUT_S) -> None:
    """A barrier that beats while it waits (rank 0 may be writing a large checkpoint)."""
    work = dist.barrier(group=_host_group(), async_op=True)
    with beating(world.beat):
        work.wait(timeout=datetime.timedelta(seconds=timeout_s))


def seed_rank(world: World, seed: int, global_step: int) -> None:
    """Give ranks other than 0 their own reproducible random streams (rank 0 keeps the one it restored)."""
    if world.rank:
        torch.manual_seed((seed * 1_000_003 + global_step) * 1_009 + world.rank)


# ---------------------------------------------------------------------------------------------- the model


class _LossModule(torch.nn.Module):
    """The model with the engine's loss as its forward: DDP and FSDP see the whole step (lm_head included) in one
    forward, whatever part of the model :func:`engine.loss.loss_sum` calls."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch, kernel: LossKernel = LossKernel.CHUNKED) -> torch.Tensor:
        return loss_sum(self.model, batch, kernel)


def _sum_gradients(_state, bucket):
    """DDP communication hook: all-reduce a bucket as a sum (each rank already divided by the global count)."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


class DataParallel:
    """One rank's model wrapped for data-parallel training: DDP (``sharding="none"``) or FSDP2 (``"fsdp"``).

    Build it on every rank at the same point (its construction is collective), after the model is on its device
    and before the optimizer (FSDP replaces the parameters by their shards).
    """

    def __init__(self, model: torch.nn.Module, world: World, sharding: str):
        if sharding not in SHARDINGS:
            raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
        self.world, self.sharding = world, sharding
        module = _LossModule(model)
        if sharding == "fsdp":
            from torch.distributed.fsdp import FSDPModule, fully_shard
            from transformers.modeling_layers import GradientCheckpointingLayer

            for layer in [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]:
                fully_shard(layer)
            fully_shard(module)  # the root: embeddings, final norm and lm_head
            for unit in [m for m in module.modules() if isinstance(m, FSDPModule)]:
                unit.set_gradient_divide_factor(1.0)  # summed, not averaged: each rank divided by the global count
                unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
        else:
            from torch.nn.parallel import DistributedDataParallel

            module = DistributedDataParallel(module, device_ids=None, forward_sync_buffers=False,
                                             gradient_as_bucket_view=True)
            module.register_comm_hook(None, _sum_gradients)
        self.module = module
        self.model = model

    # ---- a step ------------------------------------------------------------------------------------------------
    def loss(self, model, batch: Batch, kernel: LossKernel = LossKernel.CHUNKED) -> torch.Tensor:
        """The summed loss of ``batch`` through the wrapper (``model`` is the one it wraps)."""
        return self.module(batch, kernel)

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward: gradients are exchanged after the last one only."""
        if self.sharding == "fsdp":
            self.module.set_requires_gradient_sync(last)
            yield
        elif last:
            yield
        else:
            with self.module.no_sync():
                yield

    def sum_loss(self, step_loss: torch.Tensor) -> None:
        """The step's summed loss over all ranks, in place (asynchronous on CUDA: nothing waits for it here)."""
        dist.all_reduce(step_loss)

    def clip(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip the (synchronised) gradients to ``max_norm``; return their total norm, the same on every rank."""
        if self.sharding != "fsdp":
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        # Sharded gradients: every element lives in exactly one rank's shard, so the squared norm is the sum of the
        # shards' squared norms over the ranks. Then clip_grad_norm_'s own formula, on each local shard.
        shards = [p.grad.to_local() for p in params if p.grad is not None]
        squares = torch.stack([n.float() for n in torch._foreach_norm(shards)]).square().sum() if shards else \
            torch.zeros((), device=self.model.device)
        dist.all_reduce(squares)
        norm = squares.sqrt()
        torch._foreach_mul_(shards, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[None]:
        """Around calls of the wrapped model outside the wrapper (generating probe answers): under FSDP the root's
        own shards (embeddings, final norm, lm_head) are gathered meanwhile; each decoder layer gathers its own when
        it runs. Collective under FSDP: every rank must make the same calls (greedy decoding of the same weights
        does). Nothing to do under DDP (every rank holds every weight)."""
        if self.sharding != "fsdp":
            yield
            return
        self.module.unshard()
        try:
            yield
        finally:
            self.module.reshard()

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    def save(self, write: Callable[..., Path], path: Path, optimizer) -> Path:
        """Rank 0 calls ``write(model_state=..., optimizer_state=...)`` (None, None under DDP: the replicated model
        is saved as it is); every rank returns ``path`` once it is written."""
        model_state = optimizer_state = None
        if self.sharding == "fsdp":
            model_state, optimizer_state = self._gather(optimizer)  # collective: every rank takes part
        if self.world.is_main:
            with beating(self.world.beat):
                path = write(model_state=model_state, optimizer_state=optimizer_state)
        wait_for_all(self.world)
        return path

    def load_optimizer_state(self, optimizer, state: dict[str, Any]) -> None:
        """Load a full (single-process layout) optimizer state dict: as it is under DDP, sharded under FSDP
        (``engine.checkpoint.load_optimizer_state``'s ``load``)."""
        if self.sharding != "fsdp":
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = self._optimizer_names(optimizer)
        by_name = {"state": {names[i]: v for i, v in state["state"].items()},
                   "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
        set_optimizer_state_dict(self.module, optimizer, by_name, options=StateDictOptions(full_state_dict=True))

    def _gather(self, optimizer) -> tuple[dict | None, dict | None]:
        """Full weights and optimizer state on rank 0, in a single process's layout (None on the other ranks)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(self.module, options=options)
        optimizer_state = get_optimizer_state_dict(self.module, optimizer, options=options)
        if not self.world.is_main:
            return None, None
        prefix = "model."
        # A tied weight (Qwen3's embeddings and lm_head) comes back once per name, as copies: keep the first name,
        # as saving the model itself does.
        seen: set[int] = set()
        tied = set()
        for name, param in self.model.named_parameters(remove_duplicate=False):
            if id(param) in seen:
                tied.add(name)
            seen.add(id(param))
        model_state = {k[len(prefix):]: v for k, v in model_state.items() if k[len(prefix):] not in tied}
        index = {name: i for i, name in enumerate(self._optimizer_names(optimizer))}
        optimizer_state = {
            "state": {index[name]: v for name, v in optimizer_state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                             for g in optimizer_state["param_groups"]],
        }
        return model_state, optimizer_state

    def _optimizer_names(self, optimizer) -> list[str]:
        """The wrapper's name of each parameter, in the optimizer's order (its integer keys)."""
        names = {id(p): name for name, p in self.module.named_parameters()}
        return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
