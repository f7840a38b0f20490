#!/usr/bin/env python3
"""Reference values for the loss, optimiser and retrieval tests, from PyTorch (autograd, float64) and numpy.

Writes tests/fixtures/loss/{infonce,adam,retrieval}.json. Every case is drawn from a fixed seed, so a rerun
reproduces the files; the Rust tests read them (tests/loss_fixtures.rs).

    python3 tools/golden/make_loss_fixtures.py
"""

import json
import math
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "loss"


def infonce_reference(U, V, hist_len, tgt_len, ids, tau, keep, last):
    """SPEC §4.2 written out term by term: for each valid (i, j, k), a log-softmax over the positive and
    user i's allowed negatives (other users' valid targets, minus those whose id is among i's targets)."""
    B, _, d = U.shape
    terms = []
    for i in range(B):
        own = set(ids[i][: tgt_len[i]])
        negs = [
            (z, k)
            for z in range(B)
            if z != i
            for k in range(tgt_len[z])
            if keep or ids[z][k] not in own
        ]
        neg_v = torch.stack([V[z, k] for z, k in negs]) if negs else U.new_zeros(0, d)
        for j in [hist_len[i] - 1] if last else range(hist_len[i]):
            u = U[i, j]
            neg_s = neg_v @ u / tau
            for k in range(tgt_len[i]):
                pos = V[i, k] @ u / tau
                logits = torch.cat([pos[None], neg_s])
                terms.append(torch.logsumexp(logits, 0) - pos)
    return torch.stack(terms).mean(), len(terms)


def infonce_case(name, seed, B, H, T, d, pool, tau, keep, last, unit, force=None):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(B, H, d, generator=g, dtype=torch.float64)
    V = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    if unit:
        U = U / U.norm(dim=-1, keepdim=True)
        V = V / V.norm(dim=-1, keepdim=True)
    hist_len = torch.randint(1, H + 1, (B,), generator=g).tolist()
    tgt_len = torch.randint(1, T + 1, (B,), generator=g).tolist()
    ids = torch.randint(0, pool, (B, T), generator=g).tolist()
    if force:
        force(hist_len, tgt_len, ids)
    U.requires_grad_(True)
    V.requires_grad_(True)
    loss, pairs = infonce_reference(U, V, hist_len, tgt_len, ids, tau, keep, last)
    loss.backward()
    return {
        "name": name,
        "b": B, "h": H, "t": T, "d": d,
        "tau": tau,
        "keep_false_negatives": keep,
        "positions": "last" if last else "all",
        "users": U.detach().flatten().tolist(),
        "items": V.detach().flatten().tolist(),
        "hist_len": hist_len,
        "tgt_len": tgt_len,
        "target_ids": [x for row in ids for x in row],
        "loss": loss.item(),
        "pairs": pairs,
        "d_users": U.grad.flatten().tolist(),
        "d_items": V.grad.flatten().tolist(),
    }


def covers_everyone(hist_len, tgt_len, ids):
    """User 0's targets are every other user's valid targets: all of its negatives are false negatives."""
    cap = len(ids[0]) // (len(ids) - 1)
    for z in range(1, len(ids)):
        tgt_len[z] = min(tgt_len[z], cap)
    others = [ids[z][k] for z in range(1, len(ids)) for k in range(tgt_len[z])]
    tgt_len[0] = len(others)
    ids[0][: len(others)] = others


def infonce_cases():
    return [
        infonce_case("masked_all_padded", 1, B=5, H=4, T=3, d=6, pool=6, tau=0.1, keep=False, last=False, unit=False),
        infonce_case("kept_last", 2, B=5, H=4, T=3, d=6, pool=6, tau=0.1, keep=True, last=True, unit=False),
        infonce_case("kept_all", 7, B=4, H=3, T=3, d=5, pool=4, tau=0.3, keep=True, last=False, unit=False),
        infonce_case("masked_last", 3, B=6, H=5, T=4, d=5, pool=8, tau=0.2, keep=False, last=True, unit=False),
        infonce_case("unit_tau_0.05", 4, B=6, H=5, T=4, d=8, pool=10, tau=0.05, keep=False, last=False, unit=True),
        infonce_case("user_without_negatives", 5, B=3, H=3, T=8, d=4, pool=50, tau=0.05, keep=False, last=False,
                     unit=True, force=covers_everyone),
        infonce_case("single_user", 6, B=1, H=3, T=3, d=4, pool=5, tau=0.05, keep=False, last=False, unit=True),
    ]


def peer_check_cases():
    """Cases the Python peers (tools/peer/cpu_train.py, train_torch.py) hold their own loss to, padded, all
    positions (their loss has no "last" mode)."""
    return [
        infonce_case("padded", 31, B=5, H=6, T=4, d=7, pool=9, tau=0.1, keep=False, last=False, unit=False),
        infonce_case("kept", 32, B=4, H=5, T=5, d=6, pool=7, tau=0.2, keep=True, last=False, unit=False),
        infonce_case("unit", 33, B=6, H=4, T=3, d=8, pool=12, tau=0.05, keep=False, last=False, unit=True),
        infonce_case("no_negatives", 34, B=3, H=3, T=8, d=4, pool=50, tau=0.05, keep=False, last=False,
                     unit=True, force=covers_everyone),
    ]


def adam_case(name, seed, optimizer, weight_decay, clip):
    """Six updates of two f32 tensors with PyTorch's single-tensor Adam/AdamW, a changing learning rate,
    and optionally clip_grad_norm_ before each update."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5,)]
    params = [torch.randn(s, generator=g, dtype=torch.float32) for s in shapes]
    init = [p.flatten().tolist() for p in params]
    params = [torch.nn.Parameter(p.clone()) for p in params]
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]
    opt = cls(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay, foreach=False, fused=False)
    steps = []
    for s, lr in enumerate([1e-2, 2e-2, 5e-2, 3e-2, 1e-2, 5e-3]):
        # Gradient sizes swing above and below the clip threshold.
        scale = [0.05, 3.0, 0.3, 1.0, 0.1, 2.0][s]
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float32) * scale for p in params]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        norm = torch.nn.utils.clip_grad_norm_(params, clip).item() if clip else None
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        steps.append({
            "lr": lr,
            "grads": [gr.flatten().tolist() for gr in grads],
            "grad_norm": norm,
            "params": [p.detach().flatten().tolist() for p in params],
            "exp_avg": [opt.state[p]["exp_avg"].flatten().tolist() for p in params],
            "exp_avg_sq": [opt.state[p]["exp_avg_sq"].flatten().tolist() for p in params],
        })
    return {"name": name, "weight_decay": weight_decay, "clip": clip, "init": init, "steps": steps}


def adam_cases():
    return [
        adam_case("adam", 11, "adam", 0.0, None),
        adam_case("adamw", 12, "adamw", 0.05, None),
        adam_case("adamw_clipped", 13, "adamw", 0.01, 1.0),
    ]


def ndcg(hits, n_targets, k):
    dcg = sum(1.0 / math.log2(r + 2) for r in hits if r < k)
    idcg = sum(1.0 / math.log2(r + 2) for r in range(min(n_targets, k)))
    return dcg / idcg


def retrieval_case(seed, users=25, gallery=60, ks=(1, 5, 10, 50)):
    """Scores on a 0.1 grid (many ties), histories excluded, targets with repeats and ids past the gallery
    (absent, but counted in |targets|). Ranking: numpy lexsort on (−score, row), then the SPEC's formulas."""
    rng = np.random.default_rng(seed)
    cases, sums = [], {k: np.zeros(3) for k in ks}
    for _ in range(users):
        scores = (rng.integers(-10, 11, gallery) / 10).astype(np.float32)
        exclude = rng.choice(gallery, rng.integers(0, 15), replace=False).tolist()
        targets = rng.integers(0, gallery + 8, rng.integers(1, 9)).tolist()
        order = [r for r in np.lexsort((np.arange(gallery), -scores)).tolist() if r not in set(exclude)]
        ranked = order[: max(ks)]
        distinct = set(targets)
        hits = [r for r, row in enumerate(ranked) if row in distinct]
        for k in ks:
            found = sum(1 for r in hits if r < k)
            sums[k] += [float(found > 0), found / len(distinct), ndcg(hits, len(distinct), k)]
        cases.append({"scores": scores.tolist(), "exclude": exclude, "targets": targets, "ranked": ranked})
    metrics = {}
    for k in ks:
        h, r, n = sums[k] / users
        metrics.update({f"H@{k}": h, f"R@{k}": r, f"N@{k}": n})

    counts = rng.integers(0, 6, gallery)
    exclude = rng.choice(gallery, 10, replace=False).tolist()
    popular = [r for r in np.lexsort((np.arange(gallery), -counts)).tolist() if r not in set(exclude)][:20]
    return {
        "gallery": gallery,
        "ks": list(ks),
        "users": cases,
        "metrics": metrics,
        "popularity": {"counts": counts.tolist(), "exclude": exclude, "k": 20, "ranked": popular},
    }


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for name, value in [("infonce", infonce_cases()), ("adam", adam_cases()), ("retrieval", retrieval_case(21))]:
        path = OUT / f"{name}.json"
        path.write_text(json.dumps(value) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
