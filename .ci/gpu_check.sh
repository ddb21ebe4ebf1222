#!/usr/bin/env bash
# The first time a GPU is available: build llama-cpp-python (the pinned 0.3.36) with CUDA into the project's
# venv, check that llama.cpp offloads, then measure `memcli verify` with every layer offloaded against the CPU
# figures in the README (Measured / Verify at scale). One go, everything it prints also in $OUT (default
# ./gpu-check).
#
#   bash .ci/gpu_check.sh [ENTRIES]             # ENTRIES: PhoneBook size for the verify pass (default 1000)
#
# Needs: nvidia-smi and nvcc (CUDA toolkit) on PATH, the venv at .venv with memcli installed.
set -euo pipefail
cd "$(dirname "$0")/.."
ENTRIES="${1:-1000}"
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
. .venv/bin/activate
export MEMCLI_CACHE="${MEMCLI_CACHE:-$HOME/.cache/memcli}"

echo "== GPU"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
nvcc --version | tail -n 2

echo "== llama-cpp-python 0.3.36 with CUDA"
if ! python -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)" 2>/dev/null; then
  CMAKE_ARGS="-DGGML_CUDA=on" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" FORCE_CMAKE=1 \
    pip install --no-deps --force-reinstall --no-binary llama-cpp-python "llama-cpp-python==0.3.36"
fi
python -c "import llama_cpp; assert llama_cpp.llama_supports_gpu_offload(), 'llama.cpp built without GPU offload'; print('offload: yes')"
memcli doctor || true

echo "== corpora"
memcli data phonebook --entries "$ENTRIES" --seed 1 --out "$OUT/pb.jsonl"

echo "== a short adapter on the default model (the verdicts need one; speed does not depend on it)"
[ -d "$OUT/run" ] || memcli train "$OUT/pb.jsonl" --out "$OUT/run" --max-steps 20 --device cuda

echo "== memcli verify, every layer offloaded (default base: F16 of training's weights), then the shipped Q4_1"
memcli verify "$OUT/pb.jsonl" --lora "$OUT/run" --out "$OUT/verify-f16" --n-gpu-layers -1 --min-exact 0 --generate 20
memcli verify "$OUT/pb.jsonl" --lora "$OUT/run" --out "$OUT/verify-q4" --n-gpu-layers -1 --min-exact 0 --base shipped
memcli verify "$OUT/pb.jsonl" --lora "$OUT/run" --out "$OUT/verify-torch" --backend torch --device cuda --min-exact 0

echo "== memcli bench verify (offload is the default when llama.cpp has it)"
memcli bench verify "$OUT/pb.jsonl" --lora "$OUT/run" --baseline-entries 50 --out "$OUT/bench.json"

echo "== the chat-template shared prefix, offloaded"
memcli bench prefix --entries "$ENTRIES" --out "$OUT/prefix.json"

python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("verify-f16", "verify-q4", "verify-torch"):
    r = json.loads((out / name / "report.json").read_text())
    t = r["timings"]
    print(f"{name:>13}: {t['entries_per_s']} entries/s, exact {r['totals']['exact']}/{r['totals']['entries']}, "
          f"base {r['settings'].get('base', {}).get('kind')}, decode {t.get('decode_s')} s, pass {t['pass_s']} s")
PY
echo "done: $OUT"
