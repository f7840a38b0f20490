#!/usr/bin/env python3
"""Checks a converted model directory against its PyTorch weights, tensor by tensor, with PyTorch's own loader.

    python3 tools/convert/check_converted.py MODEL_DIR [OUT_DIR]

Loads the `.bin` files with torch.load(mmap=True, weights_only=True) and the safetensors output with safe_open,
so neither side is held in memory whole, and requires every tensor to be equal bit for bit (NaNs included),
with the same dtype and shape, and the output to hold nothing else. Prints one line; exits 1 on a mismatch.
"""

import json
import pathlib
import sys

import torch
from safetensors import safe_open


def main():
    model = pathlib.Path(sys.argv[1])
    out = pathlib.Path(sys.argv[2]) if len(sys.argv) > 2 else model
    index = model / "pytorch_model.bin.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        outputs = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    else:
        shards, outputs = ["pytorch_model.bin"], ["model.safetensors"]
    count = nbytes = 0
    for shard, output in zip(shards, outputs):
        sd = torch.load(model / shard, mmap=True, weights_only=True, map_location="cpu")
        with safe_open(out / output, framework="pt") as f:
            if set(f.keys()) != set(sd):
                sys.exit(f"{output}: tensor names differ from {shard}")
            for name, want in sd.items():
                got = f.get_tensor(name)
                same = got.dtype == want.dtype and got.shape == want.shape
                if same and want.numel() > 0:
                    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[want.element_size()]
                    same = torch.equal(got.view(view), want.contiguous().view(view))
                if not same:
                    sys.exit(f"{output}: tensor {name} differs from {shard}")
                count += 1
                nbytes += got.numel() * got.element_size()
    print(f"checked {count} tensors, {nbytes} bytes: identical to torch.load")


if __name__ == "__main__":
    main()
