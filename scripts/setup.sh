#!/usr/bin/env bash
# Set up everything the service and its tests need, idempotently:
#   Java 17+ (TorchServe's frontend); .venv (training, tests, benchmarks)
#   and .venv-serve (the TorchServe runtime), each with its pinned packages.
# Re-running is cheap: packages are reinstalled only when a requirements file changed.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "[setup] $*" >&2; }

java_major() {
  command -v java >/dev/null 2>&1 || { echo 0; return; }
  java -version 2>&1 | sed -nE 's/.*version "([0-9]+).*/\1/p' | head -n1
}

apt_install() {
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

missing=()
# TorchServe's frontend.
[ "$(java_major)" -ge 17 ] || missing+=(openjdk-17-jre-headless)
# The page's tests (tests/test_web.py) drive a real headless Chromium: Debian's, as Playwright's own
# browser download may be unreachable.
[ -x /usr/bin/chromium ] || missing+=(chromium)
# The local rolling-update test puts HAProxy in front of three replicas (tests/test_rolling_update.py).
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt_install "${missing[@]}"
fi
log "java $(java_major)"

PYTHON="${PYTHON:-python3}"

# install_venv DIR REQUIREMENTS [PIP ARGS...]: create DIR if absent, install REQUIREMENTS into it
# when they changed since the last successful install (a stamp file holds their hash).
install_venv() {
  local dir=$1 requirements=$2; shift 2
  if [ ! -x "$dir/bin/python" ]; then
    log "creating $dir with $($PYTHON --version)"
    "$PYTHON" -m venv "$dir" || return 1
  fi
  local stamp="$dir/.requirements.sha256" want
  want=$(sha256sum "$requirements" | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  log "installing $requirements into $dir (torch is large: a minute or two)"
  # Explicit returns: errexit does not apply inside a function called as an if condition.
  "$dir/bin/python" -m pip install -q --disable-pip-version-check -r "$requirements" "$@" || return 1
  echo "$want" > "$stamp"
}

# Training, tests and benchmarks, with this project installed in it (editable: entry points import
# handlers/, imagerec/, training/ and benchmarks/ from the checkout).
install_venv .venv requirements.txt
installed_root=$(cd / && "$OLDPWD/.venv/bin/python" -c "import imagerec.paths as p; print(p.PROJECT_ROOT)" 2>/dev/null || true)
if [ "$installed_root" != "$(pwd -P)" ]; then
  log "installing the project into .venv (editable)"
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
fi
# The TorchServe runtime (see requirements-serve.txt for why it is a second environment). The CPU
# build of torch is not on PyPI: this machine has it on local disk; elsewhere it comes from
# PyTorch's CPU index, tried only when the plain install fails.
if ! install_venv .venv-serve requirements-serve.txt; then
  log "torch CPU build not found locally: trying https://download.pytorch.org/whl/cpu"
  install_venv .venv-serve requirements-serve.txt --extra-index-url https://download.pytorch.org/whl/cpu
fi
log "ready: $(.venv/bin/python -c 'import torch, ts; print("tools: torch", torch.__version__, "torchserve", ts.__version__)')"
log "ready: $(.venv-serve/bin/python -c 'import torch, ts; print("serving: torch", torch.__version__, "torchserve", ts.__version__)')"
