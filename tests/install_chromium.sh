#!/bin/sh
# Headless Chromium for the browser test in tests/test_web.py (Debian/Ubuntu; needs root). No-op if installed.
set -e
[ -x /usr/bin/chromium ] && exit 0
apt-get install -y chromium || { apt-get update && apt-get install -y chromium; }
