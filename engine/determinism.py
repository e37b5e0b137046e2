"""The determinism switch (``hyperparams.deterministic``): deterministic kernels, so that a resumed job ends
bitwise equal to an uninterrupted one on CUDA too.

On the CPU the engine's kernels are deterministic already (for a fixed thread count), and bitwise resume holds
with the switch off. On CUDA some kernels accumulate with atomics in whatever order threads finish (flash
attention's backward, index_add, scatter-add), and cuBLAS picks workspaces per stream; with the switch on:

* ``torch.use_deterministic_algorithms(True, warn_only=True)``: deterministic variants wherever torch has one;
  an op without one logs a warning rather than failing the job;
* ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (fixed cuBLAS workspaces). cuBLAS reads it once, when it is first used in
  the process, so it only takes effect if the first job of a worker process asks for determinism; otherwise the
  result carries a warning saying to restart the worker;
* cuDNN in deterministic mode, without autotuning;
* ``hyperparams.attention=auto`` picks flex attention over flash's variable-length kernel (see
  :func:`engine.attention.choose_path`).

The cost is speed, which is why the default is off: typically a few percent to ~15% on a GPU, mostly in the
attention backward and the embedding gradient (figures in bench/RESULTS.md when measured).
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

CUBLAS_WORKSPACE = ":4096:8"
_DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")


def configure(deterministic: bool, device: torch.device) -> list[str]:
    """Set this process's kernels for one job; return warnings for the job's result (empty when all is well)."""
    warnings: list[str] = []
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        torch.backends.cudnn.benchmark = False
    if deterministic and device.type == "cuda":
        configured = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
        if configured not in _DETERMINISTIC_CUBLAS:
            if torch.cuda.is_initialized():
                warnings.append(
                    "hyperparams.deterministic is on but cuBLAS was initialised in this worker before it was "
                    f"asked for (CUBLAS_WORKSPACE_CONFIG={configured!r}); matmuls may not be bitwise reproducible "
                    f"until the worker restarts. Set CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE} in the worker's "
                    "environment to have it from the start"
                )
            # Still set: it is read when cuBLAS first creates a handle, which may not have happened yet.
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    return warnings
