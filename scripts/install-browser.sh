#!/usr/bin/env bash
# Install headless Chromium and its WebDriver from the machine's package sources (Debian's
# `chromium` and `chromium-driver`) for the admin page's browser test
# (tests/e2e/test_admin_page.py). Idempotent: returns at once when both are installed.
#
# Never fails the caller: when apt is unavailable or the install fails it says so and
# exits 0; the browser test then skips (or fails under CI=true) with the reason.
set -uo pipefail

CHROMIUM=/usr/bin/chromium
DRIVER=/usr/bin/chromedriver
PACKAGES=(chromium chromium-driver)

if [ -x "$CHROMIUM" ] && [ -x "$DRIVER" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-browser.sh: apt-get not found; the browser test will not run" >&2
  exit 0
fi
if [ "$(id -u)" != 0 ] && ! command -v sudo >/dev/null 2>&1; then
  echo "install-browser.sh: not root and no sudo; the browser test will not run" >&2
  exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo -n"

install() {
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
    "${PACKAGES[@]}" >/tmp/install-browser.log 2>&1
}

echo "install-browser.sh: installing ${PACKAGES[*]} (log: /tmp/install-browser.log)" >&2
# The package lists may be missing or stale (fresh machine): update once and retry.
if ! install; then
  $SUDO apt-get update -q >>/tmp/install-browser.log 2>&1 || true
  if ! install; then
    echo "install-browser.sh: installing ${PACKAGES[*]} failed; see /tmp/install-browser.log" >&2
    exit 0
  fi
fi
echo "install-browser.sh: $("$CHROMIUM" --version 2>/dev/null || echo chromium installed)" >&2
