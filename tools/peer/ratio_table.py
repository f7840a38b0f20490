#!/usr/bin/env python3
"""Prints one table from `bench embed` JSON reports: learn-kern first, then each peer, with learn-kern's
speed-up over it (tokens/s ratio). usage: ratio_table.py learn-kern.json peer.json…"""

import json
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        return {"engine": f"{path} (missing: {e.__class__.__name__})"}


def main():
    reports = [load(p) for p in sys.argv[1:]]
    if not reports:
        sys.exit("usage: ratio_table.py learn-kern.json peer.json…")
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
