#!/usr/bin/env python3
"""Greedy decode speed of llama.cpp (llama-cpp-python) on the README's prompt,
for comparison with `scalpel generate --json`: prefill the prompt, then 64
single-token steps, 2 threads. Usage: llama-decode.py MODEL.gguf [--flash-attn]"""
import json
import sys
import time

from llama_cpp import Llama

PROMPT = "The old lighthouse keeper climbed the stairs every evening, and"
STEPS = 64

model = Llama(model_path=sys.argv[1], n_ctx=512, n_threads=2, n_batch=512,
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
print(json.dumps({"prefill_tokens_per_sec": len(ids) / (t1 - t0),
                  "decode_tokens_per_sec": STEPS / (t2 - t1)}))
