#!/usr/bin/env bash
# Install what the tests need, then run them all (the real default model included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
