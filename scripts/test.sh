#!/usr/bin/env bash
# Install what the tests need, then run them all (the real default model included) on two workers:
# the real default model's tests on one (it exports and loads the model once), each other test file
# whole on either (tests/conftest.py). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup --no-loadscope-reorder "$@"
