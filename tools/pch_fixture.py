"""Writes tests/fixtures/pch_torch.safetensors: the PCH model as the official LEARN code builds it
(tools/pch_torch.py: adaptor Linear -> transformers BertEncoder under an additive causal mask -> Linear
head -> F.normalize), here with learned positions, in float64, with outputs and parameter gradients for
tests/pch_torch.rs.

The tensors are stored under the checkpoint names of SPEC §3.3 (`__metadata__["config"]` holds the PCH
config), plus `input.content [B, L, d_content]`, `input.lengths [B]` (int64), `loss.weights [B, L, d_out]`,
and for each mask M in (causal, diagonal): `out.M [B, L, d_out]` and `grad.M.<name>`, the gradients of
sum over valid positions of weights * out.

Run from the repository root: python3 tools/pch_fixture.py
"""

import json

import torch
from safetensors.torch import save_file

from pch_torch import Pch

torch.manual_seed(20240611)
torch.set_default_dtype(torch.float64)

CFG = {
    "d_content": 12, "d_model": 16, "n_layers": 2, "n_heads": 4, "d_ff": 24, "d_out": 6, "ln_eps": 1e-12,
    "positions": "learned", "max_len": 8, "input": "content", "dropout": 0.0, "item_tower": "causal",
}
B, L, LENGTHS = 3, 6, [6, 3, 1]

model = Pch(CFG)
model.spread()
content = torch.randn(B, L, CFG["d_content"])
weights = torch.randn(B, L, CFG["d_out"])
valid = (torch.arange(L)[None, :] < torch.tensor(LENGTHS)[:, None]).to(weights.dtype)[..., None]

tensors = model.tensors()
tensors["input.content"] = content
tensors["input.lengths"] = torch.tensor(LENGTHS, dtype=torch.int64)
tensors["loss.weights"] = weights
for kind in ("causal", "diagonal"):
    model.zero_grad()
    out = model(content, LENGTHS, kind)
    (out * weights * valid).sum().backward()
    tensors[f"out.{kind}"] = out.detach().clone()
    tensors.update({f"grad.{kind}.{name}": g for name, g in model.tensors(grad=True).items()})

save_file({k: v.contiguous() for k, v in tensors.items()}, "tests/fixtures/pch_torch.safetensors",
          metadata={"config": json.dumps(CFG)})
print(f"wrote {len(tensors)} tensors")
