#!/usr/bin/env bash
# Set up everything the service and its tests need, idempotently:
#   Java 17+ (TorchServe's frontend), a Python virtual environment in .venv, pinned packages.
# Re-running is cheap: packages are reinstalled only when requirements.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "[setup] $*" >&2; }

java_major() {
  command -v java >/dev/null 2>&1 || { echo 0; return; }
  java -version 2>&1 | sed -nE 's/.*version "([0-9]+).*/\1/p' | head -n1
}

if [ "$(java_major)" -lt 17 ]; then
  log "Java 17+ not found: installing openjdk-17-jre-headless"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q openjdk-17-jre-headless
fi
log "java $(java_major)"

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi

stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log "installing requirements.txt (torch is large: a minute or two)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
  echo "$want" > "$stamp"
fi
log "ready: $(.venv/bin/python -c 'import torch, ts; print("torch", torch.__version__, "torchserve", ts.__version__)')"
