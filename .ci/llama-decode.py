#!/usr/bin/env python3
"""Greedy decode speed of llama.cpp (llama-cpp-python) on the README's prompt,
for comparison with `scalpel generate --json`: prefill the prompt, then 64
single-token steps, 2 threads. Usage: llama-decode.py MODEL.gguf [--flash-attn] [--prefill N]
(--prefill N: also time one eval of the first N tokens of the held-out text, after a warm-up)"""
import json
import os
import sys
import time

from llama_cpp import Llama

PROMPT = "The old lighthouse keeper climbed the stairs every evening, and"
STEPS = 64

PREFILL = int(sys.argv[sys.argv.index("--prefill") + 1]) if "--prefill" in sys.argv else 0

model = Llama(model_path=sys.argv[1], n_ctx=max(512, PREFILL), n_threads=2,
              n_batch=max(512, PREFILL), n_threads_batch=2,
              flash_attn="--flash-attn" in sys.argv, verbose=False)
ids = model.tokenize(PROMPT.encode(), add_bos=False)
for _ in range(2):  # the first round warms up; the second is reported
    model.reset()
    t0 = time.perf_counter()
    model.eval(ids)
    t1 = time.perf_counter()
    for _ in range(STEPS):
        model.eval([int(model.scores[model.n_tokens - 1].argmax())])
    t2 = time.perf_counter()
result = {"prefill_tokens_per_sec": len(ids) / (t1 - t0),
          "decode_tokens_per_sec": STEPS / (t2 - t1)}
if PREFILL:
    text = open(os.path.join(os.path.dirname(__file__), "..", "assets", "gpl-3.txt")).read()
    long_ids = model.tokenize(text.encode(), add_bos=False)[:PREFILL]
    for _ in range(2):  # warm-up, then timed
        model.reset()
        t0 = time.perf_counter()
        model.eval(long_ids)
        t1 = time.perf_counter()
    result["prefill_long_tokens_per_sec"] = len(long_ids) / (t1 - t0)
print(json.dumps(result))
