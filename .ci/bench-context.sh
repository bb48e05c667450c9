#!/usr/bin/env bash
# Decode speed at long context, two scalpel binaries interleaved in the
# same minutes (the cache-copying engine before, the preallocated one after):
#   .ci/bench-context.sh OLD_BINARY NEW_BINARY [ROUNDS]
# Each run: `generate` with a prompt of the first N characters of the
# held-out text (512 / 2k / 7.6k tokens), 64 new tokens, greedy, quantized
# decode; prints prompt tokens and decode tok/s per run.
set -euo pipefail
old=$1 new=$2 rounds=${3:-3}
text=$(dirname "$0")/../assets/gpl-3.txt
for chars in 2300 9300 35149; do
  prompt=$(head -c "$chars" "$text")
  for r in $(seq "$rounds"); do
    for bin in "$old" "$new"; do
      out=$("$bin" generate --prompt "$prompt" -n 64 --ignore-eos --json 2>/dev/null)
      python3 -c "import json,sys; d=json.loads(sys.argv[1]); print(sys.argv[2], d['prompt_tokens'], round(d['decode_tokens_per_sec'],1), round(d['prefill_tokens_per_sec'],1))" "$out" "$(basename "$bin")"
    done
  done
done
