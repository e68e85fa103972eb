#!/usr/bin/env bash
# Phase splitting on loopback (BENCHMARKS.md, "Phase splitting"): the same model served
# colocated (one `weir serve`, both cores) and split (`weir route` over a prefill worker on core
# 0 and a decode worker on core 1, the KV cache streamed layer by layer, or in one transfer
# after prefill), each under the same scenario or load. Usage:
#
#   benches/split/run.sh MODEL_DIR OUT_DIR scenario [tbt_scenario.py flags…]
#   benches/split/run.sh MODEL_DIR OUT_DIR load [weir load flags…]
#
# Every server holds bf16 matrices as f16 and its KV cache in f16. The decode worker's
# /metrics after each split run says how long the KV transfers ran past their prefill.
set -euo pipefail
model=$1 out=$2 what=$3
shift 3
extra=("$@")
mkdir -p "$out"
weir=$(realpath "${WEIR:-./target/release/weir}")
here=$(dirname "$(realpath "$0")")
common=(--model "$model" --bf16-as-f16 --kv-dtype f16 --max-batch 8)
pids=()
stop() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
trap stop EXIT
up() { for _ in $(seq 600); do curl -sf "http://127.0.0.1:$1/health" > /dev/null && return; sleep 0.5; done; echo "port $1 did not come up" >&2; exit 1; }
measure() { # name url
  if [ "$what" = scenario ]; then
    echo "$1 $(python3 "$here/tbt_scenario.py" "$2" "${extra[@]}")" | tee -a "$out/scenario.txt"
  else
    "$weir" load --target "$1=$2" --json "$out/$1.json" "${extra[@]}" | tee "$out/$1.txt"
  fi
}
# CONFIGS: which to run (colocated-N: one server, passes of N tokens).
for config in ${CONFIGS:-colocated-512 colocated-128 split split-bulk}; do
  case $config in
    colocated-*)
      "$weir" serve "${common[@]}" --threads 2 --max-pass-tokens "${config#colocated-}" --port 18090 \
        > "$out/$config.log" 2>&1 & pids+=($!)
      up 18090
      measure "$config" http://127.0.0.1:18090 ;;
    split*)
      bulk=0; [ "$config" = split-bulk ] && bulk=1000000
      taskset -c 0 "$weir" serve "${common[@]}" --role prefill --threads 1 --max-pass-tokens 512 \
        --kv-bulk-below $bulk --port 18091 > "$out/$config-prefill.log" 2>&1 & pids+=($!)
      taskset -c 1 "$weir" serve "${common[@]}" --role decode --threads 1 --port 18092 \
        --kv-listen 127.0.0.1:18093 > "$out/$config-decode.log" 2>&1 & pids+=($!)
      up 18091; up 18092
      "$weir" route --prefill http://127.0.0.1:18091 --decode http://127.0.0.1:18092 --port 18090 \
        > "$out/$config-route.log" 2>&1 & pids+=($!)
      up 18090
      measure "$config" http://127.0.0.1:18090
      curl -s http://127.0.0.1:18092/metrics | grep -E "^weir_kv_(imports_total|exposed_seconds_total)" \
        | sed "s/^/$config decode: /" | tee -a "$out/exposed.txt"
      curl -s http://127.0.0.1:18090/health > /dev/null ;;
  esac
  stop
done
