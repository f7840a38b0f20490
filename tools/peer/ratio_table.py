#!/usr/bin/env python3
"""Prints one table from `bench embed` or `bench train` JSON reports: learn-kern first, then each peer, with
learn-kern's speed-up over it (embed: the tokens/s ratio; train: the steps/s ratio). Train reports are those
whose "bench" is "train" (learn-kern's, tools/peer/train_torch.py's).
usage: ratio_table.py learn-kern.json peer.json…"""

import json
import os
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        return {"engine": f"{os.path.basename(path)} (missing: {e.__class__.__name__})"}


def cell(value, width, fmt):
    return f"{value:>{width}{fmt}}" if value is not None else f"{'—':>{width}}"


def train_table(reports):
    first = next(r for r in reports if r.get("bench") == "train")
    shape = ("preset", "batch_users", "history", "targets")
    print(f"bench train, preset {first['preset']}, {first['batch_users']} users × ({first['history']} history + "
          f"{first['targets']} targets), {first.get('device', {}).get('name', '?')}")
    ours = reports[0].get("steps_per_s")
    print(f"{'engine':<30} {'step ms':>8} {'steps/s':>8} {'users/s':>9} {'TFLOP/s':>8} {'peak GiB':>9} "
          f"{'learn-kern ×':>12}")
    for r in reports:
        sps, peak = r.get("steps_per_s"), r.get("peak_memory_bytes")
        cells = [
            cell(r.get("step_ms_median"), 8, ".2f"),
            cell(sps, 8, ".2f"),
            cell(r.get("users_per_s"), 9, ".0f"),
            cell(r.get("tflops"), 8, ".2f"),
            cell(peak / 2**30 if peak else None, 9, ".2f"),
            cell(ours / sps if ours and sps else None, 12, ".2f"),
        ]
        print(f"{r.get('engine', '?'):<30} " + " ".join(cells))
    for r in reports:
        if r.get("bench") == "train" and any(r.get(k) != first.get(k) for k in shape):
            print(f"warning: {r['engine']} ran other shapes: " + ", ".join(f"{k} {r.get(k)}" for k in shape))
    peak_rate = reports[0].get("gemm_peak_tflops")
    if peak_rate:  # MFU of every engine against the cuBLAS fp16 GEMM rate learn-kern measured in its run
        print(f"MFU against cuBLAS's fp16 GEMM rate ({peak_rate:.1f} TFLOP/s): " + ", ".join(
            f"{r['engine']} {100 * r['tflops'] / peak_rate:.0f}%" for r in reports if r.get("tflops")))
    compiled = [r for r in reports if r.get("compile_s")]
    for r in compiled:
        print(f"{r['engine']}: compiling took {r['compile_s']:.1f} s (not in the step times)")


def main():
    reports = [load(p) for p in sys.argv[1:]]
    if not reports:
        sys.exit("usage: ratio_table.py learn-kern.json peer.json…")
    if not any("bench" in r for r in reports):
        sys.exit("ratio_table.py: no report could be read: " + "; ".join(r["engine"] for r in reports))
    if any(r.get("bench") == "train" for r in reports):
        return train_table(reports)
    ours = reports[0].get("tokens_per_s")
    device = reports[0].get("device", {}).get("name", "?")
    print(f"bench embed, preset {reports[0].get('preset', '?')}, {device}")
    print(f"{'engine':<30} {'tokens/s':>10} {'items/s':>9} {'TFLOP/s':>8} {'padding eff':>11} {'peak GiB':>9} {'learn-kern ×':>12}")
    for r in reports:
        tps = r.get("tokens_per_s")
        mem = r.get("memory", {})
        peak = mem.get("device_used_bytes") or mem.get("peak_allocated_bytes")
        cells = [
            f"{tps:>10.0f}" if tps else f"{'—':>10}",
            f"{r['items_per_s']:>9.1f}" if "items_per_s" in r else f"{'—':>9}",
            f"{r['tflops']:>8.1f}" if "tflops" in r else f"{'—':>8}",
            f"{r['padding_efficiency']:>11.2f}" if "padding_efficiency" in r else f"{'—':>11}",
            f"{peak / 2**30:>9.2f}" if peak else f"{'—':>9}",
            f"{ours / tps:>12.2f}" if ours and tps else f"{'—':>12}",
        ]
        print(f"{r.get('engine', '?'):<30} " + " ".join(cells))
    if "fraction_of_gemm_peak" in reports[0]:
        r = reports[0]
        print(
            f"learn-kern: {100 * r['fraction_of_gemm_peak']:.0f}% of cuBLAS's fp16 GEMM peak "
            f"({r['gemm_peak_tflops']:.1f} TFLOP/s; target ≥ 80%: {r['target_tokens_per_s']:.0f} tokens/s)"
        )


if __name__ == "__main__":
    main()
