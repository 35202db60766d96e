#!/usr/bin/env bash
# Embedded inference on an NVIDIA GPU: build `pipeline --features cuda` on a machine without one,
# then run the main job's infer stage on the GPU machine and print what it measured.
#
#   bench/gpu.sh build     here: CUDA 13.0 toolkit from PyPI wheels, release build (~40 min cold),
#                          then bench/gpu/ holds the xz-compressed binary and the model in parts
#   bench/gpu.sh run       on the GPU machine, from the repository root with bench/gpu/ present:
#                          unpacks, runs select.toml's stages on `device = "cuda"` twice from an
#                          empty store (answers must be identical) and prints tokens/s and latency
#
# The device tool carries at most 64 MiB per call: carry bench/gpu/pipeline.xz in one call and the
# model parts in the next ones (the machine keeps files while warm), then call `run`.
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/gpu
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
model=SmolLM2-135M-Instruct.Q4_1.gguf

build() {
  local cuda="${CUDA_HOME:-$HOME/.cache/pipeline-cuda13}"
  if [ ! -x "$cuda/bin/nvcc" ]; then
    echo "assembling a CUDA 13.0 toolkit from PyPI wheels into $cuda" >&2
    local wheels="$cuda.wheels"
    python3 -m pip install -q --target "$wheels" \
      'nvidia-cuda-nvcc==13.0.*' 'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-crt==13.0.*' 'nvidia-nvvm==13.0.*' \
      'nvidia-cuda-cccl==13.0.*' 'nvidia-cublas==13.*' 'nvidia-curand==10.*' 'nvidia-cuda-nvrtc==13.0.*'
    mkdir -p "$cuda/bin" "$cuda/include" "$cuda/lib64/stubs"
    # The wheels spread one toolkit over nvidia/*/{bin,include,lib,nvvm}: merge them as symlinks.
    for d in "$wheels"/nvidia/*/ "$wheels"/nvidia/*/*/; do
      [ -d "$d/bin" ] && cp -rsf "$(realpath "$d/bin")"/. "$cuda/bin/"
      [ -d "$d/include" ] && cp -rsf "$(realpath "$d/include")"/. "$cuda/include/"
      [ -d "$d/lib" ] && cp -rsf "$(realpath "$d/lib")"/. "$cuda/lib64/"
      [ -d "$d/nvvm" ] && cp -rsf "$(realpath "$d/nvvm")" "$cuda/"
    done
    chmod +x "$cuda"/bin/* 2>/dev/null || true
    # Unversioned names for the linker.
    for so in "$cuda"/lib64/lib*.so.*; do
      base="${so%%.so.*}.so"
      [ -e "$base" ] || ln -s "$(basename "$so")" "$base"
    done
    # The wheels ship no libcuda (the driver provides it): a stub defining every driver API entry
    # point of cuda.h, with the driver's soname, is enough to link.
    grep -oE '^CUresult CUDAAPI (cu[A-Za-z0-9_]+)\(' "$cuda/include/cuda.h" | sed -E 's/.* (cu[A-Za-z0-9_]+)\(/\1/' | sort -u |
      awk '{ print "int " $1 "(void) { return 999; }" }' > "$cuda/lib64/stubs/stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda/lib64/stubs/libcuda.so" "$cuda/lib64/stubs/stub.c"
  fi
  export CUDA_HOME="$cuda" CUDA_PATH="$cuda" CUDA_COMPUTE_CAP=90 PATH="$cuda/bin:$PATH"
  export LIBRARY_PATH="$cuda/lib64:$cuda/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
  # .cargo/config.toml targets x86-64-v3, which the GPU hosts' CPUs run.
  CARGO_TARGET_DIR="$HOME/.cache/pipeline-target-cuda" cargo build --release --locked --features cuda
  mkdir -p "$out"
  xz -T0 -6 -c "$HOME/.cache/pipeline-target-cuda/release/pipeline" > "$out/pipeline.xz"
  local gguf="${PIPELINE_MODEL_CACHE:-$HOME/.cache/pipeline/models}/$sha/$model"
  [ -f "$gguf" ] || { echo "run the main job once first: $gguf is missing" >&2; exit 1; }
  split -b 40M -d "$gguf" "$out/model.part."
  ls -l "$out" >&2
}

run() {
  local lib=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib
  export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  local bin=/tmp/pipeline-cuda
  xz -dc "$out/pipeline.xz" > "$bin" && chmod +x "$bin"
  export PIPELINE_MODEL_CACHE=/tmp/pipeline-models
  mkdir -p "$PIPELINE_MODEL_CACHE/$sha"
  cat "$out"/model.part.* > "$PIPELINE_MODEL_CACHE/$sha/$model"
  echo "$sha  $PIPELINE_MODEL_CACHE/$sha/$model" | sha256sum -c -
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  local work=/tmp/pipeline-gpu-run
  rm -rf "$work" && mkdir -p "$work" && cp -r pipelines catalogs "$work/"
  sed -i 's/^prepare = "q8_0"$/device = "cuda"/' "$work/pipelines/select.toml"
  grep -q '^device = "cuda"' "$work/pipelines/select.toml"
  for attempt in 1 2; do
    rm -rf "$work/pipelines/.pipeline"
    /usr/bin/time -f "run $attempt: %e s wall" "$bin" run "$work/pipelines/select.toml" >&2
    "$bin" show "$work/pipelines/select.toml" answers > "/tmp/answers-$attempt.json"
  done
  python3 - <<'EOF'
import json
a, b = (json.load(open(f"/tmp/answers-{i}.json")) for i in (1, 2))
for model, m in a["models"].items():
    t = m["timing"]
    texts = [x["text"] for x in m["answers"]]
    same = texts == [x["text"] for x in b["models"][model]["answers"]]
    print(f"{model}: {len(texts)} answers, decode {t['decode_tokens_per_s']:.1f} tok/s, "
          f"p50 {t['latency_p50_ms']:.0f} ms, p95 {t['latency_p95_ms']:.0f} ms, identical on rerun: {same}")
EOF
}

case "${1:-}" in
  build) build ;;
  run) run ;;
  *) echo "usage: bench/gpu.sh build|run" >&2; exit 2 ;;
esac
