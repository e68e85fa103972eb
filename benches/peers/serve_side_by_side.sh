#!/usr/bin/env bash
# weir serve and llama.cpp's llama-server on the same weights, loaded side by side by `weir load`
# (BENCHMARKS.md, "Serving under load"). Usage:
#
#   benches/peers/serve_side_by_side.sh MODEL_DIR LLAMA_CPP_DIR OUT_DIR [weir load flags…]
#
# MODEL_DIR: a bf16 Llama folder (`weir synth --shape tinyllama-1.1b --dtype bf16`); its F16
# GGUF is written beside OUT_DIR's files by benches/peers/llamacpp_peer.py unless there.
# LLAMA_CPP_DIR: llama.cpp's source with llama-server built, e.g. the llama-cpp-python 0.3.36
# source package's vendor/llama.cpp after
#   cmake -B build -DLLAMA_CURL=OFF && cmake --build build --target llama-server llama-bench
# Both servers get 2 threads and 8 sequences at once; weir holds the bf16 matrices as f16 and
# its KV cache in f16, as llama.cpp does.
set -euo pipefail
model=$1 lcpp=$2 out=$3
shift 3
mkdir -p "$out"
gguf="$out/model-f16.gguf"
[ -f "$gguf" ] || python3 "$(dirname "$0")/llamacpp_peer.py" convert "$model" "$gguf" --type f16
weir=${WEIR:-./target/release/weir}
"$lcpp/build/bin/llama-server" -m "$gguf" -t 2 -tb 2 -np 8 -c 8192 --no-repack \
  --host 127.0.0.1 --port 18081 > "$out/llama-server.log" 2>&1 &
lpid=$!
"$weir" serve --model "$model" --threads 2 --bf16-as-f16 --kv-dtype f16 --max-batch 8 \
  --port 18080 > "$out/weir-serve.log" 2>&1 &
wpid=$!
trap 'kill $lpid $wpid 2>/dev/null' EXIT
for port in 18080 18081; do
  for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$port/health" > /dev/null && break
    sleep 1
  done
done
"$weir" load --target weir=http://127.0.0.1:18080 --target llama.cpp=http://127.0.0.1:18081 \
  --json "$out/points.json" --svg "$out/load.svg" "$@" | tee "$out/table.txt"
