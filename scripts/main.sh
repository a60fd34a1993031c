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
  prefixport export "$OUT" --lora  # --lora: the graph also takes LoRA and IA3 adapters, per row
fi
prefixport generate "$OUT" "Write a haiku about the sea." --max-new-tokens 64
prefixport generate "$OUT" "def fibonacci(n):" --raw --max-new-tokens 64
# The demo adapters (PEFT checkpoints trained by demo/train_adapters.py, committed under demo/):
# convert them, then base vs adapter side by side and accuracy on held-out examples.
# All were trained on raw prompts (no chat template): recorded, so generate and serve send them raw.
# json-lora and date-ia3 (LoRA, IA3) need an export made with --lora; an older export made without
# it gets the prompt and prefix adapters only.
DEMO="json-prompt date-prefix"
if python -c 'import json, sys; sys.exit(not json.load(open(sys.argv[1])).get("weight_adapters"))' \
    "$OUT/prefixport.json"; then
  DEMO="$DEMO json-lora date-ia3"
else
  echo "$OUT was exported without --lora: json-lora and date-ia3 skipped (delete it to export again)"
fi
for a in $DEMO; do
  prefixport adapter convert "demo/adapters/$a" --export "$OUT" --name "$a" --prompt-format raw
done
prefixport adapter inspect "$OUT/adapters/date-prefix.safetensors"
prefixport generate "$OUT" "Text: Maya is 27 and lives in Lima.
JSON:" --adapter json-prompt --max-new-tokens 40
python demo/evaluate.py "$OUT" --out "$OUT/demo_results.json"  # demo/results.json is the committed record
# Weight-only int8 (issue 6): the export prints its greedy agreement with the float graph; the
# same adapter bundles fit it (same base-model fingerprint).
Q="$OUT-int8"
[ -f "$Q/prefixport.json" ] || prefixport export "$Q" --quantize int8
for a in json-prompt date-prefix; do
  prefixport adapter convert "demo/adapters/$a" --export "$Q" --name "$a" --prompt-format raw
done
prefixport generate "$Q" "Write a haiku about the sea." --max-new-tokens 64
python demo/evaluate.py "$Q" --examples 0 --out "$Q/demo_results.json"
# A short benchmark (3 to 4 minutes on 2 cores): swap, memory, latency, throughput, floor; side by
# side with PEFT on PyTorch and with the naive way. Full run: drop --quick (docs/benchmarks.md).
prefixport bench "$OUT" --quick --peft demo/adapters/json-prompt --peft demo/adapters/date-prefix
echo
echo "Done: results in $OUT/demo_results.json and $OUT/bench/ (bench.md, bench.json, plots). Next:"
[ "$OUT" != exports/smollm2-135m-instruct ] ||
  echo "  the README's tour: its export is this one, made already; skip its first line (prefixport export)"
echo "  prefixport serve $OUT     # the OpenAI API on http://127.0.0.1:8000/v1 (docs/serving.md)"
echo "  prefixport generate $OUT 'Write a haiku about rain.' --max-new-tokens 48 [--adapter NAME]"
echo "  your own adapter: prefixport adapter convert PEFT_DIR --export $OUT (docs/adapters.md)"
