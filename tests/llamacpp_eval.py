"""Evaluates GGUF files with llama.cpp itself (llama-cpp-python), for the
export round-trip test. Same protocol as shared/peers/common.py: the given
token ids in windows of --window, each from an empty cache, position j
scored from logits[j-1]. With --time it also times one full-window prefill
and --decode greedy steps per model, interleaved and repeated, and reports
the best and median time of each (the benchmark .ci/bench-export-llamacpp;
the test asserts no speed).

Usage: python3 llamacpp_eval.py --ids ids.json --window 512 --out result.json \
           [--ppl pruned.gguf] [--time pruned.gguf base.gguf ...] [--repeats 7] [--decode 64]
"""
import argparse
import json
import math
import sys
import time

try:
    import numpy as np
    import llama_cpp
    from llama_cpp import Llama
except ImportError as e:  # the Rust test turns this into a clear failure
    print(f"MISSING llama-cpp-python: {e}", file=sys.stderr)
    sys.exit(3)

ap = argparse.ArgumentParser()
ap.add_argument("--ids", required=True)
ap.add_argument("--window", type=int, default=512)
ap.add_argument("--ppl")
ap.add_argument("--time", nargs="*", default=[])
ap.add_argument("--repeats", type=int, default=7)
ap.add_argument("--decode", type=int, default=0)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--out", required=True)
args = ap.parse_args()

with open(args.ids) as f:
    ids = json.load(f)["ids"]


def load(path):
    return Llama(model_path=path, n_ctx=args.window, n_batch=args.window, n_ubatch=args.window,
                 n_threads=args.threads, n_threads_batch=args.threads, logits_all=True,
                 seed=0, verbose=False)


res = {"llama_cpp_python": llama_cpp.__version__}
nll, scored, windows = 0.0, 0, 0
llm = load(args.ppl) if args.ppl else None
for s in range(0, len(ids), args.window) if llm else []:
    w = ids[s:s + args.window]
    if len(w) < 2:
        continue
    llm.reset()
    llm.eval(w)
    x = np.asarray(llm.scores[:len(w) - 1], dtype=np.float64)
    m = x.max(1)
    lse = m + np.log(np.exp(x - m[:, None]).sum(1))
    nll += float((lse - x[np.arange(len(w) - 1), np.array(w[1:])]).sum())
    scored += len(w) - 1
    windows += 1
if llm:
    res.update(ppl=math.exp(nll / scored), scored_tokens=scored, windows=windows)
    del llm

models = {p: load(p) for p in args.time}
first = ids[:args.window - args.decode]
prefill = {p: [] for p in args.time}
decode = {p: [] for p in args.time}
for _ in range(args.repeats):
    for p, m in models.items():  # interleaved, so load changes hit both alike
        m.reset()
        t0 = time.perf_counter()
        m.eval(first)
        prefill[p].append(time.perf_counter() - t0)
        if args.decode:
            t0 = time.perf_counter()
            for _ in range(args.decode):
                m.eval([int(np.argmax(m.scores[m.n_tokens - 1]))])
            decode[p].append(time.perf_counter() - t0)
if args.time:
    res["prefill_tokens"] = len(first)
    res["prefill_best_s"] = {p: min(t) for p, t in prefill.items()}
    res["prefill_median_s"] = {p: float(np.median(t)) for p, t in prefill.items()}
if args.decode:
    res["decode_tokens"] = args.decode
    res["decode_best_s"] = {p: min(t) for p, t in decode.items()}
    res["decode_median_s"] = {p: float(np.median(t)) for p, t in decode.items()}
with open(args.out, "w") as f:
    json.dump(res, f, indent=1)
print(json.dumps(res))
