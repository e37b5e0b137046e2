"""A GPU-pinned worker refuses to start when its GPU is not visible, instead of silently training on the CPU.

Workers are named for what they train on: ``gpuN@host`` runs with ``CUDA_VISIBLE_DEVICES=N`` (``make worker
GPU=N``); ``cpu0@host`` runs with ``CUDA_VISIBLE_DEVICES=""`` (``make worker GPU=cpu``, and what ``make up``
starts on a host without an NVIDIA GPU). At ``worker_init``, before the worker consumes anything:

* ``CUDA_VISIBLE_DEVICES`` names devices (``1``, ``0,1``, ``GPU-<uuid>``): every one must be listed by
  ``nvidia-smi -L`` on this host, else the worker exits with the reason and the fix;
* ``CUDA_VISIBLE_DEVICES`` unset and the worker named ``gpuN``: this host must have a GPU N, same;
* ``CUDA_VISIBLE_DEVICES=""`` (or ``-1``): an explicit CPU worker; a ``gpuN`` name only gets a warning.

Nothing here imports torch or touches CUDA (the worker's parent process forks its children).
"""

from __future__ import annotations

import logging
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass

from celery.signals import worker_init

logger = logging.getLogger(__name__)

_GPU_LINE = re.compile(r"^GPU (\d+): (.*?)(?: \(UUID: ([^)]+)\))?$")
_GPU_NAME = re.compile(r"^gpu(\d+)$")
_GPUS_NAME = re.compile(r"^gpu(\d+(?:-\d+)?(?:\+\d+(?:-\d+)?)*)$")
NVIDIA_SMI_TIMEOUT_S = 10


class DeviceNotVisible(SystemExit):
    """Raised (as SystemExit, so Celery's signal dispatch does not swallow it) when a worker's GPU is missing."""


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    uuid: str = ""


def visible_gpus() -> list[Gpu]:
    """The NVIDIA GPUs of this host, as ``nvidia-smi -L`` lists them (none without the tool or a driver)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return parse_gpu_list(out.stdout)


def parse_gpu_list(text: str) -> list[Gpu]:
    """``GPU 0: NVIDIA H200 (UUID: GPU-...)`` lines as Gpu records (MIG lines are ignored)."""
    gpus = []
    for line in text.splitlines():
        match = _GPU_LINE.match(line.strip())
        if match:
            gpus.append(Gpu(int(match.group(1)), match.group(2), match.group(3) or ""))
    return gpus


def pinned_gpu_of(worker_name: str) -> int | None:
    """N for a worker named ``gpuN@host``, else None."""
    match = _GPU_NAME.match(worker_name.split("@", 1)[0])
    return int(match.group(1)) if match else None


def gpus_of(worker_name: str) -> list[int] | None:
    """The GPUs a worker's name says it owns: ``gpu3`` → [3], ``gpu0-3`` → [0, 1, 2, 3], ``gpu0-2+5`` → [0, 1, 2,
    5] (``scripts/services.sh name``); None for another name (``cpu0``, ``worker``)."""
    match = _GPUS_NAME.match(worker_name.split("@", 1)[0])
    if not match:
        return None
    gpus: list[int] = []
    for run in match.group(1).split("+"):
        first, _, last = run.partition("-")
        gpus.extend(range(int(first), int(last or first) + 1))
    return gpus


def gpu_memory_of(cuda_visible_devices: str | None) -> int | None:
    """Bytes of memory of the smallest GPU ``CUDA_VISIBLE_DEVICES`` names, asked of ``nvidia-smi`` (no CUDA context
    is created); None when it names none, or the tool cannot tell."""
    wanted = named_devices(cuda_visible_devices or "")
    smi = shutil.which("nvidia-smi")
    if not wanted or smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=index,uuid,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return memory_of(wanted, out.stdout)


def memory_of(wanted: list[str], smi_csv: str) -> int | None:
    """The smallest ``memory.total`` (MiB in ``index, uuid, memory`` lines) among the ``wanted`` devices, in bytes."""
    sizes = []
    for line in smi_csv.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3 or not parts[2].isdigit():
            continue
        index, uuid, mib = parts
        if any(d == index or (not d.isdigit() and uuid.startswith(d)) for d in wanted):
            sizes.append(int(mib) * 2**20)
    return min(sizes) if len(sizes) == len(wanted) else None


def check_worker_device(worker_name: str, cuda_visible_devices: str | None, gpus: list[Gpu]) -> str | None:
    """Why this worker must not start (one line with the fix), or None when its devices are there."""
    listed = ("this host's GPUs: " + ", ".join(f"{g.index}: {g.name}" for g in gpus)) if gpus else \
        "nvidia-smi -L lists no GPU on this host"
    fix = ("start it on a host that has that GPU, pin it to a visible one (make worker GPU=N), or run a CPU worker "
           "(make worker GPU=cpu: CUDA_VISIBLE_DEVICES=\"\", named cpu0@host)")
    if cuda_visible_devices is None:
        pinned = pinned_gpu_of(worker_name)
        if pinned is not None and not any(g.index == pinned for g in gpus):
            return f"worker {worker_name} is named for GPU {pinned}, which this host does not have ({listed}); " \
                   f"it would train on the CPU. Fix: {fix}"
        return None
    wanted = named_devices(cuda_visible_devices)
    if not wanted:
        return None  # an explicit CPU worker
    missing = [d for d in wanted if not _visible(d, gpus)]
    if missing:
        return f"worker {worker_name}: CUDA_VISIBLE_DEVICES={cuda_visible_devices} names GPU {', '.join(missing)}, " \
               f"which this host does not show ({listed}); it would train on the CPU. Fix: {fix}"
    return None


def named_devices(cuda_visible_devices: str) -> list[str]:
    """The devices ``CUDA_VISIBLE_DEVICES`` names: none for ``""`` or ``-1`` (CUDA stops at the first invalid)."""
    wanted = [d.strip() for d in cuda_visible_devices.split(",") if d.strip()]
    return [] if not wanted or wanted[0] == "-1" else wanted


def _visible(device: str, gpus: list[Gpu]) -> bool:
    if device.isdigit():
        return any(g.index == int(device) for g in gpus)
    if device.startswith("MIG-"):
        return bool(gpus)  # a MIG slice of some GPU here; nvidia-smi -L lists its UUID under the GPU line
    return any(g.uuid.startswith(device) for g in gpus if g.uuid)


@worker_init.connect
def refuse_without_device(sender=None, **_kwargs) -> None:
    """Stop the worker before it consumes anything when its GPU is not on this host."""
    from config.settings import get_settings

    name = getattr(sender, "hostname", "") or socket.gethostname()
    cuda = get_settings().cuda_visible_devices
    if cuda is not None and not named_devices(cuda):
        if pinned_gpu_of(name) is not None:
            logger.warning("worker %s is named for a GPU but CUDA_VISIBLE_DEVICES is empty: it trains on the CPU "
                           "(name CPU workers cpu0@host: make worker GPU=cpu)", name)
        return
    if cuda is None and pinned_gpu_of(name) is None:
        return  # neither pinned nor named for a GPU: nothing to check
    problem = check_worker_device(name, cuda, visible_gpus())
    if problem:  # SystemExit's text goes to stderr (the worker's log); exit status 1
        raise DeviceNotVisible(f"error: {problem}")
