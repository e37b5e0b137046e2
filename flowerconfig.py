"""Flower's configuration (``celery -A tasks flower`` loads ``flowerconfig.py`` from the working directory).

Flower takes ``FLOWER_BASIC_AUTH=user:password`` from the environment itself (UI and API, ``/metrics``
included). This file adds the guard Flower lacks: it refuses to start bound to a non-loopback address
without auth, since its API can revoke tasks and shut workers down.
"""

import ipaddress
import sys

from config.settings import get_settings

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def _address_from_argv(argv):
    for i, arg in enumerate(argv):
        if arg.startswith("--address="):
            return arg.split("=", 1)[1]
        if arg == "--address" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _is_loopback(address):
    if address in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


_settings = get_settings()
# Flower binds all interfaces when no address is given; Guild's default is loopback.
_explicit = _address_from_argv(sys.argv)  # "--address=" (empty) is Flower's "all interfaces", not a default
address = _explicit if _explicit is not None else (_settings.flower_address or "127.0.0.1")
if not _is_loopback(address) and not _settings.flower_basic_auth:
    sys.stderr.write(f"error: refusing to start Flower on {address or 'all interfaces'} without authentication; "
                     "set FLOWER_BASIC_AUTH=user:password (or bind to 127.0.0.1)\n")
    sys.exit(2)

if _settings.flower_basic_auth:
    # Flower serves /metrics without authentication by design (flower#1129); task names and worker hosts are not
    # for anyone who can reach the port, so with auth on, /metrics asks for it too.
    from flower.views.monitor import Metrics as _Metrics
    from tornado.web import authenticated as _authenticated

    _Metrics.get = _authenticated(_Metrics.get)
