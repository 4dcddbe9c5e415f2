#!/usr/bin/env bash
# The recipe benchmark on one GPU machine: one process per (set, seed) sharing the GPU (SmolLM2-135M leaves an
# H200 mostly idle; a process alone is bound by Python), each writing its results as soon as it finishes; after
# $LIMIT seconds whatever finished is merged into $OUT/$LABEL/ (results.json, table.md) with the logs in
# $OUT/logs.tgz. Needs the feature caches of a CPU run of the same sets and seeds under .cache/bench_recipes
# (the head's sentence encoder need not be installed then) and the base model (BASE_MODEL, MODEL_DIR).
#   FLAGS="--slm-features --base --adapter" SEEDS="0 1 2" LIMIT=540 OUT=/tmp/out bash bench/recipes_device.sh
set -u
OUT=${OUT:-/tmp/recipes-out}
LIMIT=${LIMIT:-540}
LABEL=${LABEL:-gpu}
SEEDS=${SEEDS:-0 1 2}
SETS=${SETS:-usr summeval lewidi:HS-Brexit lewidi:MD-Agreement lewidi:ConvAbuse lewidi:ArMIS goemotions}
FLAGS=${FLAGS:---slm-features --base --adapter}
PARTS=${PARTS:-/tmp/recipes-parts}
ADAPTER_PARTS=${ADAPTER_PARTS:-}  # e.g. "usr-0 usr-1": only these (set-seed) parts also get --adapter
export MODEL_DIR=${MODEL_DIR:-/tmp/model_dir} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" "$PARTS" "$PARTS/logs"
start=$(date +%s)
# Convert the GGUF to the safetensors cache once, before the processes race for it.
python3 -c "from slm_annotator.settings import load_settings as l; from slm_annotator.model.loader import resolve_base as r; \
s = l(); print(r(s.base_model, s.model_dir))" || exit 1
for name in $SETS; do
  for seed in $SEEDS; do
    part="${name//:/-}-$seed"
    if [ -f "$PARTS/$part/results.json" ] && grep -q '"finished"' "$PARTS/$part/results.json"; then continue; fi
    flags=$FLAGS
    case " $ADAPTER_PARTS " in *" $part "*) flags="$FLAGS --adapter" ;; esac
    # shellcheck disable=SC2086
    timeout "$((LIMIT - $(date +%s) + start))" python3 -m bench.bench_recipes --sets "$name" --seeds "$seed" $flags \
      --threads 1 --label "$part" --out-root "$PARTS" > "$PARTS/logs/$part.log" 2>&1 &
  done
done
wait
folders=$(ls -d "$PARTS"/*/ 2>/dev/null | grep -v /logs/)
# shellcheck disable=SC2086
python3 -m bench.bench_recipes --merge $folders --label "$LABEL" --out-root "$OUT"
tar czf "$OUT/logs.tgz" -C "$PARTS" .
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$OUT/gpu.txt" 2>&1 || true
