#!/usr/bin/env bash
# The first GPU session's work, ready to run (issue 7): the GPU tests, the copy benchmark, and
# the offloading benchmarks (a), (b), (c) of BENCHMARKS.md, on a lent H100/H200 machine.
#
# The device machine has no network and no Rust toolchain, so everything is built here and
# carried: `pack` builds the release test binaries and the CLI, strips them and copies them,
# with the fixtures, into .gpu/ (ignored by git, as is gpu-out/). Then each step is one device
# call that carries .gpu (the device tool's `carry: [".gpu"]`), each well inside 10 minutes:
#
#   benches/gpu_session.sh pack                      # here
#   bash benches/gpu_session.sh test                 # there: every test binary, GPU tests included
#   bash benches/gpu_session.sh copy                 # there: weir gpu copy
#   bash benches/gpu_session.sh offload              # there: synth Llama-3-8B shape, (a) (b) (c), trace of (b)
#   bash benches/gpu_session.sh moe                  # there: a Mixtral shape, experts on GPU/DRAM, with and without twins
#
# The test binaries have this checkout's paths compiled in (CARGO_MANIFEST_DIR), so on the
# device the script links them to where the copy is. Logs and JSON go to $OUT (or ./gpu-out).
#
# The sizes are those of BENCHMARKS.md; each can be set smaller to try the script where there
# is no GPU, on the tests' emulated CUDA device (what runs, not how fast), e.g.:
#
#   cargo test --release -p weir-kernels --lib emulated     # builds it in /tmp/weir-emulated-cuda-*
#   benches/gpu_session.sh pack
#   EMULATED=$(ls -td /tmp/weir-emulated-cuda-* | head -1) SHAPE=small GPU_MEMORY=30MB MEMORY_BUDGET=60MB \
#     BATCH=4 PROMPT=16 GEN=4 MOE_SHAPE=tiny-moe COPY_BYTES=8MiB bash benches/gpu_session.sh offload
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
step=${1:?usage: gpu_session.sh pack|test|copy|offload|moe}
out=${OUT:-$here/gpu-out}
mkdir -p "$out"

case $step in
pack)
    cd "$here"
    rm -rf .gpu && mkdir -p .gpu/tests .gpu/fixtures
    cargo build --release --bin weir
    # The test executables that hold GPU tests (the device tool carries 64 MiB at most).
    keep=" weir_kernels weir_runtime placement_gpu graph_show_runs cli_run "
    cargo test --release --workspace --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])' |
        while read -r name exe; do
            case $keep in *" $name "*) cp "$exe" ".gpu/tests/$name" ;; esac
        done
    cp target/release/weir .gpu/weir
    strip .gpu/weir .gpu/tests/*
    cp -r ../shared/fixtures/. .gpu/fixtures/
    echo "$here" >.gpu/built-at
    du -sh .gpu
    ls .gpu/tests
    ;;
test | copy | offload | moe)
    cd "$here"
    [ -d .gpu ] || { echo "no .gpu: run 'gpu_session.sh pack' here and carry .gpu" >&2; exit 1; }
    built=$(cat .gpu/built-at)
    # The paths compiled into the binaries: the checkout, its target/release/weir and the
    # fixtures beside it.
    if [ "$built" != "$here" ]; then
        mkdir -p "$(dirname "$built")"
        [ -e "$built" ] || ln -s "$here" "$built"
    fi
    mkdir -p "$here/target/release" "$(dirname "$built")/shared"
    cp .gpu/weir "$here/target/release/weir"
    [ -e "$(dirname "$built")/shared/fixtures" ] || ln -s "$here/.gpu/fixtures" "$(dirname "$built")/shared/fixtures"
    export WEIR_FIXTURES=$here/.gpu/fixtures
    # NVRTC and cuBLAS: the CUDA toolkit's, or the Python environment's wheels.
    for d in /usr/local/cuda/lib64 /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib \
        /opt/torch/.venv/lib/python3*/site-packages/nvidia/*/lib; do
        [ -d "$d" ] && LD_LIBRARY_PATH=$d:${LD_LIBRARY_PATH:-}
    done
    # The emulated device, to try the script without a GPU (see the top).
    if [ -n "${EMULATED:-}" ]; then
        LD_LIBRARY_PATH=$EMULATED:${LD_LIBRARY_PATH:-}
        export WEIR_CACHE_DIR=$EMULATED/ptx-cache WEIR_EMULATED_GPU=1
    fi
    export LD_LIBRARY_PATH
    weir=$here/target/release/weir
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt" || true
    ;;
*)
    echo "unknown step $step (pack, test, copy, offload, moe)" >&2
    exit 2
    ;;
esac

case $step in
test)
    status=0
    for t in .gpu/tests/*; do
        echo "== $(basename "$t")"
        "$t" --test-threads 4 2>&1 || status=1
    done | tee "$out/test.log"
    grep -c "skipped: no GPU" "$out/test.log" | sed 's/^/skipped for want of a GPU: /'
    exit $status
    ;;
copy)
    "$weir" gpu copy --bytes "${COPY_BYTES:-256MiB}" --rounds 20 --json | tee "$out/copy.json"
    ;;
offload)
    shape=${SHAPE:-llama3-8b}
    model=/tmp/weir-bench-$shape
    [ -d "$model" ] || "$weir" synth --shape "$shape" --dtype bf16 --seed 0 --out "$model"
    # Half the weights on the GPU, the other half held in DRAM (FlexGen's and Park et al.'s
    # setting; the memory budget covers the host pools — window, KV and activation reserves —
    # and the DRAM tier).
    common=(--model "$model" --gpu-memory "${GPU_MEMORY:-8GB}" --memory-budget "${MEMORY_BUDGET:-20GB}"
        --batch "${BATCH:-32}" --prompt-len "${PROMPT:-512}" --gen-len "${GEN:-32}" --json)
    "$weir" bench "${common[@]}" --graph examples/graphs/llama-gpu.weir | tee "$out/a.json"
    "$weir" bench "${common[@]}" --graph examples/graphs/llama-gpu-cpu-attention.weir --trace "$out/b.trace.json" | tee "$out/b.json"
    "$weir" bench "${common[@]}" --graph examples/graphs/llama-gpu.weir --prefetch 0 | tee "$out/c.json"
    "$weir" trace summary "$out/b.trace.json" | tee "$out/b.summary.txt"
    ;;
moe)
    # Mixtral-8x7B layers, 4 deep (12 GB of bf16): a quarter of the experts on the GPU, the rest
    # read into DRAM caches when chosen, then uploaded (a), or each pass uploaded or computed on
    # the CPU where the step finishes soonest (b: Fiddler's decision); batch 1 and 16.
    m=/tmp/weir-bench-${MOE_SHAPE:-mixtral-4l}
    [ -d "$m" ] || "$weir" synth --shape "${MOE_SHAPE:-mixtral-4l}" --dtype bf16 --seed 0 --out "$m"
    for batch in 1 16; do
        for twins in "" "--expert-twins host"; do
            echo "== batch $batch ${twins:-no twins}"
            # shellcheck disable=SC2086
            "$weir" bench --model $m --graph examples/graphs/mixtral-gpu.weir --batch $batch --prompt-len 16 \
                --gen-len 16 --expert-budget 25% $twins --json
        done
    done | tee "$out/moe.log"
    ;;
esac
