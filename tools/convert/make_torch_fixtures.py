#!/usr/bin/env python3
"""Writes the checkpoints that tests/convert.rs converts, into tests/fixtures/convert/.

Each good fixture is a model directory holding PyTorch weights written by torch.save (`pytorch_model.bin`, or
shards with `pytorch_model.bin.index.json`) and `expected.safetensors`: the same tensors, made contiguous and
written by the safetensors package. The Rust test converts the directory and compares bit for bit. The bad
fixtures are checkpoints the converter must refuse with a clear error, without running anything.

Run from the repository root: python3 tools/convert/make_torch_fixtures.py
"""

import collections
import io
import json
import os
import pathlib
import pickle
import shutil
import zipfile

import torch
from safetensors.torch import save_file

OUT = pathlib.Path("tests/fixtures/convert")
# The file the hostile pickles would create if anything executed them.
MARKER = "/tmp/learn-kern-convert-pwned-marker"


def layouts(dtype, g):
    """One state dict covering every way torch.save lays a tensor out."""

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    sd = collections.OrderedDict()
    embed = randn(7, 5)
    sd["model.embed_tokens.weight"] = embed
    sd["lm_head.weight"] = embed  # tied: the same storage, twice
    base = randn(6, 4)
    sd["shared.whole"] = base
    sd["shared.head"] = base[:2]  # a view at offset 0 that is not the whole storage
    sd["shared.tail"] = base[2:]  # a view at an offset
    sd["view.offset"] = randn(40)[5:17].view(3, 4)
    sd["transposed"] = randn(5, 3).t()
    sd["columns"] = randn(6, 8)[:, 2:5]
    sd["permuted"] = randn(2, 3, 4).permute(2, 0, 1)
    sd["expanded"] = randn(1, 4).expand(3, 4)
    sd["param"] = torch.nn.Parameter(randn(4), requires_grad=True)
    sd["scalar"] = torch.tensor(3.5, dtype=dtype)
    sd["empty"] = torch.zeros(0, 3, dtype=dtype)
    sd["special"] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, 65504.0]).to(dtype)
    return sd


def expected(sd, path):
    save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, str(path))


def fresh(name):
    d = OUT / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def good_fixtures(g):
    for tag, dtype in [("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16)]:
        d = fresh(f"single_{tag}")
        sd = layouts(dtype, g)
        torch.save(sd, d / "pytorch_model.bin")
        expected(sd, d / "expected.safetensors")

    # A module's state dict carries `_metadata` (a BUILD opcode); protocol 4 uses framing and STACK_GLOBAL.
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Embedding(5, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    for name, proto in [("module", 2), ("protocol4", 4)]:
        d = fresh(name)
        sd = model.state_dict()
        torch.save(sd, d / "pytorch_model.bin", pickle_protocol=proto)
        expected(sd, d / "expected.safetensors")

    # A training checkpoint that wraps the state dict.
    d = fresh("wrapped")
    sd = layouts(torch.float32, g)
    torch.save({"epoch": 3, "state_dict": sd, "best": 0.25, "optimizer": {"lr": 1e-3, "betas": [0.9, 0.999]}},
               d / "pytorch_model.bin")
    expected(sd, d / "expected.safetensors")

    # Shards as transformers writes them, mixing dtypes, with integer and bool buffers.
    d = fresh("sharded")
    shards = [
        layouts(torch.bfloat16, g),
        collections.OrderedDict(
            [("model.norm.weight", torch.randn(5, generator=g)),
             ("half.t", torch.randn(4, 6, generator=g).half().t()),
             ("ids", torch.arange(-6, 6, dtype=torch.int64).view(3, 4)[:, 1:]),
             ("mask", torch.tensor([[True, False, True], [False, False, True]])),
             ("bytes", torch.arange(0, 250, 7, dtype=torch.uint8)),
             ("doubles", torch.randn(3, 3, generator=g, dtype=torch.float64).t())]),
        collections.OrderedDict([("model.layers.0.mlp.up_proj.weight", torch.randn(6, 5, generator=g))]),
    ]
    n = len(shards)
    weight_map, everything, total = {}, collections.OrderedDict(), 0
    for i, sd in enumerate(shards, start=1):
        name = f"pytorch_model-{i:05d}-of-{n:05d}.bin"
        torch.save(sd, d / name)
        for k, v in sd.items():
            weight_map[k] = name
            everything[k] = v
            total += v.numel() * v.element_size()
    (d / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    expected(everything, d / "expected.safetensors")


class System:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


class Eval:
    def __reduce__(self):
        return (eval, (f"open({MARKER!r}, 'w')",))


def rewrite(src, dst, change):
    """Copies the zip `src` to `dst`, passing each (name, bytes) through `change` (None drops the entry)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            out = change(info.filename, zin.read(info))
            if out is not None:
                zout.writestr(info.filename, out[1], compress_type=out[0])


class FakeStorage:
    """Stands in for a storage so plain pickle can write torch's persistent ids with chosen numbers."""

    def __init__(self, key, numel):
        self.key, self.numel = key, numel


def torch_like(path, tensors, storages):
    """A torch-style zip whose data.pkl describes `tensors` {name: (key, offset, size, stride)} over float32
    `storages` {key: (numel, bytes)}, numbers unchecked: how a damaged or hand-made checkpoint looks."""

    class Rebuild:
        def __init__(self, args):
            self.args = args

        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, self.args)

    fakes = {k: FakeStorage(k, numel) for k, (numel, _) in storages.items()}
    sd = collections.OrderedDict(
        (name, Rebuild((fakes[key], offset, size, stride, False, collections.OrderedDict())))
        for name, (key, offset, size, stride) in tensors.items())
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=2)
    pickler.persistent_id = lambda o: ("storage", torch.FloatStorage, o.key, "cpu", o.numel) \
        if isinstance(o, FakeStorage) else None
    pickler.dump(sd)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        for key, (_, data) in storages.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")


def bad_fixtures(g):
    good = OUT / "single_f32" / "pytorch_model.bin"
    small = collections.OrderedDict([("w", torch.randn(3, 2, generator=g)), ("v", torch.randn(4, generator=g))])

    # Hostile pickles inside otherwise well-formed checkpoints: torch.save pickles them without running them.
    for name, evil in [("evil_system", System()), ("evil_eval", Eval())]:
        d = fresh(name)
        torch.save(collections.OrderedDict([("w", small["w"]), ("x", evil)]), d / "pytorch_model.bin")

    d = fresh("legacy")
    torch.save(small, d / "pytorch_model.bin", _use_new_zipfile_serialization=False)

    d = fresh("missing_storage")
    rewrite(good, d / "pytorch_model.bin",
            lambda n, b: None if n.endswith("/data/1") else (zipfile.ZIP_STORED, b))

    d = fresh("short_storage")
    rewrite(good, d / "pytorch_model.bin",
            lambda n, b: (zipfile.ZIP_STORED, b[:-4] if n.endswith("/data/1") else b))

    d = fresh("corrupt_pickle")
    rewrite(good, d / "pytorch_model.bin",
            lambda n, b: (zipfile.ZIP_STORED, b[: len(b) // 2] if n.endswith("data.pkl") else b))

    # A view reaching past its storage (4 floats; offset 3, 2 elements), which torch.save never writes.
    d = fresh("overrun")
    torch_like(d / "pytorch_model.bin", {"ok": ("0", 0, (2, 2), (2, 1)), "bad": ("0", 3, (2,), (1,))},
               {"0": (4, bytes(range(16)))})

    d = fresh("recompressed")
    rewrite(good, d / "pytorch_model.bin", lambda n, b: (zipfile.ZIP_DEFLATED, b))


def main():
    g = torch.Generator().manual_seed(20240501)
    good_fixtures(g)
    bad_fixtures(g)
    (OUT / "README.md").write_text(
        "Written by `python3 tools/convert/make_torch_fixtures.py` (torch "
        + torch.__version__.split("+")[0]
        + "); see that script for what each directory holds.\n")


if __name__ == "__main__":
    main()
