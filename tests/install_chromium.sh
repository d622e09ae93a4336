#!/bin/sh
# The system Chromium that Playwright drives in the browser tests of tests/test_web.py (`make browser`;
# Debian/Ubuntu, as root). A no-op when /usr/bin/chromium exists; the tests skip without it.
set -e
[ -x /usr/bin/chromium ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "installing Chromium needs root: sudo make browser (or sudo sh tests/install_chromium.sh)" >&2
    exit 1
fi
apt-get install -y chromium || { apt-get update && apt-get install -y chromium; }
