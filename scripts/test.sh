#!/usr/bin/env bash
# Install the hub with its test dependencies into .venv, make sure the local PostgreSQL,
# Redis and RabbitMQ are up (starting the ones that are installed but stopped), lint,
# then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "test.sh: Python 3.11 or newer is required ($PYTHON is $("$PYTHON" --version 2>&1))" >&2
  exit 2
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip 2>/dev/null || true
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'

reachable() { .venv/bin/python - "$1" "$2" <<'PY'
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
except OSError:
    sys.exit(1)
PY
}

wait_for() {  # name host port seconds
  local i
  for ((i = 0; i < $4 * 2; i++)); do
    reachable "$2" "$3" && return 0
    sleep 0.5
  done
  echo "test.sh: $1 did not come up on $2:$3" >&2
  return 1
}

start_if_down() {  # name host port seconds command...
  local name=$1 host=$2 port=$3 secs=$4
  shift 4
  reachable "$host" "$port" && return 0
  if command -v "$1" >/dev/null 2>&1; then
    echo "test.sh: starting $name" >&2
    "$@" >/dev/null 2>&1 || true
    wait_for "$name" "$host" "$port" "$secs" || true
  else
    echo "test.sh: $name is not installed here; tests that need it will fail under CI=true" >&2
  fi
}

start_if_down PostgreSQL 127.0.0.1 5432 30 \
  sh -c 'pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start'
start_if_down Redis 127.0.0.1 6379 15 \
  sh -c 'mkdir -p /var/lib/redis /var/log/redis; redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log'
start_if_down RabbitMQ 127.0.0.1 5672 90 rabbitmq-server -detached

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

.venv/bin/ruff check --quiet .
scripts/install-browser.sh  # Chromium + chromedriver for tests/e2e (never fails the run)
.venv/bin/python -m pytest "$@"
