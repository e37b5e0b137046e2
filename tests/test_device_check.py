"""tasks.device_check: a worker pinned to a GPU this host does not show refuses to start; CPU workers are explicit."""

from __future__ import annotations

import socket

import pytest

from tasks import device_check as dc
from tests.services import wait_until

SMI = """GPU 0: NVIDIA H200 (UUID: GPU-1c8a2a4e-0b5f-7d2e-93aa-000000000000)
GPU 1: NVIDIA H200 (UUID: GPU-77aa0000-0000-0000-0000-000000000001)
  MIG 3g.71gb     Device  0: (UUID: MIG-5f1d0000-0000-0000-0000-000000000000)
"""
TWO = dc.parse_gpu_list(SMI)


def test_parse_nvidia_smi_list():
    assert TWO == [dc.Gpu(0, "NVIDIA H200", "GPU-1c8a2a4e-0b5f-7d2e-93aa-000000000000"),
                   dc.Gpu(1, "NVIDIA H200", "GPU-77aa0000-0000-0000-0000-000000000001")]
    assert dc.parse_gpu_list("") == []


@pytest.mark.parametrize("name, cuda, gpus, refused", [
    ("gpu1@h", "1", TWO, False),
    ("gpu1@h", "1", [], True),  # the issue: a worker named gpu1 on a host without it
    ("gpu2@h", "2", TWO, True),
    ("gpu0@h", "0,1", TWO, False),
    ("gpu0@h", "GPU-77aa", TWO, False),  # a UUID prefix, as CUDA accepts
    ("gpu0@h", "GPU-dead", TWO, True),
    ("gpu0@h", "", [], False),  # an explicit CPU worker (the tests' gpu0@test)
    ("cpu0@h", "", [], False),
    ("gpu0@h", "-1", [], False),
    ("gpu3@h", None, TWO, True),  # unset: the name says which GPU
    ("gpu1@h", None, TWO, False),
    ("worker@h", None, [], False),  # neither pinned nor named for a GPU
])
def test_which_workers_may_start(name, cuda, gpus, refused):
    problem = dc.check_worker_device(name, cuda, gpus)
    assert (problem is not None) is refused, problem
    if refused:
        assert "it would train on the CPU" in problem and "make worker GPU=cpu" in problem


def test_the_refusal_names_the_gpus_it_sees():
    problem = dc.check_worker_device("gpu2@h", "2", TWO)
    assert "CUDA_VISIBLE_DEVICES=2 names GPU 2" in problem and "this host's GPUs: 0: NVIDIA H200, 1: NVIDIA H200" \
        in problem


def test_doctor_cross_checks_workers_of_this_host(monkeypatch):
    import doctor

    monkeypatch.setattr(dc, "visible_gpus", lambda: TWO[:1])
    here = socket.gethostname()
    checks = doctor._worker_device_checks([f"gpu0@{here}", f"gpu1@{here}", "gpu7@elsewhere", f"cpu0@{here}"])
    assert [(c.name, c.ok) for c in checks] == [(f"worker gpu0@{here} device", True),
                                               (f"worker gpu1@{here} device", False)]
    assert "it trains on the CPU" in checks[1].detail and "make worker GPU=cpu" in checks[1].fix


def test_a_multi_gpu_workers_name_says_its_gpus():
    assert dc.gpus_of("gpu0-3@h") == [0, 1, 2, 3] and dc.gpus_of("gpu0+2@h") == [0, 2]
    assert dc.gpus_of("gpu0-2+5@h") == [0, 1, 2, 5] and dc.gpus_of("gpu7@h") == [7]
    assert dc.gpus_of("cpu0@h") is None and dc.gpus_of("worker@h") is None


def test_doctor_checks_every_gpu_a_multi_gpu_worker_owns(monkeypatch):
    import doctor

    monkeypatch.setattr(dc, "visible_gpus", lambda: TWO)
    here = socket.gethostname()
    ok, missing = doctor._worker_device_checks([f"gpu0-1@{here}", f"gpu1-2@{here}"])
    assert ok.ok and ok.detail == "named for GPUs 0,1 (one rank each); this host shows 2 GPU(s)"
    assert not missing.ok and missing.detail.endswith(": GPU 2 missing") and "GPUS=0,1" in missing.fix
    assert "it trains on the CPU" not in missing.detail  # it has GPU 1


def test_the_memory_of_a_workers_gpus_is_the_smallest():
    csv = "0, GPU-1c8a2a4e, 143771\n1, GPU-77aa0000, 81559\n"
    assert dc.memory_of(["0", "1"], csv) == 81559 * 2**20
    assert dc.memory_of(["GPU-1c8a"], csv) == 143771 * 2**20
    assert dc.memory_of(["0", "5"], csv) is None  # a GPU it cannot see: no figure rather than a wrong one
    assert dc.gpu_memory_of("") is None and dc.gpu_memory_of(None) is None


@pytest.mark.integration
def test_a_worker_pinned_to_a_missing_gpu_exits_with_the_reason(start_worker):
    if dc.visible_gpus():
        pytest.skip("this host has a GPU")
    worker = start_worker("gpu0@pinned", wait_ready=False, env={"CUDA_VISIBLE_DEVICES": "0"})
    wait_until(lambda: worker.proc.poll() is not None, 90, what="the worker to refuse to start")
    assert worker.proc.returncode == 1
    log = worker.log()
    assert "CUDA_VISIBLE_DEVICES=0 names GPU 0" in log and "make worker GPU=cpu" in log
    assert "Traceback" not in log and "ready." not in log
