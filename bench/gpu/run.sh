#!/usr/bin/env bash
# The GPU truth run on the device machine (bench/gpu/README.md): install the carried wheels and the project
# (offline), then bench/gpu/measure.py, whose deadline counts from this script's start.
# Usage, from the repository root: bash bench/gpu/run.sh [WHEEL_FOLDER] [measure.py options...]
set -u
STARTED=$(date +%s)
WHEELS=${1:-.gpu-wheels}
shift $(( $# > 0 ? 1 : 0 ))
OUT=${OUT:-/tmp/icd-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
{
  echo "# pip install --no-index --no-deps $WHEELS/*.whl"
  python3 -m pip install -q --no-index --no-deps --no-cache-dir --no-compile "$WHEELS"/*.whl
  echo "rc=$?"
  echo "# pip install --no-index --no-deps --no-build-isolation -e ."
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir -e .
  echo "rc=$?"
  python3 -m pip list 2> /dev/null | grep -iE '^(torch|diffusers|transformers|pydantic|peft|onnxruntime|icd) '
} > "$OUT/install.log" 2>&1
python3 bench/gpu/measure.py --out "$OUT" --started "$STARTED" --install-log "$OUT/install.log" "$@" 2>&1 \
  | tee "$OUT/log.txt"
rc=${PIPESTATUS[0]}
python3 bench/gpu/table.py "$OUT/gpu.json" > "$OUT/table.md" 2>> "$OUT/log.txt"
exit "$rc"
