#!/usr/bin/env bash
# memcli on a GPU, in one call of at most 9 minutes on a machine that reaches nothing (docs/gpu.md):
#   1. a venv over the image's torch (--system-site-packages), the carried wheels installed offline;
#   2. llama-cpp-python 0.3.36 built from the carried, trimmed sdist with CUDA for sm_90, in the background, while
#      memcli installs and the torch measurements run on the GPU:
#      - a MemFT training step in bf16 on `tiny` and on a random model of the paper's shape (Qwen3-8B; the weights
#        made on the GPU): answer tokens/s of memcli's step against a bare PEFT loop on the same batches;
#      - a random model of a smaller Qwen3 shape (1.7B; see docs/gpu.md for why), saved, a short adapter trained on
#        it, its F16 GGUF; transformers generate on 20 PhoneBook entries (the baseline);
#   3. once llama.cpp is built: on `tiny`, the verdicts with every layer offloaded against the CPU's (and torch's);
#      `memcli verify` with every layer offloaded on a 1,000- and a 10,000-entry PhoneBook.
# Every figure goes to $OUT/gpu_check.jsonl (appended as each phase ends) and $OUT/gpu_check.json (all phases by
# name), the output to $OUT/gpu_check.log and the end of the llama.cpp build's to $OUT/llama_build.log, so a run cut
# short still returns what it measured. A phase that would not fit in the time left is skipped and recorded so.
#
#   bash .ci/gpu_prepare.sh                 # first, on a machine with an index: the payload in .gpu-payload/
#   bash .ci/gpu_check.sh                   # on the GPU machine: offline, the payload beside it
#   bash .ci/gpu_check.sh --dry-run         # here, the project's venv active: the same steps on the CPU, small
#                                           # shapes (200- and 1,000-entry PhoneBooks), a CPU build of the sdist
# Settings (environment): OUT (default ./gpu-check), GPU_CHECK_WORK (scratch: venv, build, models; default
# /tmp/memcli-gpu-check), PAYLOAD (default ./.gpu-payload), GPU_CHECK_BUDGET_S (default 525 on the GPU, 7200 dry),
# GPU_CHECK_TRAIN_SHAPE (default qwen3-8b), GPU_CHECK_VERIFY_SHAPE (default qwen3-1.7b). Exit 0 when every phase
# that ran passed, 1 otherwise, 2 for bad usage.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
MODE=gpu
case "${1:-}" in
  --dry-run) MODE=dry-run ;;
  "") ;;
  -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
  *) echo "usage: bash .ci/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
export GPU_CHECK_MODE="$MODE"
export OUT="${OUT:-$REPO/gpu-check}"
export GPU_CHECK_WORK="${GPU_CHECK_WORK:-/tmp/memcli-gpu-check}"
WORK="$GPU_CHECK_WORK"
PAYLOAD="$(cd "${PAYLOAD:-$REPO/.gpu-payload}" 2>/dev/null && pwd)" \
  || { echo "no payload at ${PAYLOAD:-$REPO/.gpu-payload}: run bash .ci/gpu_prepare.sh first (docs/gpu.md)" >&2; exit 2; }
LLAMA_SDIST="$PAYLOAD/llama_cpp_python-0.3.36.tar.gz"
[ -f "$LLAMA_SDIST" ] || { echo "the payload has no $LLAMA_SDIST: run bash .ci/gpu_prepare.sh" >&2; exit 2; }
if [ "$MODE" = gpu ]; then
  BASE_PY="$(command -v python3)"   # the image's python3 holds torch
  DEVICE=cuda
  TRAIN_SHAPE="${GPU_CHECK_TRAIN_SHAPE:-qwen3-8b}"
  VERIFY_SHAPE="${GPU_CHECK_VERIFY_SHAPE:-qwen3-1.7b}"
  SMALL=1000 LARGE=10000
  BUDGET="${GPU_CHECK_BUDGET_S:-525}"
  # sm_90 only; the library alone (no mtmd); FlashAttention's vector kernels for an F16 KV cache alone (verify's
  # default); no fatbin compression, no NCCL (one GPU)
  LLAMA_CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA_QUANTS=f16-f16 \
-DGGML_CUDA_COMPRESSION_MODE=none -DGGML_CUDA_NCCL=OFF -DLLAVA_BUILD=OFF -DFETCHCONTENT_FULLY_DISCONNECTED=ON"
else
  [ -n "${VIRTUAL_ENV:-}" ] || { echo "--dry-run: activate the project's venv first" >&2; exit 2; }
  BASE_PY="$VIRTUAL_ENV/bin/python"
  DEVICE=cpu
  TRAIN_SHAPE="${GPU_CHECK_TRAIN_SHAPE:-qwen3-dry}"
  VERIFY_SHAPE="${GPU_CHECK_VERIFY_SHAPE:-qwen3-dry}"
  SMALL=200 LARGE=1000
  BUDGET="${GPU_CHECK_BUDGET_S:-7200}"
  LLAMA_CMAKE_ARGS="-DLLAVA_BUILD=OFF -DFETCHCONTENT_FULLY_DISCONNECTED=ON"
fi
JOBS="$(nproc)"
# nothing reaches for an index or a hub
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export MEMCLI_CACHE="$WORK/cache" PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
OUT="$(cd "$OUT" && pwd)"
rm -f "$OUT/gpu_check.jsonl" "$OUT/gpu_check.json" "$OUT/llama_build.log"
exec > >(tee "$OUT/gpu_check.log") 2>&1
TEE_PID=$!
trap 'exec 1>&- 2>&-; wait "$TEE_PID" 2>/dev/null' EXIT  # the log whole before the call returns
T0=$SECONDS
MEASURE="$REPO/.ci/gpu_measure.py"
M() { "${PY:-$BASE_PY}" "$MEASURE" "$@"; }
left() { echo $(( BUDGET - (SECONDS - T0) )); }
# Until llama-cpp-python is built, `import llama_cpp` fails in every phase, as on the bare device (the dry run's
# venv would otherwise see the project's llama_cpp through the outer venv).
NO_LLAMA="$WORK/no-llama-cpp"
mkdir -p "$NO_LLAMA/llama_cpp"
echo 'raise ImportError("llama_cpp is not built yet (.ci/gpu_check.sh builds it in the background)")' \
  > "$NO_LLAMA/llama_cpp/__init__.py"

# phase NAME NEED_S CMD...: run CMD within the time left, then add its wall time (and its failure) to NAME's record.
# Skipped, and recorded so, when less than NEED_S seconds are left.
phase() {
  local name=$1 need=$2 rem t rc
  shift 2
  rem=$(left)
  if (( rem < need )); then
    echo "== $name: skipped ($rem s left, needs about $need)"
    M record "$name" ok=null skipped='"time"' left_s="$rem" need_s="$need"
    return 1
  fi
  echo "== $name ($((SECONDS - T0)) s in, $rem s left)"
  t=$SECONDS
  timeout -k 10 "$rem" "$@"
  rc=$?
  if (( rc == 0 )); then
    M record "$name" wall_s=$((SECONDS - t))
  else
    M record "$name" ok=false rc=$rc wall_s=$((SECONDS - t))
  fi
  return $rc
}

# --- 1. the machine and the venv --------------------------------------------------------------------------------
phase env 5 "$BASE_PY" "$MEASURE" env
M record env budget_s="$BUDGET" jobs="$JOBS" cmake_args="\"$LLAMA_CMAKE_ARGS\"" train_shape="\"$TRAIN_SHAPE\"" \
  verify_shape="\"$VERIFY_SHAPE\"" entries="[$SMALL, $LARGE]"

make_venv() {
  rm -rf "$WORK/venv"
  # no pip of its own: the outer environment's, run by this venv's python (python -m pip), installs into this
  # venv (ensurepip, which some system pythons lack, only where the outer environment has no pip)
  "$BASE_PY" -m venv --system-site-packages --without-pip "$WORK/venv" || return 1
  # A venv made by a venv's python (the image's python3 is /opt/torch/.venv's) sees the base interpreter's
  # site-packages, not that venv's: add the outer venv's. On the GPU with site.addsitedir, which also runs the
  # image's .pth files; in the dry run as plain paths, so that the project's editable memcli (a .pth there) does
  # not shadow the memcli this check installs.
  local inner
  inner="$("$WORK/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"
  if [ "$MODE" = gpu ]; then
    "$BASE_PY" -c "import site; print(''.join(f'import site; site.addsitedir({d!r})\n' for d in site.getsitepackages()))"
  else
    "$BASE_PY" -c "import site; print('\n'.join(site.getsitepackages()))"
  fi > "$inner/_outer_site_packages.pth"
  "$WORK/venv/bin/python" -c "import pip" 2>/dev/null || "$WORK/venv/bin/python" -m ensurepip -q  # pip of its own
  # what the image has and the builds need (the dry run: pip install scikit-build-core nanobind in the project's venv)
  "$WORK/venv/bin/python" -c "import torch, transformers, peft, pip, scikit_build_core, nanobind
print('venv sees torch', torch.__version__)" || { echo "the venv lacks torch, transformers, peft, pip, scikit-build-core or nanobind" >&2; return 1; }
  command -v cmake && command -v ninja || { echo "cmake and ninja must be on PATH" >&2; return 1; }
}
export -f make_venv
export WORK BASE_PY MODE
phase venv 10 bash -c make_venv && M record venv ok=true python="\"$WORK/venv/bin/python\"" || { M summary; exit 1; }
# shellcheck disable=SC1091
. "$WORK/venv/bin/activate"
PY="$WORK/venv/bin/python"

install_wheels() {
  python -m pip install --no-index --find-links "$PAYLOAD/wheels" --report "$WORK/wheels.json" gguf diskcache matplotlib \
    && python -c "import gguf, diskcache, matplotlib" \
    && M record wheels ok=true installed="$(python -c "import json, sys; print(json.dumps(sorted(
         i['metadata']['name'] + '==' + i['metadata']['version'] for i in json.load(open(sys.argv[1]))['install'])))" \
         "$WORK/wheels.json")"
}
export -f install_wheels M
export PAYLOAD REPO PY MEASURE
phase wheels 20 bash -c install_wheels || { M summary; exit 1; }

# --- 2. llama.cpp's build in the background; memcli and the torch measurements meanwhile -----------------------
build_llama() {
  local stamp wheel
  stamp="$(sha256sum "$LLAMA_SDIST" | cut -c1-16) $LLAMA_CMAKE_ARGS"
  if [ "$(cat "$WORK/wheelhouse/STAMP" 2>/dev/null)" = "$stamp" ] && ls "$WORK"/wheelhouse/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "reusing the wheel built from the same sdist and CMAKE_ARGS in $WORK/wheelhouse" > "$WORK/llama_build.log"
    M record llama_build reused=true
  else
    rm -rf "$WORK/wheelhouse"
    M record llama_build reused=false
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
      python -m pip wheel -v --no-index --no-build-isolation --no-deps -w "$WORK/wheelhouse" "$LLAMA_SDIST" > "$WORK/llama_build.log" 2>&1 \
      || return 1
    echo "$stamp" > "$WORK/wheelhouse/STAMP"
  fi
  wheel="$(ls "$WORK"/wheelhouse/llama_cpp_python-*.whl)"
  python -m pip install --no-index --force-reinstall --no-deps "$wheel" >> "$WORK/llama_build.log" 2>&1 \
    && M record llama_build ok=true wheel_mib="$(( $(stat -c %s "$wheel") / 1048576 ))"
}
export -f build_llama
export LLAMA_SDIST LLAMA_CMAKE_ARGS JOBS
RESERVE=75  # kept for what needs llama.cpp: the offload check and the tiny verdicts at least
echo "== llama_build: in the background ($((SECONDS - T0)) s in; CMAKE_ARGS=$LLAMA_CMAKE_ARGS, $JOBS jobs)"
BUILD_START=$SECONDS
if [ "$MODE" = gpu ]; then
  timeout -k 10 $(( $(left) - RESERVE )) bash -c build_llama &
else
  timeout -k 10 $(( $(left) - RESERVE )) nice -n 5 bash -c build_llama &
fi
BUILD_PID=$!

export PYTHONPATH="$NO_LLAMA${PYTHONPATH:+:$PYTHONPATH}"
install_memcli() {
  CMAKE_BUILD_PARALLEL_LEVEL=4 python -m pip install --no-index --no-build-isolation --no-deps "$REPO" \
    && (cd "$WORK" && python -c "import sys, memcli, memcli.core.scoring; print('memcli from', memcli.__file__)
assert memcli.__file__.startswith(sys.prefix), 'not the memcli installed in the venv'") \
    && mkdir -p "$MEMCLI_CACHE/tokenizers" && cp -r "$PAYLOAD"/tokenizers/* "$MEMCLI_CACHE/tokenizers/" \
    && M record memcli_install ok=true tokenizers="$(cd "$PAYLOAD/tokenizers" && python -c "import json, os; print(json.dumps(sorted(os.listdir('.'))))")"
}
export -f install_memcli
phase memcli_install 120 bash -c install_memcli || { wait $BUILD_PID; M summary; exit 1; }
cd "$WORK" || exit 1

phase train_tiny 40 python "$MEASURE" train tiny --device "$DEVICE" --steps 20
phase train_shape 120 python "$MEASURE" train "$TRAIN_SHAPE" --device "$DEVICE" --steps 10

verify_model() {
  M make-model "$VERIFY_SHAPE" "$WORK/models/verify" --device "$DEVICE" \
    && memcli data phonebook --entries 64 --seed 0 --out "$WORK/pb-train.jsonl" \
    && local t=$SECONDS && memcli train "$WORK/pb-train.jsonl" --model "$WORK/models/verify" --out "$WORK/runs/verify" \
         --max-steps 2 --device "$DEVICE" --gguf require --force \
    && M record verify_model adapter_s=$((SECONDS - t)) && t=$SECONDS \
    && memcli export-base "$WORK/models/verify" --out "$WORK/models/verify.f16.gguf" --outtype f16 \
    && M record verify_model export_f16_s=$((SECONDS - t)) \
         f16_gguf_gib="$(python -c "import os, sys; print(round(os.path.getsize(sys.argv[1]) / 2**30, 2))" "$WORK/models/verify.f16.gguf")"
}
export -f verify_model
export VERIFY_SHAPE DEVICE
phase verify_model 150 bash -c verify_model
corpora() {
  memcli data phonebook --entries "$SMALL" --seed 1 --out "$WORK/pb-small.jsonl" \
    && memcli data phonebook --entries "$LARGE" --seed 2 --out "$WORK/pb-large.jsonl" \
    && memcli data phonebook --entries 16 --seed 3 --out "$WORK/pb-tiny.jsonl" \
    && M record corpora ok=true entries="[$SMALL, $LARGE, 16]"
}
export -f corpora
export SMALL LARGE
phase corpora 10 bash -c corpora
phase generate 60 python "$MEASURE" generate "$WORK/runs/verify" "$WORK/pb-small.jsonl" 20 --device "$DEVICE"
tiny_run() {  # 16 entries, one batch a step: some recalled, some not, for the verdicts to be compared
  memcli train "$WORK/pb-tiny.jsonl" --model tiny --out "$WORK/runs/tiny" --max-steps 50 --lr 0.02 \
    --device "$DEVICE" --force && M record tiny_run ok=true steps=50 \
    exact="$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['exact_match'])" "$WORK/runs/tiny/summary.json")"
}
export -f tiny_run
phase tiny_run 40 bash -c tiny_run

# --- 3. what needs llama.cpp ------------------------------------------------------------------------------------
echo "== waiting for llama_build ($((SECONDS - T0)) s in)"
wait $BUILD_PID
rc=$?
tail -n 300 "$WORK/llama_build.log" > "$OUT/llama_build.log" 2>/dev/null
M record llama_build seconds=$((SECONDS - BUILD_START)) rc=$rc
(( rc == 0 )) || { M record llama_build ok=false; M summary; exit 1; }
export PYTHONPATH="${PYTHONPATH#"$NO_LLAMA"}"
export PYTHONPATH="${PYTHONPATH#:}"

offload() {
  python -c "import llama_cpp; print(llama_cpp.llama_supports_gpu_offload())" > "$WORK/offload.txt" || return 1
  local got; got="$(cat "$WORK/offload.txt")"
  # the GPU build must offload; the dry run's CPU build must say it does not
  if [ "$MODE" = gpu ]; then want=True; else want=False; fi
  M record offload ok="$( [ "$got" = "$want" ] && echo true || echo false)" gpu_offload="$( [ "$got" = True ] && echo true || echo false)"
  [ "$got" = "$want" ]
}
export -f offload
export MODE
phase offload 10 bash -c offload

tiny_verdicts() {
  memcli verify "$WORK/pb-tiny.jsonl" --lora "$WORK/runs/tiny" --n-gpu-layers -1 --min-exact 0 --out "$WORK/v-tiny-gpu" \
    && memcli verify "$WORK/pb-tiny.jsonl" --lora "$WORK/runs/tiny" --n-gpu-layers 0 --min-exact 0 --out "$WORK/v-tiny-cpu" \
    && memcli verify "$WORK/pb-tiny.jsonl" --lora "$WORK/runs/tiny" --backend torch --device "$DEVICE" --min-exact 0 \
         --out "$WORK/v-tiny-torch" \
    && M verdicts tiny_verdicts "$WORK/v-tiny-gpu" "$WORK/v-tiny-cpu" "$WORK/v-tiny-torch"
}
export -f tiny_verdicts
phase tiny_verdicts 45 bash -c tiny_verdicts

verify_corpus() {  # PHASE CORPUS
  local t=$SECONDS
  memcli verify "$2" --lora "$WORK/runs/verify" --model "$WORK/models/verify.f16.gguf" --n-gpu-layers -1 \
    --min-exact 0 --out "$WORK/$1" \
    && M verify-report "$1" "$WORK/$1" --wall $((SECONDS - t))
}
export -f verify_corpus
phase verify_small 45 bash -c 'verify_corpus verify_small "$WORK/pb-small.jsonl"'
phase verify_large 60 bash -c 'verify_corpus verify_large "$WORK/pb-large.jsonl"'

GPU_CHECK_ELAPSED=$((SECONDS - T0)) M summary
python -c "import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))['phases']['summary']['ok'] else 1)" "$OUT/gpu_check.json"
