#!/usr/bin/env python3
"""Peer of `learn-kern bench train` (SPEC §7): PCH training steps at the same shapes in PyTorch with AMP,
printing the same JSON.

The model is the official LEARN module structure (tools/pch_torch.py: adaptor Linear -> transformers
BertEncoder under an additive causal + padding mask -> Linear head -> F.normalize); the item tower is the same
module over the target sequence, causal (Variant 1) or each target alone (--item-tower self). The loss is
SPEC §4.2's dense all-action InfoNCE with false negatives masked (tau 0.05), from the whole [B·H, B·T] score
matrix; Adam (fused on CUDA) with SPEC §4.3's warm-up + cosine schedule over warmup + steps updates. On CUDA:
fp16 autocast, fp32 master weights, torch.amp.GradScaler (a step whose gradients overflow is skipped).
  --mode eager    plain PyTorch.
  --mode compile  torch.compile of content gathering, both towers and the loss as one function (forward and
                  backward graphs); the optimizer and the scaler stay eager. The first step, which traces and
                  compiles, is reported as compile_s and is never one of the timed steps (a warm inductor
                  cache, /tmp/torchinductor_$USER, makes it shorter on a second run).

Inputs are made on the device before timing: a content table [--items, d_content] of random unit rows (fp16;
fp32 on the CPU), and for every step a fresh batch of --batch-users users with exactly --history history and
--targets target items, ids drawn from a Zipf law (p ∝ 1/rank^--zipf over a random permutation of the items)
so that users share popular targets and false negatives occur. A timed step gathers the batch's content rows
(as learn-kern does), runs both towers and the loss, backward, unscale, Adam. --warmup steps, then --steps
timed ones with CUDA events around each; medians and percentiles of those.

FLOPs (model_tflop_per_step), from the shapes, counting a multiply-add as 2 and a training step as 3×forward:
  per position  g = 2·d_content·d_model + n_layers·(8·d_model² + 4·d_model·d_ff) + 2·d_model·d_out
                (adaptor; qkv 6d² + out 2d²; up + down 4·d·d_ff; head)
  attention     a(L) = n_layers · 4·d_model · L(L+1)/2 per causal sequence of L (QKᵀ and PV over the visible
                key ≤ query pairs, as tools/peer/embed_hf.py counts)
  step          3 · B · ((H + T)·g + a(H) + a_item(T))      (the loss's B·H × B·T score GEMM is left out)
                a_item(T) = a(T), or n_layers · 4·d_model · T under --item-tower self
tokens_per_s counts B·(H + T) positions per step.

JSON keys (those of `learn-kern bench train`): bench, engine (pytorch-amp-eager|pytorch-amp-compile), preset,
device {name, driver, torch, cuda}, batch_users, history, targets, steps (timed), step_ms_median, step_ms_p10,
step_ms_p90, steps_per_s, users_per_s, tokens_per_s, model_tflop_per_step, tflops, peak_memory_bytes
(torch.cuda.max_memory_allocated: weights, Adam state, the content table and the step's activations), loss_first
(step 1, a warm-up step), loss_last (the last timed step), compile_s (null in eager mode), skipped_steps (updates
the GradScaler skipped for overflow, warm-up included).

usage: train_torch.py [--preset pch-base|pch-small|pch-tiny] [--mode eager|compile] [--batch-users 30]
                      [--history 80] [--targets 40] [--items 100000] [--warmup 10] [--steps 50]
                      [--device cuda|cpu] [--attn sdpa|eager] [--json FILE]
       train_torch.py --check    (the loss against the term-by-term reference of tools/golden, float64, CPU)
CPU smoke check: train_torch.py --device cpu --preset pch-tiny --warmup 1 --steps 3 [--mode compile]
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

TOOLS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TOOLS)
sys.path.insert(0, os.path.join(TOOLS, "golden"))
from make_train_fixtures import lr_at  # noqa: E402  (SPEC §4.3, as the training fixtures follow it)
from pch_torch import Pch  # noqa: E402  (tools/pch_torch.py)

# pch-base and pch-tiny are src/pch/config.rs's presets; pch-small is tools/peer/cpu_train.py's --small shape.
PRESETS = {
    "pch-base": {"d_content": 4096, "d_model": 768, "n_layers": 12, "n_heads": 12, "d_ff": 3072, "d_out": 64},
    "pch-small": {"d_content": 512, "d_model": 256, "n_layers": 4, "n_heads": 4, "d_ff": 1024, "d_out": 64},
    "pch-tiny": {"d_content": 64, "d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128, "d_out": 16},
}


class DevicePch(Pch):
    """Pch with its mask built on the model's device from a lengths tensor, in a few tensor operations (Pch
    builds it on the host, user by user; same values). No learned positions: the presets have none."""

    def forward(self, content, lengths, kind):
        L = content.shape[1]
        x = self.adaptor(content)
        x = self.encoder(x, attention_mask=additive_mask(lengths, L, kind, x.dtype)).last_hidden_state
        return F.normalize(self.head(x), p=2, dim=-1, eps=1e-12)


def additive_mask(lengths, L, kind, dtype):
    """tools/pch_torch.py's extended_mask: [B, 1, L, L], 0 where visible, the dtype's minimum elsewhere."""
    q = torch.arange(L, device=lengths.device)[:, None]
    k = torch.arange(L, device=lengths.device)[None, :]
    if kind == "causal":
        visible = (k <= q) & (k < lengths[:, None, None])
    else:
        visible = (k == q).expand(len(lengths), L, L)
    mask = torch.zeros(len(lengths), 1, L, L, dtype=dtype, device=lengths.device)
    return mask.masked_fill(~visible[:, None], torch.finfo(dtype).min)


def infonce(users, items, hist_len, tgt_len, ids, tau, keep_false_negatives=False):
    """SPEC §4.2 over every history position, from the whole score matrix (as tools/peer/cpu_train.py's, but on
    the device and without data-dependent shapes, so that it compiles); returns (loss, valid pair count).
    users [B, H, d], items [B, T, d]; hist_len, tgt_len [B]; ids [B, T] the targets' item ids."""
    b, h, d = users.shape
    t = items.shape[1]
    dev = users.device
    hist_valid = torch.arange(h, device=dev)[None, :] < hist_len[:, None]  # [B, H]
    tgt_valid = torch.arange(t, device=dev)[None, :] < tgt_len[:, None]  # [B, T]
    # own[i, z, k]: target k of user z is among user i's own valid targets (a false negative for i).
    own = ((ids[None, :, :, None] == ids[:, None, None, :]) & tgt_valid[:, None, None, :]).any(-1)
    allowed = ~torch.eye(b, dtype=torch.bool, device=dev)[:, :, None] & tgt_valid[None]
    if not keep_false_negatives:
        allowed &= ~own
    # The GEMM in the autocast dtype, the log-sum-exps in fp32 at least (as learn-kern's loss kernel).
    scores = users.reshape(b * h, d) @ items.reshape(b * t, d).T
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)).view(b, h, b, t) / tau
    negatives = torch.logsumexp(scores.masked_fill(~allowed[:, None], -math.inf).view(b, h, b * t), dim=-1)
    positives = torch.diagonal(scores, dim1=0, dim2=2).permute(2, 0, 1)  # [B, H, T]: s(u_ij, v_ik)
    valid = hist_valid[:, :, None] & tgt_valid[:, None, :]
    # A row without negatives has N = -inf and costs exactly 0.
    terms = torch.logaddexp(negatives[:, :, None], positives) - positives
    pairs = valid.sum()
    return torch.where(valid, terms, 0.0).sum() / pairs, pairs


def check():
    """The loss above against the term-by-term float64 reference (the cases tools/peer/cpu_train.py checks)."""
    import make_loss_fixtures as ref  # tools/golden/make_loss_fixtures.py

    cases = ref.peer_check_cases()
    for c in cases:
        users = torch.tensor(c["users"], dtype=torch.float64).view(c["b"], c["h"], c["d"]).requires_grad_()
        items = torch.tensor(c["items"], dtype=torch.float64).view(c["b"], c["t"], c["d"]).requires_grad_()
        ids = torch.tensor(c["target_ids"]).view(c["b"], c["t"])
        loss, pairs = infonce(users, items, torch.tensor(c["hist_len"]), torch.tensor(c["tgt_len"]), ids,
                              c["tau"], c["keep_false_negatives"])
        loss.backward()
        errors = [abs(loss.item() - c["loss"]) / abs(c["loss"])]
        for got, want in ((users.grad, c["d_users"]), (items.grad, c["d_items"])):
            want = torch.tensor(want, dtype=torch.float64)
            errors.append(float((got.flatten() - want).norm() / want.norm().clamp_min(1e-300)))
        if int(pairs) != c["pairs"] or not all(e < 1e-10 for e in errors):
            sys.exit(f"infonce case {c['name']}: pairs {int(pairs)} vs {c['pairs']}, "
                     f"relative errors (loss, d_users, d_items) {errors}")
    print(f"the device InfoNCE matches the term-by-term reference on {len(cases)} cases")


def model_flops(cfg, b, h, t, item_tower):
    """Forward + backward FLOPs of one step (the module docstring's formula)."""
    d, layers = cfg["d_model"], cfg["n_layers"]
    per_position = 2 * cfg["d_content"] * d + layers * (8 * d * d + 4 * d * cfg["d_ff"]) + 2 * d * cfg["d_out"]

    def causal(n):
        return layers * 4 * d * n * (n + 1) // 2

    item_attention = causal(t) if item_tower == "causal" else layers * 4 * d * t
    return 3 * b * ((h + t) * per_position + causal(h) + item_attention)


def make_batches(count, args, device):
    """[count] (history ids [B, H], target ids [B, T]) drawn from the Zipf law, on the device."""
    g = torch.Generator(device=device).manual_seed(args.seed + 1)
    weights = torch.arange(1, args.items + 1, device=device, dtype=torch.float32) ** -args.zipf
    item_of_rank = torch.randperm(args.items, device=device, generator=g)  # popular items anywhere in the table

    def draw(n):
        ranks = torch.multinomial(weights, count * args.batch_users * n, replacement=True, generator=g)
        return item_of_rank[ranks].view(count, args.batch_users, n)

    return list(zip(draw(args.history), draw(args.targets)))


def device_info(device):
    if device.type != "cuda":
        return {"name": "cpu", "driver": None, "torch": torch.__version__, "cuda": None}
    try:  # torch does not expose the driver's version; nvidia-smi does (one driver for all of a host's GPUs)
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, check=True).stdout.split("\n")[0].strip() or None
    except (OSError, subprocess.CalledProcessError):
        driver = None
    return {"name": torch.cuda.get_device_name(device), "driver": driver, "torch": torch.__version__,
            "cuda": torch.version.cuda}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="pch-base", choices=sorted(PRESETS))
    p.add_argument("--d-content", type=int, help="content width, instead of the preset's")
    p.add_argument("--mode", default="eager", choices=["eager", "compile"])
    p.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile's mode (reduce-overhead adds CUDA graphs)")
    p.add_argument("--batch-users", type=int, default=30)
    p.add_argument("--history", type=int, default=80)
    p.add_argument("--targets", type=int, default=40)
    p.add_argument("--items", type=int, default=100000, help="rows of the content table")
    p.add_argument("--zipf", type=float, default=1.0, help="exponent of the item popularity law")
    p.add_argument("--item-tower", default="causal", choices=["causal", "self"])
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="BertEncoder's attention")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    p.add_argument("--steps", type=int, default=50, help="timed steps")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup-frac", type=float, default=0.1, help="of the schedule (SPEC §4.3)")
    p.add_argument("--tau", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", help="write the report here as well as to stdout")
    p.add_argument("--check", action="store_true", help="only check the loss against the reference, and exit")
    args = p.parse_args()
    if args.check:
        return check()
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1 (the first step, which compiles, is never timed)")

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    cfg = {**PRESETS[args.preset], "ln_eps": 1e-12, "positions": "none", "input": "content", "dropout": 0.0,
           "item_tower": args.item_tower}
    if args.d_content:
        cfg["d_content"] = args.d_content
    torch.manual_seed(args.seed)
    model = DevicePch(cfg, attn=args.attn)
    model.init_bert(torch.Generator().manual_seed(args.seed))
    model.to(device)  # fp32 master weights; autocast makes the fp16 copies
    params = list(model.parameters())
    adam = torch.optim.Adam(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, fused=cuda)
    scaler = torch.amp.GradScaler(device.type, enabled=cuda)

    g = torch.Generator(device=device).manual_seed(args.seed)
    content = torch.randn(args.items, cfg["d_content"], device=device, generator=g)
    content = F.normalize(content, dim=-1).to(torch.float16 if cuda else torch.float32)
    total = args.warmup + args.steps
    batches = make_batches(total, args, device)
    b, h, t = args.batch_users, args.history, args.targets
    hist_len = torch.full((b,), h, device=device)
    tgt_len = torch.full((b,), t, device=device)
    item_kind = "causal" if args.item_tower == "causal" else "diagonal"

    def forward_loss(hist_ids, tgt_ids):
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=cuda):
            users = model(content[hist_ids], hist_len, "causal")
            items = model(content[tgt_ids], tgt_len, item_kind)
            return infonce(users, items, hist_len, tgt_len, tgt_ids, args.tau)[0]

    if args.mode == "compile":
        forward_loss = torch.compile(forward_loss, mode=args.compile_mode)

    def step(s):
        if args.mode == "compile":
            torch.compiler.cudagraph_mark_step_begin()  # a new step for reduce-overhead's CUDA graphs
        loss = forward_loss(*batches[s])
        adam.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        for group in adam.param_groups:
            group["lr"] = lr_at(s, args.lr, total, args.warmup_frac)
        scaler.step(adam)
        scaler.update()
        return loss.detach().clone()  # CUDA graphs (reduce-overhead) reuse the output's memory

    def first_step():
        try:
            return step(0)
        except Exception as e:  # inductor wants a working C++ toolchain on the CPU: say so, not a trace
            if args.mode != "compile" or cuda:
                raise
            sys.exit(f"train_torch.py: torch.compile failed on the CPU ({e.__class__.__name__}); "
                     "skip --mode compile on this machine")

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    losses = [first_step()]
    sync()
    compile_s = time.perf_counter() - started if args.mode == "compile" else None  # tracing + compiling
    losses += [step(s) for s in range(1, args.warmup)]
    times_ms = []
    for s in range(args.warmup, total):
        if cuda:  # events: no host synchronisation between steps, as learn-kern's engine
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            losses.append(step(s))
            end.record()
            times_ms.append((start, end))
        else:
            started = time.perf_counter()
            losses.append(step(s))
            times_ms.append((time.perf_counter() - started) * 1e3)
    sync()
    if cuda:
        times_ms = [start.elapsed_time(end) for start, end in times_ms]

    # Fused Adam (and the unfused one, through GradScaler) counts only the updates it applied.
    applied = int(adam.state[params[0]]["step"]) if params[0] in adam.state else 0
    median = statistics.median(times_ms)
    p10, p90 = (statistics.quantiles(times_ms, n=10, method="inclusive")[i] for i in (0, -1)) \
        if len(times_ms) > 1 else (median, median)
    flops = model_flops(cfg, b, h, t, args.item_tower)
    steps_per_s = 1e3 / median
    report = {
        "bench": "train",
        "engine": f"pytorch-amp-{args.mode}",
        "preset": args.preset,
        "device": device_info(device),
        "batch_users": b,
        "history": h,
        "targets": t,
        "steps": args.steps,
        "step_ms_median": median,
        "step_ms_p10": p10,
        "step_ms_p90": p90,
        "steps_per_s": steps_per_s,
        "users_per_s": b * steps_per_s,
        "tokens_per_s": b * (h + t) * steps_per_s,
        "model_tflop_per_step": flops / 1e12,
        "tflops": flops * steps_per_s / 1e12,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "loss_first": losses[0].item(),
        "loss_last": losses[-1].item(),
        "compile_s": compile_s,
        "skipped_steps": total - applied,
    }
    print(f"train_torch.py: {cfg}, attn {args.attn}, item tower {args.item_tower}, {args.items} items "
          f"(zipf {args.zipf}), {args.warmup} warm-up steps"
          + (f", compile mode {args.compile_mode}" if args.mode == "compile" else ""), file=sys.stderr)
    text = json.dumps(report, indent=2)
    if args.json:
        with open(args.json, "w") as out:
            out.write(text + "\n")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
