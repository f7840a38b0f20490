#!/usr/bin/env python3
"""The PyTorch side of tools/peer/cpu_embed.sh: learn-kern embed on the CPU against transformers.LlamaModel.

    cpu_embed.py items  --model DIR --out FILE [--count 512] [--min-tokens 16] [--max-tokens 128]
    cpu_embed.py ours   --figures FILE --rep R --seconds S --load L --results FILE
    cpu_embed.py peer   --model DIR --items FILE --store DIR --results FILE --rep R [--batch-tokens 8192]
    cpu_embed.py report --results FILE [--json]

`items` writes a deterministic catalogue of product records whose `text` spans the token range evenly under
the model's tokenizer, and prints the distribution. `ours` records a learn-kern run that the shell timed.
`peer` embeds the items with LlamaModel in float32 (SPEC §2.2, the model built by tools/llama_torch.py):
texts tokenised with the same tokenizer.json, sorted by length, right-padded batches of at most
--batch-tokens padded slots, 2 threads, inference mode; it times the forward passes with mean-pooling and
normalisation after one warm-up batch, checks every embedding against learn-kern's store in --store (cosine
>= 0.999), and appends its figures to --results. `report` prints the medians of both sides, their ratio and
the verdict against 0.7x.
"""

import argparse
import json
import os
import random
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llama_torch import llama_model, padded_batches  # noqa: E402  (tools/llama_torch.py)

MIN_COSINE = 0.999
TARGET_RATIO = 0.7
LEARN_KERN_MAX_TOKENS = 500  # learn-kern embed's default --max-tokens

# Words for the generated records (written for this script).
CATEGORIES = ["Kitchen", "Electronics", "Books", "Outdoor", "Beauty", "Toys", "Garden", "Office", "Pets", "Music"]
BRANDS = ["Northwind", "Bluepeak", "Lumen & Co", "Harbor Goods", "Quietfield", "Redstone", "Oakline", "Sunmark"]
NOUNS = ["kettle", "lamp", "backpack", "notebook", "speaker", "blanket", "puzzle", "jacket", "bottle", "chair",
         "headphones", "planter", "leash", "guitar strings", "desk organiser", "tent", "serum", "board game"]
ADJECTIVES = ["compact", "waterproof", "lightweight", "handmade", "wireless", "organic", "durable", "foldable",
              "quiet", "vintage", "ergonomic", "recycled", "insulated", "adjustable", "portable", "soft"]
PHRASES = ["easy to clean", "ships in two days", "gift ready packaging", "fits in a carry-on bag",
           "two year warranty", "made from natural materials", "suitable for children over six",
           "works with most phones", "keeps drinks cold for a day", "assembled in minutes",
           "rated highly by customers", "available in five colours", "quiet enough for the office",
           "safe for the dishwasher", "uses standard batteries", "comes with a spare part"]


def tokenizer(model_dir):
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.enable_truncation(max_length=LEARN_KERN_MAX_TOKENS)
    return tok


def record_text(rng, max_tokens):
    """A product record as one text: title, category, price, then a description long enough for any goal."""
    phrases = [f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}, {rng.choice(PHRASES)}." for _ in range(max_tokens // 4)]
    return "\n".join([
        f"Title: {rng.choice(ADJECTIVES).capitalize()} {rng.choice(NOUNS)} by {rng.choice(BRANDS)}",
        f"Category: {rng.choice(CATEGORIES)}",
        f"Price: {rng.randint(3, 400)}.{rng.randint(0, 99):02d}",
        "Description: " + " ".join(phrases),
    ])


def make_items(args):
    """Item i aims at a token count drawn evenly from [min, max] and keeps the longest word prefix of its
    record within it, found by bisection (token counts grow with the number of words), or one word more
    where that prefix falls short of the minimum."""
    tok = tokenizer(args.model)
    rng = random.Random(args.seed)
    lengths, lines = [], []
    for i in range(args.count):
        goal = rng.randint(args.min_tokens, args.max_tokens)
        words = record_text(rng, args.max_tokens).split(" ")
        lo, hi = 1, len(words)
        while lo < hi:  # the most words whose text stays within the goal
            mid = (lo + hi + 1) // 2
            if len(tok.encode(" ".join(words[:mid])).ids) <= goal:
                lo = mid
            else:
                hi = mid - 1
        body = " ".join(words[:lo])
        n = len(tok.encode(body).ids)
        if n < args.min_tokens:
            body = " ".join(words[: lo + 1])
            n = len(tok.encode(body).ids)
        if not args.min_tokens <= n <= args.max_tokens:
            sys.exit(f"item {i}: {n} tokens, outside [{args.min_tokens}, {args.max_tokens}]; adjust the generator")
        lengths.append(n)
        lines.append(json.dumps({"id": f"item-{i:05d}", "text": body}, ensure_ascii=False))
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    edges = list(range(args.min_tokens, args.max_tokens, 16)) + [args.max_tokens + 1]
    counts = np.histogram(lengths, bins=edges)[0]
    bins = ", ".join(f"{a}-{b - 1}: {c}" for a, b, c in zip(edges, edges[1:], counts))
    print(f"{args.count} items, {sum(lengths)} tokens; tokens per item min {min(lengths)}, median "
          f"{statistics.median(lengths):g}, mean {statistics.mean(lengths):.1f}, max {max(lengths)}; "
          f"histogram {bins}")


def load_weights(model_dir):
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if not os.path.exists(index):
        return load_file(os.path.join(model_dir, "model.safetensors"))
    with open(index) as fh:
        files = sorted(set(json.load(fh)["weight_map"].values()))
    weights = {}
    for f in files:
        weights.update(load_file(os.path.join(model_dir, f)))
    return weights


def record_ours(args):
    """Appends learn-kern's run: the wall time measured around the process, its own figures beside it."""
    with open(args.figures) as fh:
        figures = json.load(fh)
    record = {"side": "ours", "rep": args.rep, "items": figures["items"], "tokens": figures["tokens"],
              "seconds": args.seconds, "job_seconds": figures["seconds"], "load_avg": args.load}
    with open(args.results, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def run_peer(args):
    load = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    with open(os.path.join(args.model, "config.json")) as fh:
        cfg = json.load(fh)
    model = llama_model(cfg, load_weights(args.model), torch.float32)
    tok = tokenizer(args.model)
    with open(args.items) as fh:
        items = [json.loads(line) for line in fh if line.strip()]
    ids = [tok.encode(item["text"]).ids for item in items]
    lengths = [len(x) for x in ids]
    batches = padded_batches(lengths, args.batch_tokens)
    tensors = []
    for batch in batches:
        width = max(lengths[i] for i in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for r, i in enumerate(batch):
            input_ids[r, : lengths[i]] = torch.tensor(ids[i])
            mask[r, : lengths[i]] = 1
        tensors.append((batch, input_ids, mask))

    out = torch.full((len(items), cfg["hidden_size"]), float("nan"))

    def embed(input_ids, mask):
        y = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(y.dtype)
        return F.normalize((y * m).sum(1) / m.sum(1), dim=-1, eps=1e-12)

    with torch.inference_mode():
        embed(*tensors[-1][1:])  # warm-up on the widest batch
        started = time.perf_counter()
        for batch, input_ids, mask in tensors:
            out[batch] = embed(input_ids, mask)
        seconds = time.perf_counter() - started

    store = np.load(os.path.join(args.store, "embeddings.npy")).astype(np.float32)
    with open(os.path.join(args.store, "ids.txt")) as fh:
        row = {line.rstrip("\n"): r for r, line in enumerate(fh)}
    ours = torch.from_numpy(store[[row[item["id"]] for item in items]])
    cosine = (F.normalize(ours, dim=-1) * out).sum(-1)
    worst = int(torch.argmin(torch.nan_to_num(cosine, nan=-2.0)))
    slots = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    record = {
        "side": "peer", "rep": args.rep, "items": len(items), "tokens": sum(lengths), "seconds": seconds,
        "batches": len(batches), "padded_slots": slots, "min_cosine": float(cosine[worst]),
        "load_avg": load, "threads": torch.get_num_threads(),
    }
    with open(args.results, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    if not cosine[worst] >= MIN_COSINE:
        sys.exit(f"{items[worst]['id']}: cosine {float(cosine[worst]):.6f} between learn-kern's store and "
                 f"LlamaModel, expected >= {MIN_COSINE}: the two sides do not compute the same embedding")


def summarise(records, side):
    rows = [r for r in records if r["side"] == side]
    if not rows:
        sys.exit(f"no '{side}' figures in the results")
    items_s = statistics.median(r["items"] / r["seconds"] for r in rows)
    tokens_s = statistics.median(r["tokens"] / r["seconds"] for r in rows)
    return {"reps": len(rows), "items_per_s": items_s, "tokens_per_s": tokens_s,
            "seconds": [round(r["seconds"], 3) for r in rows], "load_avg": [round(r["load_avg"], 2) for r in rows]}


def report(args):
    with open(args.results) as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    tokens = {r["tokens"] for r in records}
    if len(tokens) != 1:
        sys.exit(f"the two sides counted different token totals {sorted(tokens)}: they tokenise differently")
    ours, peer = summarise(records, "ours"), summarise(records, "peer")
    ratio = ours["items_per_s"] / peer["items_per_s"]
    result = {
        "benchmark": "cpu_embed", "items": records[0]["items"], "tokens": tokens.pop(), "ours": ours,
        "peer": peer, "ratio": ratio, "target": TARGET_RATIO, "pass": ratio >= TARGET_RATIO,
        "min_cosine": min(r["min_cosine"] for r in records if r["side"] == "peer"),
        "torch": torch.__version__,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    peer_runs = [r for r in records if r["side"] == "peer"]
    print(f"{result['items']} items, {result['tokens']} tokens; peer batches {peer_runs[0]['batches']}, "
          f"{result['tokens'] / peer_runs[0]['padded_slots']:.0%} of padded slots real")
    print(f"{'':34} {'items/s':>8} {'tokens/s':>8}  seconds per run")
    for name, s in [("learn-kern embed (whole process)", ours), ("LlamaModel f32 (forward only)", peer)]:
        print(f"{name:34} {s['items_per_s']:8.1f} {s['tokens_per_s']:8.0f}  {s['seconds']}")
    print(f"ratio ours/peer {ratio:.2f}x (target >= {TARGET_RATIO}x): {'PASS' if result['pass'] else 'FAIL'}; "
          f"min cosine {result['min_cosine']:.7f}; load average at start: ours {ours['load_avg']}, "
          f"peer {peer['load_avg']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("items")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=512)
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("ours")
    p.add_argument("--figures", required=True, help="learn-kern embed's --json output")
    p.add_argument("--rep", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True, help="wall time of the whole process")
    p.add_argument("--load", type=float, required=True, help="1-minute load average when it started")
    p.add_argument("--results", required=True)
    p = sub.add_parser("peer")
    for flag in ("--model", "--items", "--store", "--results"):
        p.add_argument(flag, required=True)
    p.add_argument("--rep", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-tokens", type=int, default=8192)
    p = sub.add_parser("report")
    p.add_argument("--results", required=True)
    p.add_argument("--json", action="store_true")
    args = parser.parse_args()
    {"items": make_items, "ours": record_ours, "peer": run_peer, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
