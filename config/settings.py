"""The one place that reads the process environment.

Every other module receives a :class:`Settings` (or values taken from it); none reads ``os.environ``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from config.errors import SettingsError

DEFAULT_GUILD_HOME = "./var"
DEFAULT_EMBEDDED_REDIS_PORT = 6390


def _flag(value: str | None, name: str) -> bool | None:
    if value is None or value == "":
        return None
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={value!r} is not a boolean; use 1 or 0")


@dataclass(frozen=True)
class Settings:
    """Process-wide settings, read from the environment once.

    Attributes:
        guild_home: root of datasets, campaigns, checkpoints, logs and the embedded Redis' data.
        redis_url: broker, result backend and job store. When ``REDIS_URL`` is unset, the embedded Redis
            that ``make up`` starts (its URL is written to ``$GUILD_HOME/redis/url``).
        enable_packing: ``ENABLE_PACKING`` as a debugging override of ``data.enable_packing`` (None: unset).
        flower_basic_auth: ``FLOWER_BASIC_AUTH`` (``user:password``) or None.
        verbose: ``GUILD_VERBOSE=1`` makes the engine log every step.
        cuda_visible_devices: the GPU a worker is pinned to (informational; CUDA reads it itself).
        engine_factory: ``GUILD_ENGINE_FACTORY=module:callable``, the training engine a worker builds
            (``callable(settings)``); unset: the real engine. ``tasks.engines:StandInEngine`` sleeps instead of
            training (benchmarks and tests of the queue, without torch).
        ranks: processes a job of this worker trains on (:func:`worker_ranks`): one per GPU that
            ``CUDA_VISIBLE_DEVICES`` lists, or ``GUILD_RANKS`` CPU ranks on a CPU worker (``CUDA_VISIBLE_DEVICES=""``).
        rank_device: "cuda" or "cpu": what the ranks train on when ``ranks > 1``.
        gang_timeout_s: ``GUILD_GANG_TIMEOUT_S``: a collective that waits longer, or a rank silent for longer,
            fails a multi-rank job (which is then retried from its last checkpoint).
    """

    guild_home: Path
    redis_url: str
    enable_packing: bool | None = None
    flower_basic_auth: str | None = None
    verbose: bool = False
    cuda_visible_devices: str | None = None
    visibility_timeout_s: int | None = None
    flower_address: str | None = None
    flower_control: bool = False  # GUILD_FLOWER_CONTROL=1: Flower may send/revoke tasks and control workers
    heartbeat_stale_s: float = 60.0
    sweep_interval_s: float = 15.0
    engine_factory: str | None = None
    max_dataset_bytes: int | None = None  # None: engine.formats' default (see dataset_limits)
    max_line_bytes: int | None = None
    max_examples: int | None = None
    ranks: int = 1
    rank_device: str = "cpu"
    gang_timeout_s: float = 300.0

    @property
    def dataset_limits(self):
        """The :class:`config.dataset_limits.DatasetLimits` enqueue applies: defaults, or the GUILD_MAX_* overrides."""
        from config.dataset_limits import DEFAULT_LIMITS, DatasetLimits

        return DatasetLimits(self.max_dataset_bytes or DEFAULT_LIMITS.max_file_bytes,
                             self.max_line_bytes or DEFAULT_LIMITS.max_line_bytes,
                             self.max_examples or DEFAULT_LIMITS.max_examples)

    @classmethod
    def from_env(cls, environ: dict | None = None) -> Settings:
        env = os.environ if environ is None else environ
        home = Path(env.get("GUILD_HOME") or DEFAULT_GUILD_HOME).expanduser().resolve()
        redis_url = env.get("REDIS_URL") or embedded_redis_url(home)
        vt = env.get("GUILD_VISIBILITY_TIMEOUT_S")
        if vt is not None and vt != "":
            try:
                vt_int = int(vt)
            except ValueError:
                raise SettingsError(f"GUILD_VISIBILITY_TIMEOUT_S={vt!r} is not a whole number of seconds") from None
            if vt_int <= 0:
                raise SettingsError("GUILD_VISIBILITY_TIMEOUT_S must be positive")
        else:
            vt_int = None
        ranks, rank_device = worker_ranks(env.get("CUDA_VISIBLE_DEVICES"), _count(env, "GUILD_RANKS"))
        return cls(
            heartbeat_stale_s=_seconds(env, "GUILD_HEARTBEAT_STALE_S", 60.0),
            sweep_interval_s=_seconds(env, "GUILD_SWEEP_INTERVAL_S", 15.0),
            guild_home=home,
            redis_url=redis_url,
            enable_packing=_flag(env.get("ENABLE_PACKING"), "ENABLE_PACKING"),
            flower_basic_auth=env.get("FLOWER_BASIC_AUTH") or None,
            flower_address=env.get("FLOWER_ADDRESS") or None,
            flower_control=bool(_flag(env.get("GUILD_FLOWER_CONTROL"), "GUILD_FLOWER_CONTROL")),
            verbose=bool(_flag(env.get("GUILD_VERBOSE"), "GUILD_VERBOSE")),
            cuda_visible_devices=env.get("CUDA_VISIBLE_DEVICES"),
            visibility_timeout_s=vt_int,
            engine_factory=env.get("GUILD_ENGINE_FACTORY") or None,
            max_dataset_bytes=_count(env, "GUILD_MAX_DATASET_BYTES"),
            max_line_bytes=_count(env, "GUILD_MAX_LINE_BYTES"),
            max_examples=_count(env, "GUILD_MAX_EXAMPLES"),
            gang_timeout_s=_seconds(env, "GUILD_GANG_TIMEOUT_S", 300.0),
            ranks=ranks,
            rank_device=rank_device,
        )


def worker_ranks(cuda_visible_devices: str | None, guild_ranks: int | None) -> tuple[int, str]:
    """``(ranks, device)`` of a worker's jobs: one rank per GPU that ``CUDA_VISIBLE_DEVICES`` lists (a GPU worker);
    ``GUILD_RANKS`` CPU ranks with ``CUDA_VISIBLE_DEVICES=""`` (a CPU worker; tests and development); else one.

    Raises:
        SettingsError: ``GUILD_RANKS`` contradicts the GPU list, or asks for ranks without saying on what.
    """
    listed = (cuda_visible_devices or "").strip()
    if listed and listed != "-1":
        gpus = [d for d in listed.split(",") if d.strip()]
        if guild_ranks is not None and guild_ranks != len(gpus):
            raise SettingsError(f"GUILD_RANKS={guild_ranks} but CUDA_VISIBLE_DEVICES={cuda_visible_devices!r} lists "
                                f"{len(gpus)} GPU(s): a GPU worker runs one rank per GPU; unset GUILD_RANKS")
        return len(gpus), "cuda"
    if cuda_visible_devices is None and guild_ranks is not None and guild_ranks > 1:
        raise SettingsError(f"GUILD_RANKS={guild_ranks} needs CUDA_VISIBLE_DEVICES=\"\" (CPU ranks); for GPUs, list "
                            "them instead (CUDA_VISIBLE_DEVICES=0,1,..., or make worker GPUS=0,1,...)")
    return guild_ranks or 1, "cpu"


def _seconds(env, name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise SettingsError(f"{name} must be positive")
    return value


def _count(env, name: str) -> int | None:
    """A positive whole number (``2000000``, ``2_000_000``, or bytes as ``4GiB``/``512MiB``/``64KiB``), or None."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return None
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30}
    scale = 1
    for suffix, factor in units.items():
        if raw.lower().endswith(suffix):
            raw, scale = raw[: -len(suffix)].strip(), factor
            break
    try:
        value = int(raw.replace("_", "")) * scale
    except ValueError:
        raise SettingsError(f"{name}={env.get(name)!r} is not a whole number (e.g. 2000000, or 4GiB for bytes)") \
            from None
    if value <= 0:
        raise SettingsError(f"{name} must be positive")
    return value


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (the user name kept), from the parsed URL.

    When the URL does not parse cleanly (an unencoded ``/``, ``?`` or ``#`` in the password puts part of it in the
    path), everything after the scheme is hidden rather than risk showing a piece of the password.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return url.split("://", 1)[0] + "://***" if "://" in url else "***"
    if parts.password is None and "@" not in url:
        return url
    rest = parts.path + (f"?{parts.query}" if parts.query else "") + (f"#{parts.fragment}" if parts.fragment else "")
    if "@" in rest or ":" in rest or not parts.hostname:
        return f"{parts.scheme}://***"
    user = parts.username or ""
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return urlunsplit((parts.scheme, f"{user}:***@{host}" + (f":{port}" if port else ""), parts.path, "", ""))


def embedded_redis_url(home: Path) -> str:
    """The URL of the embedded Redis under ``home``: the one ``make up`` recorded, else its default port."""
    recorded = home / "redis" / "url"
    try:
        text = recorded.read_text().strip()
    except OSError:
        text = ""
    return text or f"redis://127.0.0.1:{DEFAULT_EMBEDDED_REDIS_PORT}/0"


_cached: Settings | None = None


def get_settings() -> Settings:
    """The settings of this process (read once, then cached)."""
    global _cached
    if _cached is None:
        _cached = Settings.from_env()
    return _cached


def reset_settings_cache() -> None:
    """Forget the cached settings (tests change the environment between cases)."""
    global _cached
    _cached = None
