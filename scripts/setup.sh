#!/usr/bin/env bash
# Install what kvlink needs to run on a fresh Debian/Ubuntu machine:
#  - a Vulkan driver: Mesa's lavapipe (CPU) when no GPU driver is installed;
#  - Debian's redis-server, which the tests of `kvlink serve --store redis://` start on
#    loopback themselves (it is not left running: the package's service is stopped);
#  - the default model, SmolLM2-135M-Instruct GGUF, into the cache directory.
set -euo pipefail
cd "$(dirname "$0")/.."
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
have_vulkan_icd() {
  for d in /usr/share/vulkan/icd.d /etc/vulkan/icd.d; do
    ls "$d"/*.json >/dev/null 2>&1 && return 0
  done
  return 1
}
if ! have_vulkan_icd; then
  echo "setup: no Vulkan driver found; installing Mesa's lavapipe (mesa-vulkan-drivers)"
  export DEBIAN_FRONTEND=noninteractive
  sudo_ apt-get update -qq
  sudo_ apt-get install -y -qq mesa-vulkan-drivers >/dev/null
fi
if ! command -v pip >/dev/null 2>&1 && ! python3 -m pip --version >/dev/null 2>&1; then
  echo "setup: installing pip to fetch the model"
  export DEBIAN_FRONTEND=noninteractive
  sudo_ apt-get update -qq
  sudo_ apt-get install -y -qq python3-pip >/dev/null
fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "setup: installing redis-server (for the shared cache tier's tests)"
  export DEBIAN_FRONTEND=noninteractive
  sudo_ apt-get update -qq
  sudo_ apt-get install -y -qq redis-server >/dev/null
  # The tests run their own; do not leave the package's instance on port 6379.
  if command -v systemctl >/dev/null 2>&1; then sudo_ systemctl disable --now redis-server >/dev/null 2>&1 || true; fi
fi
scripts/fetch-model.sh
scripts/fetch-test-tokenizers.sh
