"""Python `sentencepiece` throughput on the 10,000 fixture strings, to set beside
`cargo test --release --test sentencepiece throughput -- --ignored --nocapture`.

    python3 tools/sp/bench_python.py
"""

import io
import json
import os
import time
import zipfile

import sentencepiece as spm

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "fixtures", "sp")
MODELS = ["small", "large", "large-ties", "defaults", "strip", "odd"]


def best_of(runs, f):
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    with zipfile.ZipFile(os.path.join(FIXTURES, "cases.zip")) as z:
        strings = [json.loads(line) for line in io.TextIOWrapper(z.open("strings.jsonl"), encoding="utf-8")]
    for name in MODELS:
        sp = spm.SentencePieceProcessor(model_file=os.path.join(FIXTURES, f"{name}.model"))
        one = best_of(5, lambda: [sp.encode(s) for s in strings])
        batch = best_of(5, lambda: sp.encode(strings, num_threads=os.cpu_count()))
        print(f"{name}: {len(strings) / one:,.0f} strings/s one call per string; "
              f"{len(strings) / batch:,.0f} strings/s as one batch on {os.cpu_count()} threads")


if __name__ == "__main__":
    main()
