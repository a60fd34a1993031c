#!/usr/bin/env bash
# The main job on the embedded default model: set up, export SmolLM2-135M-Instruct, generate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT=${PREFIXPORT_EXPORT:-exports/smollm2-135m-instruct}
if [ -f "$OUT/prefixport.json" ]; then
  echo "using the existing export in $OUT (delete it to export again)"
else
  prefixport export "$OUT"
fi
prefixport generate "$OUT" "Write a haiku about the sea." --max-new-tokens 64
prefixport generate "$OUT" "def fibonacci(n):" --raw --max-new-tokens 64
