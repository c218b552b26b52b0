#!/usr/bin/env bash
# The GPU check, in two halves, for a machine with an NVIDIA GPU that cannot build Rust.
#
#   scripts/gpu-check.sh build   here, with the CUDA toolkit (or its Python wheels, see README
#                                "GPU"): builds the CUDA xtask and the GPU tests and packs
#                                them into target/gpu-check/binaries.tar.gz (21 MB; carry
#                                target/gpu-check to the GPU machine)
#   scripts/gpu-check.sh run     on the GPU machine, from the repository root: runs the GPU
#                                tests, the GPU-against-CPU bench, generation and a short
#                                training run on both devices; writes everything to
#                                ${OUT:-target/gpu-check/out}/
#
# CUDA_COMPUTE_CAP picks the GPU generation the kernels are built for (default 90: Hopper,
# H100/H200; 80 for A100, 89 for Ada). Build with a toolkit no newer than the GPU machine's
# driver: candle's kernels travel as PTX of the build's CUDA version. The 13.0 wheels (README
# "GPU") make PTX that every CUDA 13 driver loads; the run's log prints both versions.
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
        for lib in cudart cublas cublasLt curand nvrtc; do
            local found
            found=$(ls "$CUDA_ROOT"/lib/lib$lib.so.* 2>/dev/null | head -1 || true)
            if [ -n "$found" ] && [ ! -e "$CUDA_ROOT/lib/lib$lib.so" ]; then
                mkdir -p "$stubs" && ln -sf "$found" "$stubs/lib$lib.so"
            fi
        done
        export LIBRARY_PATH="$stubs:$CUDA_ROOT/lib:${LIBRARY_PATH:-}"
    fi
    # Everything the GPU machine runs, packed small enough to travel (the binaries compress
    # to about a third): the CUDA xtask, the two crates' test binaries, and the Essen tunes
    # for the training comparison.
    local staging="$CARRY/staging"
    rm -rf "$CARRY" && mkdir -p "$staging"
    cargo build --profile xtask -p xtask --features cuda
    # candle's kernels travel as PTX of this nvcc's version, which a driver older than it refuses.
    nvcc --version | grep -o 'release [0-9.]*' >"$staging/nvcc-version"
    cp "${CARGO_TARGET_DIR:-target}/xtask/xtask" "$staging/xtask"
    for package in antiphon-model antiphon-train; do
        cargo test --profile xtask -p "$package" --features cuda --lib --no-run --message-format=json |
            grep -o '"executable":"[^"]*"' | cut -d'"' -f4 |
            while read -r binary; do cp "$binary" "$staging/tests-$package"; done
    done
    strip "$staging"/xtask "$staging"/tests-*
    local essen="${SHARED:-../shared}/corpus/essen"
    [ -d "$essen" ] && cp -r "$essen" "$staging/essen"
    tar czf "$CARRY/binaries.tar.gz" -C "$staging" .
    rm -rf "$staging"
    du -sh "$CARRY/binaries.tar.gz"
}

run() {
    local out="${OUT:-$CARRY/out}"
    mkdir -p "$out"
    # The carried binaries, unpacked where there is room.
    local bin
    bin=$(mktemp -d)
    tar xzf "$CARRY/binaries.tar.gz" -C "$bin"
    # cuBLAS and cuRAND come with the toolkit (or its wheels); the driver brings libcuda.
    local dirs="${CUDA_HOME:-/usr/local/cuda}/lib64:${CUDA_ROOT:-/usr/local/cuda}/lib64"
    for lib in libcublas.so.13 libcurand.so.10; do
        local found
        found=$(find /usr /opt /lib /lib64 /root /home -name "$lib" 2>/dev/null | head -1 || true)
        [ -n "$found" ] && dirs="$dirs:$(dirname "$found")"
    done
    export LD_LIBRARY_PATH="$dirs:${LD_LIBRARY_PATH:-}"
    {
        # Every part runs even when one before it fails; the log says which failed.
        set +e
        nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || true
        echo "kernels built by nvcc $(cat "$bin/nvcc-version" 2>/dev/null); the driver takes" \
            "$(nvidia-smi 2>/dev/null | grep -o 'CUDA Version: [0-9.]*' || echo 'an unknown CUDA version')"
        ldd "$bin/xtask" | grep -E "cuda|cublas|curand" || true
        echo "== GPU tests"
        "$bin/tests-antiphon-model" --test-threads 1 gpu
        "$bin/tests-antiphon-train" --test-threads 1 gpu
        echo "== bench: GPU against CPU (and TensorFlow's recipe where this Python has it)"
        local tensorflow=()
        if python3 -c "import tensorflow" 2>/dev/null; then
            tensorflow=(--tensorflow "$(command -v python3)")
        fi
        timeout 240 "$bin/xtask" bench --device cuda --gen-trials 5 --train-batches 10 ${tensorflow[@]+"${tensorflow[@]}"}
        echo "== generation from the built-in model, the same primer and seed on each device"
        local primer="62 _ 64 _ 66 _ 67 _ 69 _ _ _ 67 _ 66 _"
        for device in cuda cpu; do
            "$bin/xtask" generate --device "$device" --primer "$primer" --bars 8 --no-end --seed 3 \
                --out "$out/generated-$device.mid"
        done
        # The CPU's int8 step and the GPU's f32 step differ in the last digits, where a draw
        # near a boundary may go the other way: the files match often, not always.
        if cmp -s "$out/generated-cuda.mid" "$out/generated-cpu.mid"; then
            echo "the two devices wrote the same notes"
        else
            echo "the two devices wrote different notes"
        fi
        # Each part has a time limit, so one slow part leaves the rest their turn.
        echo "== training: the same run on each device (time and validation loss per epoch)"
        local data=tests/data/abc
        [ -d "$bin/essen" ] && data="essen=$bin/essen"
        for device in cuda cpu; do
            local started=$SECONDS
            timeout 120 "$bin/xtask" train --device "$device" --data "$data" \
                --out "$out/trained-$device" --epochs 2 --seed 1 --no-memory
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
