#!/usr/bin/env bash
# Install everything the tests need on a Debian machine, then run the whole suite.
#
#   bash tests/install-and-run.sh            # as root, or as a user with sudo
#   bash tests/install-and-run.sh -m "not browser and not external and not slow"   # extra pytest args
#
# Debian packages: chromium (browser tests), prometheus with promtool (metrics tests), GStreamer's
# RTSP server under Debian's python3 (rtsp upstream tests), ffmpeg (a real MJPEG camera),
# redis-server (cluster tests: a real Redis on a loopback port), faketime (a cluster node whose
# clock is off) and python3-venv. The tests fail, never skip, when one of these is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo); fi
apt_get() { "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "$@"; }

apt_get update -q
apt_get install -y -q chromium
apt_get install -y -q --no-install-recommends python3-venv prometheus ffmpeg redis-server faketime \
    python3-gi python3-gst-1.0 gir1.2-gst-rtsp-server-1.0 \
    gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly

python3 -m venv .venv
.venv/bin/pip install -q -e ".[test]"
exec .venv/bin/python -m pytest "$@"
