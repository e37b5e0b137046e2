"""Flower's defaults for Guild (``celery -A tasks flower`` loads ``flowerconfig.py`` from the working directory).

The checks that must hold however Flower is started (another ``--conf``, any option spelling) are not here but in
:mod:`tasks.flower_guard`, which runs inside Flower with its final options: no unauthenticated Flower beyond
loopback, no weak credentials, read-only unless ``GUILD_FLOWER_CONTROL=1``, ``/metrics`` behind the same auth.
"""

import os

from config.settings import get_settings

_settings = get_settings()

# Flower binds all interfaces when no address is given; Guild's default is loopback (--address overrides it).
address = _settings.flower_address or "127.0.0.1"
# Read-only: Flower refuses to send, revoke or time-limit tasks and to control workers. tasks.flower_guard enforces
# it unless GUILD_FLOWER_CONTROL=1.
read_only = not _settings.flower_control

# History across restarts: Flower keeps its task list in $GUILD_HOME/flower/ (Python's shelve format), written at a
# clean stop (SIGTERM, `make down`) and every minute, and read back at start. Flower loads that file as trusted
# data, so its directory is private to the user running Flower.
_state_dir = _settings.guild_home / "flower"
os.makedirs(_state_dir, mode=0o700, exist_ok=True)
os.chmod(_state_dir, 0o700)
persistent = True
db = str(_state_dir / "flower-state")
state_save_interval = 60_000  # ms
