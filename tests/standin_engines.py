"""Engines for worker processes in tests (``GUILD_ENGINE_FACTORY=tests.standin_engines:NAME``): no torch."""

from __future__ import annotations

from tasks.engines import StandInEngine


def steady(settings) -> StandInEngine:
    """50 ms a step: a 300-step job runs about 15 s."""
    return StandInEngine(settings, step_s=0.05)


class _Poisoning(StandInEngine):
    def run_job(self, dataset_path, *args, **kwargs):
        with open(dataset_path, encoding="utf-8") as f:
            if "POISON" in f.read():
                raise RuntimeError("CUDA error: device-side assert triggered\n"
                                   "CUDA kernel errors might be asynchronously reported at some other API call")
        return super().run_job(dataset_path, *args, **kwargs)


def poisoning(settings) -> StandInEngine:
    """Fails like a CUDA device-side assert on a dataset that contains POISON; trains the others (10 ms a step)."""
    return _Poisoning(settings, step_s=0.01)
