#!/usr/bin/env python3
"""Measures the peak memory of converting a checkpoint of about 2.9 GB, against 1.5 x its largest tensor.

    cargo build --example convert_model
    python3 tools/convert/measure_peak.py [--bin target/debug/examples/convert_model] [--dir /tmp/learn-kern-peak]

Writes a bf16 checkpoint in two shards with pytorch_model.bin.index.json, as Baichuan2 ships it: a contiguous
512 MiB tensor, a 512 MiB transposed (non-contiguous) one, a 256 MiB embedding with a 128 MiB view at an offset
into its storage, and 96 tensors of 16 MiB. Converts it with the example program under /usr/bin/time -v,
checks every tensor against torch.load with tools/convert/check_converted.py, prints the figures as JSON and
deletes the files (unless --keep). Nothing it writes is committed.

Recorded 2026-11-25 (2-core shared VM, ext4, dev profile: the crate at opt-level 1, dependencies at 3; torch
2.15): checkpoint 2,952,823,864 bytes, largest tensor 536,870,912 (the transposed one), peak RSS 550,895,616
= 1.026 x the largest tensor (bound 1.5 x + 64 MiB = 872,415,232); 3.09 GB of tensor data converted in 25.4 s
(121 MB/s, bound by the shared disk: `cp` + `sync` of the same files took 9 s when it was idle); all 100
tensors identical to torch.load.
"""

import argparse
import collections
import json
import pathlib
import re
import shutil
import subprocess
import sys
import time

import torch

MiB = 1 << 20
# What the process needs besides tensor data: code, the allocator, zip directories, two 8 MiB buffers.
CONSTANT = 64 * MiB


def make_checkpoint(d):
    g = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(torch.bfloat16)

    embed = randn(32768, 4096)
    first = collections.OrderedDict()
    first["model.embed_tokens.weight"] = embed
    first["tied.tail"] = embed[16384:]
    first["big.contiguous"] = randn(16384, 16384)
    second = collections.OrderedDict()
    second["big.transposed"] = randn(16384, 16384).t()
    for layer in range(32):
        shard = first if layer < 16 else second
        for part in ["q", "k", "v"]:
            shard[f"model.layers.{layer}.{part}.weight"] = randn(2048, 4096)
    weight_map = {}
    for i, sd in enumerate([first, second], start=1):
        name = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save(sd, d / name)
        weight_map.update({k: name for k in sd})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    largest = max(t.numel() * t.element_size() for sd in (first, second) for t in sd.values())
    return largest


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/debug/examples/convert_model")
    ap.add_argument("--dir", default="/tmp/learn-kern-peak")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    d = pathlib.Path(args.dir)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    out = d / "out"
    try:
        largest = make_checkpoint(d)
        size = sum(p.stat().st_size for p in d.glob("*.bin"))
        started = time.time()
        run = subprocess.run(["/usr/bin/time", "-v", args.bin, str(d), str(out)], capture_output=True, text=True)
        wall = time.time() - started
        if run.returncode != 0:
            sys.exit(f"conversion failed ({run.returncode}): {run.stderr}")
        peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1)) * 1024
        report = json.loads(run.stdout)
        check = subprocess.run([sys.executable, str(pathlib.Path(__file__).with_name("check_converted.py")),
                                str(d), str(out)], capture_output=True, text=True)
        bound = 1.5 * largest + CONSTANT
        figures = {
            "checkpoint_bytes": size,
            "largest_tensor_bytes": largest,
            "peak_rss_bytes": peak,
            "peak_over_largest": round(peak / largest, 3),
            "bound_bytes": int(bound),
            "within_bound": peak <= bound,
            "convert_seconds": round(report["seconds"], 2),
            "throughput_mb_s": round(report["bytes"] / report["seconds"] / 1e6, 1),
            "process_wall_seconds": round(wall, 2),
            "check": (check.stdout or check.stderr).strip(),
        }
        print(json.dumps(figures, indent=2))
        if not figures["within_bound"] or check.returncode != 0:
            sys.exit(1)
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
