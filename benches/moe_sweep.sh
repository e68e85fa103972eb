#!/bin/bash
# Mixtral-shaped expert budget sweep (issue 6 item 7).
# Usage: WEIR=target/release/weir MODEL=DIR OUT=DIR benches/moe_sweep.sh  (one JSON per run in OUT,
# the commands and errors in OUT/sweep.log). Make the model with
# `weir synth --shape mixtral-4l --dtype bf16 --out DIR` (12.1 GB).
W=${WEIR:-target/release/weir}; M=${MODEL:-/tmp/models/mixtral-4l}; O=${OUT:-/tmp/moe-sweep}; mkdir -p $O
run() { name=$1; shift; echo "== $name $*" >> $O/sweep.log; $W bench --model $M --threads 2 --prompt-len 16 --gen-len 16 "$@" --json > $O/$name.json 2>>$O/sweep.log; echo "rc $?" >> $O/sweep.log; }
for b in 1 16; do
  run b$b-100 --batch $b
  run b$b-50 --batch $b --expert-budget 50%
  run b$b-50-nocache --batch $b --expert-budget 50% --no-expert-cache
  run b$b-25 --batch $b --expert-budget 25%
  run b$b-25-noprefetch --batch $b --expert-budget 25% --no-expert-prefetch
  run b$b-25-nocache --batch $b --expert-budget 25% --no-expert-cache
done
echo done >> $O/sweep.log
