#!/usr/bin/env python3
"""The PyTorch side of tools/peer/cpu_train.sh: a PCH training step of learn-kern on the CPU against the same
step in PyTorch float32 eager.

    cpu_train.py data   --out DIR [--items 1000] [--users 120] [--d-content 512]
    cpu_train.py init   --out FILE --d-content D [--small]
    cpu_train.py check
    cpu_train.py ours   --log FILE --steps N --rep R --load L --results FILE [--warmup 2]
    cpu_train.py peer   --init FILE --content DIR --sequences FILE --steps N --results FILE --rep R [--warmup 2]
    cpu_train.py report --results FILE [--json]

`data` writes a content store of random unit f16 rows (embeddings.npy, ids.txt, meta.json: what learn-kern's
ContentStore reads) and a sequences file whose users all have >= 80 history items and >= 40 targets. `init`
writes a BERT-initialised checkpoint (SPEC §3.3) that both sides start from (learn-kern through --init), so
their losses can be compared step by step. `check` holds the dense loss below to the term-by-term reference
of tools/golden/make_loss_fixtures.py. `peer` trains with the official LEARN module structure
(tools/pch_torch.py: adaptor -> BertEncoder under the causal mask -> head -> F.normalize, the item tower the
same module over the targets), the SPEC §4.2 loss with false-negative masking, Adam and the SPEC §4.3
schedule, on the batches `learn-kern train --no-shuffle` takes, 2 threads; each step (batch gathering
included, as in learn-kern's elapsed_s) is timed. `ours` reads learn-kern's train.log.jsonl. `report` prints
the median step times after the warm-up steps, the ratio of steps/s ours/peer and the verdict against 0.7x,
and fails when the two sides' losses disagree.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file

TOOLS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TOOLS)
sys.path.insert(0, os.path.join(TOOLS, "golden"))
from make_train_fixtures import lr_at  # noqa: E402  (the SPEC §4.3 schedule the fixtures follow)
from pch_torch import Pch  # noqa: E402  (tools/pch_torch.py)

TARGET_RATIO = 0.7
LOSS_RTOL = 1e-3  # f32 on both sides, different summation orders, a few Adam steps apart at most
# SPEC §3 pch-base, and the quicker --small shape.
BASE = {"d_model": 768, "n_layers": 12, "n_heads": 12, "d_ff": 3072, "d_out": 64}
SMALL = {"d_model": 256, "n_layers": 4, "n_heads": 4, "d_ff": 1024, "d_out": 64}


def make_data(args):
    rng = np.random.default_rng(args.seed)
    rows = rng.standard_normal((args.items, args.d_content))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    store = os.path.join(args.out, "content")
    os.makedirs(store, exist_ok=True)
    np.save(os.path.join(store, "embeddings.npy"), rows.astype(np.float16))
    ids = [f"item-{i:05d}" for i in range(args.items)]
    with open(os.path.join(store, "ids.txt"), "w") as fh:
        fh.write("\n".join(ids) + "\n")
    meta = {"dim": args.d_content, "dtype": "f16", "pooling": "mean", "normalized": True, "count": args.items,
            "model": "random unit rows", "tool": "tools/peer/cpu_train.py"}
    with open(os.path.join(store, "meta.json"), "w") as fh:
        json.dump(meta, fh, indent=2)
    with open(os.path.join(args.out, "sequences.jsonl"), "w") as fh:
        for u in range(args.users):
            history = rng.choice(args.items, int(rng.integers(80, 101)), replace=False)
            targets = rng.choice(args.items, int(rng.integers(40, 51)))
            fh.write(json.dumps({"user": f"user-{u:04d}", "history": [ids[i] for i in history],
                                 "targets": [ids[i] for i in targets]}) + "\n")
    print(f"{args.items} items of {args.d_content} dims, {args.users} users → {args.out}")


def pch_config(d_content, small):
    shape = SMALL if small else BASE
    return {"d_content": d_content, **shape, "ln_eps": 1e-12, "positions": "none", "input": "content",
            "dropout": 0.0, "item_tower": "causal"}


def make_init(args):
    cfg = pch_config(args.d_content, args.small)
    pch = Pch(cfg)
    pch.init_bert(torch.Generator().manual_seed(args.seed))
    tensors = {name: t.contiguous() for name, t in pch.tensors().items()}
    save_file(tensors, args.out, metadata={"config": json.dumps(cfg)})
    print(f"PCH {cfg} → {args.out}")


def infonce(users, items, hist_len, tgt_len, ids, tau, keep_false_negatives=False):
    """SPEC §4.2 (every history position) with the whole [B·H, B·T] score matrix; returns (loss, pairs).

    users [B, H, d], items [B, T, d]; ids [B, T] item ids (or store rows) of the targets."""
    b, h, d = users.shape
    t = items.shape[1]
    hist_valid = torch.arange(h)[None, :] < torch.as_tensor(hist_len)[:, None]  # [B, H]
    tgt_valid = torch.arange(t)[None, :] < torch.as_tensor(tgt_len)[:, None]  # [B, T]
    ids = torch.as_tensor(ids)
    # own[i, z, k]: target k of user z is among user i's own (valid) targets.
    own = ((ids[None, :, :, None] == ids[:, None, None, :]) & tgt_valid[:, None, None, :]).any(-1)
    allowed = (torch.arange(b)[:, None, None] != torch.arange(b)[None, :, None]) & tgt_valid[None]
    if not keep_false_negatives:
        allowed &= ~own
    scores = (users.reshape(b * h, d) @ items.reshape(b * t, d).T / tau).view(b, h, b * t)
    negatives = torch.logsumexp(scores.masked_fill(~allowed.view(b, 1, b * t), -math.inf), dim=-1)  # [B, H]
    positives = torch.einsum("bhd,btd->bht", users, items) / tau
    valid = hist_valid[:, :, None] & tgt_valid[:, None, :]
    # A row without negatives has N = -inf and costs exactly 0.
    terms = torch.logaddexp(negatives[:, :, None], positives) - positives
    return terms[valid].mean(), int(valid.sum())


def check(_args):
    """The dense loss against the term-by-term reference, in float64: loss, pair count and both gradients."""
    import make_loss_fixtures as ref  # tools/golden/make_loss_fixtures.py

    cases = ref.peer_check_cases()
    for c in cases:
        users = torch.tensor(c["users"], dtype=torch.float64).view(c["b"], c["h"], c["d"]).requires_grad_()
        items = torch.tensor(c["items"], dtype=torch.float64).view(c["b"], c["t"], c["d"]).requires_grad_()
        ids = torch.tensor(c["target_ids"]).view(c["b"], c["t"])
        loss, pairs = infonce(users, items, c["hist_len"], c["tgt_len"], ids, c["tau"], c["keep_false_negatives"])
        loss.backward()
        errors = {
            "loss": abs(loss.item() - c["loss"]) / abs(c["loss"]),
            "d_users": rel(users.grad, c["d_users"]),
            "d_items": rel(items.grad, c["d_items"]),
        }
        if pairs != c["pairs"] or not all(e < 1e-10 for e in errors.values()):
            sys.exit(f"infonce case {c['name']}: pairs {pairs} vs {c['pairs']}, relative errors {errors}")
    print(f"dense InfoNCE matches the term-by-term reference on {len(cases)} cases")


def rel(got, want):
    want = torch.tensor(want, dtype=torch.float64)
    return float((got.flatten() - want).norm() / want.norm().clamp_min(1e-300))


def load_sequences(path, row_of, history, targets):
    users = []
    with open(path) as fh:
        for line in fh:
            if line.strip():
                u = json.loads(line)
                users.append(([row_of[i] for i in u["history"]][-history:],
                              [row_of[i] for i in u["targets"]][:targets]))
    return users


def gather(store, lists):
    """Right-padded content [B, L, d_content] (f16 rows as f32), lengths, and the rows [B, L]."""
    length = max(len(x) for x in lists)
    rows = np.zeros((len(lists), length), dtype=np.int64)
    for b, x in enumerate(lists):
        rows[b, : len(x)] = x
    content = torch.from_numpy(store[rows].astype(np.float32))
    return content, [len(x) for x in lists], torch.from_numpy(rows)


def run_peer(args):
    load = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    tensors = load_file(args.init)
    with open(args.init, "rb") as fh:  # the config sits in the safetensors header's metadata
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    cfg = json.loads(header["__metadata__"]["config"])
    pch = Pch(cfg, attn=args.attn)
    pch.load(tensors)
    store = np.load(os.path.join(args.content, "embeddings.npy"))
    with open(os.path.join(args.content, "ids.txt")) as fh:
        row_of = {line.rstrip("\n"): r for r, line in enumerate(fh)}
    users = load_sequences(args.sequences, row_of, args.history, args.targets)
    params = list(pch.parameters())
    adam = torch.optim.Adam(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    per_epoch = math.ceil(len(users) / args.batch_users)
    steps = []
    for s in range(args.steps):
        started = time.perf_counter()
        b = s % per_epoch  # --no-shuffle: batch b is users b·B..(b+1)·B−1, epoch after epoch
        chosen = users[b * args.batch_users: (b + 1) * args.batch_users]
        hist, hist_len, _ = gather(store, [u[0] for u in chosen])
        tgt, tgt_len, tgt_rows = gather(store, [u[1] for u in chosen])
        u = pch(hist, hist_len, "causal")
        v = pch(tgt, tgt_len, "causal")
        loss, pairs = infonce(u, v, hist_len, tgt_len, tgt_rows, args.tau)
        adam.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        lr = lr_at(s, args.lr, args.steps, args.warmup_frac)
        for group in adam.param_groups:
            group["lr"] = lr
        adam.step()
        steps.append({"step": s + 1, "loss": loss.item(), "grad_norm": grad_norm.item(), "pairs": pairs,
                      "seconds": time.perf_counter() - started})
    append(args.results, "peer", args.rep, load, args.warmup, steps, {"threads": torch.get_num_threads(),
                                                                      "attn": args.attn, "config": cfg})


def record_ours(args):
    """learn-kern's steps from train.log.jsonl: a step's time is the difference of consecutive elapsed_s."""
    with open(args.log) as fh:
        lines = [json.loads(line) for line in fh if line.strip()]
    if [line["step"] for line in lines] != list(range(1, args.steps + 1)):
        sys.exit(f"{args.log}: expected steps 1..{args.steps} of one fresh run, found {len(lines)} lines")
    steps, previous = [], 0.0
    for line in lines:
        steps.append({"step": line["step"], "loss": line["loss"], "grad_norm": line["grad_norm"],
                      "pairs": line["pairs"], "seconds": line["elapsed_s"] - previous})
        previous = line["elapsed_s"]
    append(args.results, "ours", args.rep, args.load, args.warmup, steps, {})


def append(path, side, rep, load, warmup, steps, extra):
    if len(steps) <= warmup:
        sys.exit(f"{side}: {len(steps)} steps, but {warmup} are warm-up: run more --steps")
    record = {"side": side, "rep": rep, "load_avg": load, "warmup": warmup, "steps": steps, **extra}
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def summarise(records, side):
    rows = [r for r in records if r["side"] == side]
    if not rows:
        sys.exit(f"no '{side}' figures in the results")
    timed = [s["seconds"] for r in rows for s in r["steps"][r["warmup"]:]]
    median = statistics.median(timed)
    return {"reps": len(rows), "median_step_s": median, "steps_per_s": 1 / median,
            "rep_medians_s": [round(statistics.median(s["seconds"] for s in r["steps"][r["warmup"]:]), 3)
                              for r in rows],
            "load_avg": [round(r["load_avg"], 2) for r in rows]}


def agreement(records):
    """Largest relative difference of the per-step losses, and of the first step's gradient norm, between
    every run of either side (the runs are deterministic in what they compute)."""
    runs = [r["steps"] for r in records]
    first = runs[0]
    loss = max(abs(s["loss"] - f["loss"]) / abs(f["loss"]) for run in runs for s, f in zip(run, first))
    norm = max(abs(run[0]["grad_norm"] - first[0]["grad_norm"]) / first[0]["grad_norm"] for run in runs)
    pairs = {s["pairs"] for run in runs for s in run[:1]}
    return loss, norm, pairs


def report(args):
    with open(args.results) as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    ours, peer = summarise(records, "ours"), summarise(records, "peer")
    loss_diff, norm_diff, pairs = agreement(records)
    ratio = ours["steps_per_s"] / peer["steps_per_s"]
    config = next(r["config"] for r in records if r["side"] == "peer")
    result = {
        "benchmark": "cpu_train", "config": config, "ours": ours, "peer": peer, "ratio": ratio,
        "target": TARGET_RATIO, "pass": ratio >= TARGET_RATIO, "max_loss_rel_diff": loss_diff,
        "step1_grad_norm_rel_diff": norm_diff, "torch": torch.__version__,
        "attn": next(r["attn"] for r in records if r["side"] == "peer"),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{'':36} {'s/step':>8} {'steps/s':>8}  per-run medians (s)")
        for name, s in [("learn-kern train (cpu, 2 threads)", ours), (f"PyTorch f32 eager ({result['attn']})", peer)]:
            print(f"{name:36} {s['median_step_s']:8.3f} {s['steps_per_s']:8.3f}  {s['rep_medians_s']}")
        print(f"ratio ours/peer {ratio:.2f}x (target >= {TARGET_RATIO}x): {'PASS' if result['pass'] else 'FAIL'}; "
              f"losses agree within {loss_diff:.1e}, step-1 grad norm within {norm_diff:.1e} (relative); "
              f"load average at start: ours {ours['load_avg']}, peer {peer['load_avg']}")
    if len(pairs) != 1 or not loss_diff <= LOSS_RTOL or not norm_diff <= LOSS_RTOL:
        sys.exit(f"the two sides disagree: losses differ by {loss_diff:.2e}, step-1 grad norms by {norm_diff:.2e} "
                 f"(relative, limit {LOSS_RTOL}), pair counts {sorted(pairs)}: they do not compute the same step")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("data")
    p.add_argument("--out", required=True)
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--users", type=int, default=120)
    p.add_argument("--d-content", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("init")
    p.add_argument("--out", required=True)
    p.add_argument("--d-content", type=int, default=512)
    p.add_argument("--small", action="store_true", help="d_model 256, 4 layers, 4 heads, d_ff 1024")
    p.add_argument("--seed", type=int, default=0)
    sub.add_parser("check")
    p = sub.add_parser("ours")
    p.add_argument("--log", required=True, help="learn-kern's train.log.jsonl")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--rep", type=int, required=True)
    p.add_argument("--load", type=float, required=True, help="1-minute load average when it started")
    p.add_argument("--results", required=True)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    p = sub.add_parser("peer")
    for flag in ("--init", "--content", "--sequences", "--results"):
        p.add_argument(flag, required=True)
    p.add_argument("--rep", type=int, default=1)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    p.add_argument("--batch-users", type=int, default=30)
    p.add_argument("--history", type=int, default=80)
    p.add_argument("--targets", type=int, default=40)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup-frac", type=float, default=0.1)
    p.add_argument("--tau", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attn", choices=["eager", "sdpa"], default="eager", help="BertEncoder's attention")
    p = sub.add_parser("report")
    p.add_argument("--results", required=True)
    p.add_argument("--json", action="store_true")
    args = parser.parse_args()
    commands = {"data": make_data, "init": make_init, "check": check, "ours": record_ours, "peer": run_peer,
                "report": report}
    commands[args.command](args)


if __name__ == "__main__":
    main()
