#!/usr/bin/env bash
# Idempotently create a separate virtualenv holding Label Studio 1.23.2 for e2e tests.
# LS pins its own Django stack, so it must never share the project venv.
#   LS_VENV   target venv (default: $REPO/.cache/ls-venv)
#   PYTHON    interpreter used to create it (default: python3.11, else python3)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LS_VENV="${LS_VENV:-$REPO/.cache/ls-venv}"
LS_VERSION="${LS_VERSION:-1.23.2}"

if [[ -x "$LS_VENV/bin/label-studio" ]]; then
  echo "label-studio already installed in $LS_VENV"
  exit 0
fi

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if command -v python3.11 >/dev/null 2>&1; then PY=python3.11; else PY=python3; fi
fi

start=$(date +%s)
mkdir -p "$(dirname "$LS_VENV")"
if [[ ! -x "$LS_VENV/bin/python" ]]; then
  "$PY" -m venv "$LS_VENV"
fi
"$LS_VENV/bin/python" -m pip install --quiet --upgrade pip
"$LS_VENV/bin/python" -m pip install "label-studio==${LS_VERSION}"
test -x "$LS_VENV/bin/label-studio"
echo "label-studio ${LS_VERSION} installed in $LS_VENV in $(( $(date +%s) - start )) s"
