#!/usr/bin/env python3
"""Reference runs of `learn-kern train` and `eval` from PyTorch (float64), for tests/train_reference.rs.

Writes tests/fixtures/train/:
- store/ — a content store as SPEC §2.4 describes it (embeddings.npy float32 [40, 24] of random unit rows,
  ids.txt, meta.json), written with numpy;
- sequences.jsonl — 12 users, one with an empty history (skipped), histories of 2-9 items and targets of
  1-6 (longer than the H and T the runs use, so truncation matters), targets drawn from a small pool so
  that users of one batch share target items (false negatives), one user with a repeated target;
- gallery.txt — a gallery of 30 items for one eval case (some targets fall outside it), and
  gallery_targets.txt — only items that are someone's target, where K = 1 finds hits;
- init.safetensors, init_self.safetensors — one initial PCH model (SPEC §3.3 names, float32; the second
  with item_tower "self" in its config), built as the official LEARN code builds it (tools/pch_torch.py);
- trained.safetensors — that model after the first training case, rounded to float32, for eval;
- reference.json — per training case, the command-line flags and for each update the loss (before the
  update), the global gradient norm (before clipping), the learning rate, the users and the valid
  (i, j, k) pairs; per eval case the flags and the metrics; and the user and item embeddings of
  trained.safetensors (for `infer`).

The training loop follows SPEC §4 with `--no-shuffle`: batch b of an epoch is users b*B..(b+1)*B-1 of the
file after skipping, epochs cycle; the loss is Eq. 1 computed the plain way, from the whole score matrix
with log-sum-exp; Adam/AdamW and clipping are PyTorch's own. Everything runs in float64 from the float32
values the Rust side reads, so the reference carries no rounding of its own worth speaking of.

    python3 tools/golden/make_train_fixtures.py
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pch_torch import Pch  # noqa: E402

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "train"

N_ITEMS, D_CONTENT = 40, 24
CFG = {
    "d_content": D_CONTENT, "d_model": 16, "n_layers": 2, "n_heads": 4, "d_ff": 32, "d_out": 8,
    "ln_eps": 1e-12, "positions": "none", "input": "content", "dropout": 0.0, "item_tower": "causal",
}
# Scores of the eval rankings must be further apart than float32 rounding can move them (about 1e-6
# here), so that the engine's ranks equal these.
RANK_MARGIN = 1e-4


def make_store(rng):
    ids = [f"i{r}" for r in range(N_ITEMS)]
    x = rng.standard_normal((N_ITEMS, D_CONTENT))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    store = OUT / "store"
    store.mkdir(parents=True, exist_ok=True)
    np.save(store / "embeddings.npy", x)
    (store / "ids.txt").write_text("".join(f"{i}\n" for i in ids))
    meta = {"model": "random unit rows (tools/golden/make_train_fixtures.py)", "dim": D_CONTENT,
            "dtype": "float32", "pooling": "mean", "normalized": True, "count": N_ITEMS}
    (store / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return ids, torch.from_numpy(x.astype(np.float64))


def make_users(rng, ids):
    """(user, history rows, target rows) per line of the file; the empty history is line 5."""
    lines = []
    pool = rng.choice(N_ITEMS, 12, replace=False)  # popular items: targets collide across users
    for u in range(12):
        n_hist = 0 if u == 4 else int(rng.integers(2, 10))
        n_tgt = int(rng.integers(1, 7))
        history = rng.choice(N_ITEMS, n_hist, replace=False).tolist()
        targets = rng.choice(pool, n_tgt, replace=False).tolist()
        lines.append((f"u{u + 1}", history, targets))
    # A repeated target: two positives with one item id.
    name, history, targets = lines[2]
    lines[2] = (name, history, targets[:2] + [targets[0]] + targets[2:])
    text = "".join(json.dumps({"user": u, "history": [ids[r] for r in h], "targets": [ids[r] for r in t]}) + "\n"
                   for u, h, t in lines)
    (OUT / "sequences.jsonl").write_text(text)
    return [(u, h, t) for u, h, t in lines if h and t]


def pad(lists, content):
    """Right-padded content [B, L, d_content] (zeros past each list) and the lengths."""
    L = max(len(x) for x in lists)
    out = torch.zeros(len(lists), L, content.shape[1])
    for b, rows in enumerate(lists):
        out[b, : len(rows)] = content[rows]
    return out, [len(x) for x in lists]


def infonce(U, V, hist_len, tgt_len, tgt_ids, tau, keep, last):
    """SPEC §4.2 from the whole score matrix: rows are the queries (i, j), columns every valid target
    (z, k); each (query, positive) term is a log-sum-exp over the positive and the query's allowed
    negatives (other users' targets, minus those whose item is among user i's own targets unless keep)."""
    B = len(hist_len)
    rows = [(i, j) for i in range(B) for j in ([hist_len[i] - 1] if last else range(hist_len[i]))]
    cols = [(z, k) for z in range(B) for k in range(tgt_len[z])]
    S = torch.stack([U[i, j] for i, j in rows]) @ torch.stack([V[z, k] for z, k in cols]).T / tau
    terms = []
    for q, (i, _) in enumerate(rows):
        own = set(tgt_ids[i])
        positives = [c for c, (z, _) in enumerate(cols) if z == i]
        negatives = [c for c, (z, k) in enumerate(cols) if z != i and (keep or tgt_ids[z][k] not in own)]
        for p in positives:
            terms.append(torch.logsumexp(S[q, [p] + negatives], 0) - S[q, p])
    return torch.stack(terms).mean(), len(terms)


def lr_at(s, lr, total, warmup_frac):
    """SPEC §4.3; Python's round, halves to even, as the SPEC says."""
    w = round(warmup_frac * total)
    if s < w:
        return lr * (s + 1) / w
    return lr * 0.5 * (1 + math.cos(math.pi * (s - w) / (total - w)))


def train(init, users, content, case):
    """One run of `train --init ... --no-shuffle` as PyTorch does it; returns the log and the model."""
    model = Pch(CFG)
    model.load(init)
    h, t, b, steps = case["history"], case["targets"], case["batch_users"], case["steps"]
    params = list(model.parameters())
    wd = case.get("weight_decay", 0.0)
    if wd > 0:
        opt = torch.optim.AdamW(params, lr=case["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    else:
        opt = torch.optim.Adam(params, lr=case["lr"], betas=(0.9, 0.999), eps=1e-8)
    item_kind = "diagonal" if case["item_tower"] == "self" else "causal"
    per_epoch = math.ceil(len(users) / b)
    log, masked_mattered = [], 0
    for s in range(steps):
        batch = users[(s % per_epoch) * b:(s % per_epoch + 1) * b]
        hist = [u[1][-h:] for u in batch]
        tgt = [u[2][:t] for u in batch]
        hc, hl = pad(hist, content)
        tc, tl = pad(tgt, content)
        U = model(hc, hl, "causal")
        V = model(tc, tl, item_kind)
        opt.zero_grad()
        loss, pairs = infonce(U, V, hl, tl, tgt, case["tau"], case["keep_false_negatives"], case["last"])
        with torch.no_grad():
            other, _ = infonce(U, V, hl, tl, tgt, case["tau"], not case["keep_false_negatives"], case["last"])
            masked_mattered += abs(other.item() - loss.item()) > 1e-6
        loss.backward()
        if case.get("clip") is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, case["clip"]).item()
        else:
            norm = math.sqrt(sum((p.grad ** 2).sum().item() for p in params))
        lr = lr_at(s, case["lr"], steps, case["warmup_frac"])
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        log.append({"step": s + 1, "loss": loss.item(), "grad_norm": norm, "lr": lr, "users": len(batch),
                    "pairs": pairs})
    assert masked_mattered >= 2, f"{case['name']}: false negatives changed only {masked_mattered} losses"
    return log, model


def flags(case):
    out = ["--history", case["history"], "--targets", case["targets"], "--batch-users", case["batch_users"],
           "--steps", case["steps"], "--lr", case["lr"], "--warmup-frac", case["warmup_frac"], "--tau", case["tau"]]
    if case["keep_false_negatives"]:
        out.append("--keep-false-negatives")
    if case["last"]:
        out += ["--loss-positions", "last"]
    if case.get("weight_decay"):
        out += ["--weight-decay", case["weight_decay"]]
    if case.get("clip") is not None:
        out += ["--clip-grad-norm", case["clip"]]
    return [str(x) for x in out]


TRAIN_CASES = [
    # SPEC defaults where the issue fixes none: all positions, false negatives masked, Variant 1.
    {"name": "all_masked", "init": "init.safetensors", "history": 5, "targets": 3, "batch_users": 4, "steps": 6,
     "lr": 1e-3, "warmup_frac": 0.34, "tau": 0.05, "item_tower": "causal", "keep_false_negatives": False,
     "last": False},
    # The official pretraining loss, Eq. 1 exactly, AdamW and a clip that bites; 11 users in batches of 5
    # leave a last batch of one user, who has no negatives (loss 0, gradient 0, Adam still moves).
    {"name": "last_kept_adamw_clipped", "init": "init.safetensors", "history": 4, "targets": 4, "batch_users": 5,
     "steps": 6, "lr": 2e-3, "warmup_frac": 0.34, "tau": 0.05, "item_tower": "causal",
     "keep_false_negatives": True, "last": True, "weight_decay": 0.1, "clip": 0.2},
    # Variant 2: each target alone; no warm-up. The item tower is part of the model's config, so it comes
    # from the --init checkpoint (the binary refuses --item-tower beside --init).
    {"name": "self_item_tower", "init": "init_self.safetensors", "history": 6, "targets": 4, "batch_users": 3,
     "steps": 6, "lr": 1e-3, "warmup_frac": 0.0, "tau": 0.1, "item_tower": "self", "keep_false_negatives": False,
     "last": False},
]


def embed_users(model, users, h, content):
    hc, hl = pad([u[1][-h:] for u in users], content)
    out = model(hc, hl, "causal")
    return torch.stack([out[b, n - 1] for b, n in enumerate(hl)])


def embed_items(model, rows, content):
    return model(content[rows][:, None, :], [1] * len(rows), "diagonal")[:, 0]


def evaluate(model, users, content, case):
    """SPEC §5: rank the gallery by dot product, history items out unless keep_history, ties by row."""
    gallery = case["gallery_rows"]
    G = embed_items(model, gallery, content)
    U = embed_users(model, users, case["history"], content)
    ks = case["k"]
    sums = {k: np.zeros(3) for k in ks}
    min_gap = math.inf
    for u, (_, history, targets) in enumerate(users):
        scores = (G @ U[u]).tolist()
        excluded = set() if case["keep_history"] else set(history)
        order = sorted((p for p in range(len(gallery)) if gallery[p] not in excluded),
                       key=lambda p: (-scores[p], gallery[p]))
        top = [scores[p] for p in order[: max(ks) + 1]]
        min_gap = min([min_gap] + [a - b for a, b in zip(top, top[1:])])
        relevant = set(targets)
        hits = [r for r, p in enumerate(order[: max(ks)]) if gallery[p] in relevant]
        for k in ks:
            found = [r for r in hits if r < k]
            dcg = sum(1 / math.log2(r + 2) for r in found)
            idcg = sum(1 / math.log2(r + 2) for r in range(min(len(relevant), k)))
            sums[k] += [float(bool(found)), len(found) / len(relevant), dcg / idcg]
    assert min_gap > RANK_MARGIN, f"{case['name']}: near-tie {min_gap:.2e} in the top ranks"
    metrics = {}
    for k in ks:
        hit, recall, ndcg = sums[k] / len(users)
        metrics.update({f"H@{k}": hit, f"R@{k}": recall, f"N@{k}": ndcg})
    return {"users": len(users), "gallery": len(gallery), "metrics": metrics, "min_score_gap": min_gap}


def checkpoint(path, tensors, cfg):
    # The config alone in the metadata: safetensors writes a metadata map in a random order, and one key
    # keeps the file the same bytes from run to run.
    save_file({k: v.to(torch.float32).contiguous() for k, v in tensors.items()}, str(path),
              metadata={"config": json.dumps(cfg)})


def main():
    torch.manual_seed(3)  # chosen so that the eval rankings clear RANK_MARGIN
    torch.set_default_dtype(torch.float64)
    rng = np.random.default_rng(612)
    OUT.mkdir(parents=True, exist_ok=True)
    ids, content = make_store(rng)
    users = make_users(rng, ids)

    model = Pch(CFG)
    model.spread()
    with torch.no_grad():
        # Content rows are unit vectors: with N(0, 1/fan_in) adaptor weights each item's signal (std
        # 1/sqrt(24)) would sit below the biases, which every item shares, and all items would embed alike
        # (cosines near 1, near-ties in every ranking). Scale the one up and the others down.
        model.adaptor.weight.mul_(D_CONTENT ** 0.5)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.mul_(0.2)
    model.round_to_f32()
    init = model.tensors()
    checkpoint(OUT / "init.safetensors", init, CFG)
    checkpoint(OUT / "init_self.safetensors", init, {**CFG, "item_tower": "self"})

    reference = {"train": [], "eval": []}
    trained = None
    for case in TRAIN_CASES:
        log, final = train(init, users, content, case)
        if trained is None:
            trained = final
        reference["train"].append({"name": case["name"], "init": case["init"], "flags": flags(case), "log": log})
        print(case["name"], " ".join(f"{line['loss']:.5f}/{line['grad_norm']:.4f}" for line in log))
    clip = TRAIN_CASES[1]["clip"]
    bites = sum(line["grad_norm"] > clip for line in reference["train"][1]["log"])
    assert bites >= 4, f"the clip of {clip} bites on {bites} steps only"

    trained.round_to_f32()
    checkpoint(OUT / "trained.safetensors", trained.tensors(), CFG)

    # Every item but ten, listed out of order with a repeat and a blank line, as a user might write it.
    left_out = set(rng.choice(N_ITEMS, 10, replace=False).tolist())
    listed = [r for r in rng.permutation(N_ITEMS).tolist() if r not in left_out]
    (OUT / "gallery.txt").write_text("".join(f"{ids[r]}\n" for r in listed[:12]) + "\n"
                                     + "".join(f"{ids[r]}\n" for r in listed[12:] + listed[:1]))
    eval_cases = [
        {"name": "default", "history": 5, "k": [1, 3, 5, 10], "keep_history": False,
         "gallery_rows": list(range(N_ITEMS)), "flags": ["--history", "5", "--k", "1,3,5,10"]},
        {"name": "keep_history_gallery", "history": 3, "k": [10, 1, 5, 3], "keep_history": True,
         "gallery_rows": sorted(set(listed)),
         "flags": ["--history", "3", "--k", "10,1,5,3", "--keep-history", "--gallery", "gallery.txt"]},
    ]
    # Only items that are someone's target: short rankings where K = 1 finds hits too.
    pool = sorted({r for _, _, t in users for r in t})
    (OUT / "gallery_targets.txt").write_text("".join(f"{ids[r]}\n" for r in pool))
    eval_cases.append({"name": "targets_gallery", "history": 5, "k": [1, 2, 5], "keep_history": False,
                       "gallery_rows": pool, "flags": ["--history", "5", "--k", "1,2,5", "--gallery",
                                                       "gallery_targets.txt"]})
    absent = sum(len(set(t) - set(listed)) for _, _, t in users)
    assert absent > 0, "some targets must fall outside the gallery"
    with torch.no_grad():
        for case in eval_cases:
            result = evaluate(trained, users, content, case)
            reference["eval"].append({"name": case["name"], "flags": case["flags"], **result})
            print(case["name"], result)
        reference["embeddings"] = {
            "history": 5,
            "users": [u for u, _, _ in users],
            "user": embed_users(trained, users, 5, content).tolist(),
            "item": embed_items(trained, list(range(N_ITEMS)), content).tolist(),
        }
    (OUT / "reference.json").write_text(json.dumps(reference, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
