#!/usr/bin/env bash
# The GPU check, in two halves, for a machine with an NVIDIA GPU that cannot build Rust.
#
#   scripts/gpu-check.sh build   here, with the CUDA toolkit (or its Python wheels, see README
#                                "GPU"): builds the CUDA xtask and the GPU tests into
#                                target/gpu-check/ (carry that folder to the GPU machine)
#   scripts/gpu-check.sh run     on the GPU machine, from the repository root: runs the GPU
#                                tests, the GPU-against-CPU bench, generation and a short
#                                training run on both devices; writes everything to
#                                ${OUT:-target/gpu-check/out}/
#
# CUDA_COMPUTE_CAP picks the GPU generation the kernels are built for (default 90: Hopper,
# H100/H200; 80 for A100, 89 for Ada).
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=target/gpu-check

build() {
    export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
    if ! command -v nvcc >/dev/null; then
        echo "gpu-check build: nvcc not found; put the CUDA toolkit's bin on PATH and set CUDA_ROOT" >&2
        exit 1
    fi
    # Linking needs libcuda.so, which only the driver installs. Where there is no driver, link
    # against a stub carrying the driver's soname: the real library answers at run time.
    local stubs="$PWD/target/cuda-stubs"
    if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\b' && [ ! -e "${CUDA_ROOT:-/nonexistent}/lib/libcuda.so" ]; then
        mkdir -p "$stubs"
        local header="${CUDA_ROOT:?set CUDA_ROOT to the toolkit}/include/cuda.h"
        # Every driver entry point cuda.h declares, as an empty function (never called: the
        # stub only satisfies the linker).
        grep -oE '\bcu[A-Z][A-Za-z0-9_]*\b' "$header" | sort -u |
            sed 's/.*/void &(void) {}/' >"$stubs/libcuda_stub.c"
        cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so" "$stubs/libcuda_stub.c"
        export LIBRARY_PATH="$stubs:${LIBRARY_PATH:-}"
    fi
    # The toolkit's libraries under the unversioned names the linker asks for.
    if [ -n "${CUDA_ROOT:-}" ]; then
        for lib in cublas cublasLt curand nvrtc; do
            local found
            found=$(ls "$CUDA_ROOT"/lib/lib$lib.so.* 2>/dev/null | head -1 || true)
            if [ -n "$found" ] && [ ! -e "$CUDA_ROOT/lib/lib$lib.so" ]; then
                mkdir -p "$stubs" && ln -sf "$found" "$stubs/lib$lib.so"
            fi
        done
        export LIBRARY_PATH="$stubs:$CUDA_ROOT/lib:${LIBRARY_PATH:-}"
    fi
    rm -rf "$CARRY" && mkdir -p "$CARRY"
    cargo build --release -p xtask --features cuda
    cp target/release/xtask "$CARRY/xtask"
    # The GPU tests (and every other test of the two crates) as binaries.
    for package in antiphon-model antiphon-train; do
        cargo test --release -p "$package" --features cuda --lib --no-run --message-format=json |
            grep -o '"executable":"[^"]*"' | cut -d'"' -f4 |
            while read -r binary; do cp "$binary" "$CARRY/tests-$package"; done
    done
    strip "$CARRY"/* 2>/dev/null || true
    du -sh "$CARRY"
}

run() {
    local out="${OUT:-$CARRY/out}"
    mkdir -p "$out"
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || true
        echo "== GPU tests"
        "$CARRY/tests-antiphon-model" --test-threads 1 gpu
        "$CARRY/tests-antiphon-train" --test-threads 1 gpu
        echo "== bench: GPU against CPU"
        "$CARRY/xtask" bench --device cuda --gen-trials 5 --train-batches 10
        echo "== generation from the built-in model, seed 3, on each device"
        "$CARRY/xtask" generate --device cuda --seed 3 --out "$out/generated-cuda.mid"
        "$CARRY/xtask" generate --device cpu --seed 3 --out "$out/generated-cpu.mid"
        echo "== training: the same short run on each device (time and validation loss per epoch)"
        for device in cuda cpu; do
            local started=$SECONDS
            "$CARRY/xtask" train --device "$device" --data tests/data/abc \
                --out "$out/trained-$device" --epochs 4 --seed 1 --no-memory
            echo "training on $device took $((SECONDS - started)) s"
        done
    } 2>&1 | tee "$out/gpu-check.log"
}

case "${1:-}" in
build) build ;;
run) run ;;
*)
    echo "usage: scripts/gpu-check.sh build|run" >&2
    exit 2
    ;;
esac
