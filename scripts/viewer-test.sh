#!/usr/bin/env bash
# Headless test of the desktop viewer (`kvlink view`, cargo feature `viewer`) under Xvfb:
# installs Xvfb and the X11 client libraries winit loads at run time (plus lavapipe and
# the default model through scripts/setup.sh), then runs tests/viewer.rs, which drives
# the app (load the default model, add two documents, ask in compare mode), saves a
# screenshot and checks it. The screenshot path is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
scripts/setup.sh
# winit's X11 backend dlopens libX11, libX11-xcb, libxcursor, libxrandr, libxi and
# libxkbcommon-x11; Xvfb provides the display (xvfb-run comes with it).
need=()
command -v Xvfb >/dev/null 2>&1 || need+=(xvfb)
command -v xvfb-run >/dev/null 2>&1 || need+=(xvfb)
for lib in libX11.so.6:libx11-6 libX11-xcb.so.1:libx11-xcb1 libXcursor.so.1:libxcursor1 \
           libXrandr.so.2:libxrandr2 libXi.so.6:libxi6 libxkbcommon-x11.so.0:libxkbcommon-x11-0 \
           libxkbcommon.so.0:libxkbcommon0 libvulkan.so.1:libvulkan1; do
  if ! ldconfig -p | grep -q "${lib%%:*}"; then need+=("${lib##*:}"); fi
done
if [ ${#need[@]} -gt 0 ]; then
  echo "viewer-test: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  sudo_ apt-get update -qq
  sudo_ apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Xvfb is installed now: the test must run, not skip.
KVLINK_REQUIRE=xvfb cargo test --features viewer --test viewer -- --nocapture "$@"
