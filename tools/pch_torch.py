"""The PCH model of SPEC §3 as the official LEARN code builds it, in PyTorch: adaptor Linear ->
transformers BertEncoder under an additive mask -> Linear head -> F.normalize. Shared by the fixture
writers (tools/pch_fixture.py, tools/golden/make_train_fixtures.py) so that every Rust reference test
holds the engine to the same module.

Parameters are exposed under the checkpoint names of SPEC §3.3; BERT's separate query/key/value layers
become the row-wise concatenation `attn.qkv`.
"""

import torch
import torch.nn.functional as F
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertEncoder


class Pch(torch.nn.Module):
    """One tower (the user and item towers are the same module). `cfg` is the checkpoint config dict.
    Construction draws the default initialisations from torch's global RNG in a fixed order (adaptor,
    encoder, head), so a script that seeds torch gets the same model every run."""

    def __init__(self, cfg, attn="eager"):
        super().__init__()
        assert cfg.get("input", "content") == "content", "only content input is modelled here"
        assert cfg.get("dropout", 0.0) == 0.0, "dropout is random: no reference can follow it"
        self.cfg = cfg
        d = cfg["d_model"]
        self.adaptor = torch.nn.Linear(cfg["d_content"], d)
        self.pos_emb = (
            torch.nn.Parameter(torch.empty(cfg["max_len"], d)) if cfg.get("positions") == "learned" else None
        )
        self.encoder = BertEncoder(BertConfig(
            hidden_size=d, num_hidden_layers=cfg["n_layers"], num_attention_heads=cfg["n_heads"],
            intermediate_size=cfg["d_ff"], hidden_act="gelu", layer_norm_eps=cfg["ln_eps"],
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation=attn,
        ))
        self.head = torch.nn.Linear(d, cfg["d_out"])
        names = {id(p) for _, t in self.named_params() for p in (t if isinstance(t, tuple) else (t,))}
        assert names == {id(p) for p in self.parameters()}, "every parameter has a checkpoint name"

    def init_bert(self, generator):
        """BERT's initialisation (SPEC §3.3): weights N(0, 0.02²) drawn from `generator`, LayerNorm weights 1,
        biases 0."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "LayerNorm.weight" in name:
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.02)

    def spread(self):
        """Values far from BERT's tiny initialisation, so that every nonlinearity matters: linear weights
        N(0, 1/fan_in), LayerNorm weights 1 + N(0, 0.09), biases N(0, 0.09), positions N(0, 0.25)."""
        with torch.no_grad():
            for module in (self.adaptor, self.encoder, self.head):
                for name, p in module.named_parameters():
                    if "LayerNorm.weight" in name:
                        p.copy_(1.0 + 0.3 * torch.randn_like(p))
                    elif p.dim() == 2:
                        p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
                    else:
                        p.copy_(0.3 * torch.randn_like(p))
            if self.pos_emb is not None:
                self.pos_emb.copy_(0.5 * torch.randn_like(self.pos_emb))

    def named_params(self):
        """(checkpoint name, parameter or tuple of parameters stacked by rows) in canonical order."""
        out = [("adaptor.weight", self.adaptor.weight), ("adaptor.bias", self.adaptor.bias)]
        if self.pos_emb is not None:
            out.append(("pos_emb.weight", self.pos_emb))
        for l, layer in enumerate(self.encoder.layer):
            att = layer.attention
            out += [
                (f"layers.{l}.attn.qkv.weight", (att.self.query.weight, att.self.key.weight, att.self.value.weight)),
                (f"layers.{l}.attn.qkv.bias", (att.self.query.bias, att.self.key.bias, att.self.value.bias)),
                (f"layers.{l}.attn.out.weight", att.output.dense.weight),
                (f"layers.{l}.attn.out.bias", att.output.dense.bias),
                (f"layers.{l}.attn_norm.weight", att.output.LayerNorm.weight),
                (f"layers.{l}.attn_norm.bias", att.output.LayerNorm.bias),
                (f"layers.{l}.ffn.up.weight", layer.intermediate.dense.weight),
                (f"layers.{l}.ffn.up.bias", layer.intermediate.dense.bias),
                (f"layers.{l}.ffn.down.weight", layer.output.dense.weight),
                (f"layers.{l}.ffn.down.bias", layer.output.dense.bias),
                (f"layers.{l}.ffn_norm.weight", layer.output.LayerNorm.weight),
                (f"layers.{l}.ffn_norm.bias", layer.output.LayerNorm.bias),
            ]
        return out + [("head.weight", self.head.weight), ("head.bias", self.head.bias)]

    def tensors(self, grad=False):
        """{checkpoint name: value (or gradient)}, detached copies."""
        def value(t):
            parts = t if isinstance(t, tuple) else (t,)
            return torch.cat([p.grad if grad else p for p in parts]).detach().clone()
        return {name: value(t) for name, t in self.named_params()}

    def load(self, tensors):
        """Copies checkpoint tensors {name: value} into the parameters (splitting `attn.qkv` by rows)."""
        with torch.no_grad():
            for name, t in self.named_params():
                parts = t if isinstance(t, tuple) else (t,)
                for p, value in zip(parts, tensors[name].split([p.shape[0] for p in parts])):
                    p.copy_(value)

    def round_to_f32(self):
        """Rounds every parameter to float32 (keeping the dtype), so that this model and a checkpoint
        written in float32 hold the same numbers."""
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(p.float().to(p.dtype))

    def forward(self, content, lengths, kind):
        """Outputs [B, L, d_out] (unit rows) of right-padded content [B, L, d_content] with valid lengths."""
        L = content.shape[1]
        x = self.adaptor(content)
        if self.pos_emb is not None:
            x = x + self.pos_emb[:L]
        x = self.encoder(x, attention_mask=extended_mask(lengths, L, kind, x.dtype)).last_hidden_state
        return F.normalize(self.head(x), p=2, dim=-1, eps=1e-12)


def extended_mask(lengths, L, kind, dtype):
    """BERT's additive mask [B, 1, L, L]: 0 where the key is visible, the dtype's minimum elsewhere.
    causal: key <= query and key < length (SPEC §3.1); diagonal: each position sees only itself."""
    q = torch.arange(L)[:, None]
    k = torch.arange(L)[None, :]
    visible = torch.zeros(len(lengths), L, L, dtype=torch.bool)
    for b, n in enumerate(lengths):
        visible[b] = (k <= q) & (k < n) if kind == "causal" else (k == q)
    mask = torch.zeros(len(lengths), 1, L, L, dtype=dtype)
    mask.masked_fill_(~visible[:, None], torch.finfo(dtype).min)
    return mask
