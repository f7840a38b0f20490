"""The Baichuan2-layout LLM built from transformers modules, shared by the embedding fixture generator
(tools/golden/make_embed_fixtures.py) and the embedding peers (tools/peer/cpu_embed.py, embed_hf.py). The PCH model
lives in tools/pch_torch.py.

`llama_model` builds a Baichuan2-layout model (SPEC §2.1) as `transformers.LlamaModel` with
num_key_value_heads = num_attention_heads, no biases, and W_pack split into q/k/v (SPEC §2.2).
"""

import torch
from transformers import LlamaConfig, LlamaModel


def llama_model(cfg, weights, dtype=torch.float32, attn="sdpa"):
    """LlamaModel holding `weights` (name -> tensor, Baichuan2 names) in `dtype`, in eval mode.

    `cfg` is the model's config.json as a dict; `lm_head.weight` and `rotary_emb` buffers are skipped.
    """
    d = cfg["hidden_size"]
    config = LlamaConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=d,
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_attention_heads"],
        max_position_embeddings=cfg.get("max_position_embeddings", cfg.get("model_max_length")),
        rms_norm_eps=cfg["rms_norm_eps"],
        rope_theta=cfg.get("rope_theta", 10000.0),
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
    )
    config._attn_implementation = attn
    model = LlamaModel(config).to(dtype).eval()
    state = {}
    for name, t in weights.items():
        t = t.to(dtype)
        if not name.startswith("model."):
            continue
        name = name[len("model."):]
        if name.endswith("self_attn.W_pack.weight"):
            q, k, v = t.split(d, dim=0)
            base = name[: -len("W_pack.weight")]
            state[base + "q_proj.weight"], state[base + "k_proj.weight"], state[base + "v_proj.weight"] = q, k, v
        elif "rotary_emb" not in name:
            state[name] = t
    model.load_state_dict(state, strict=True)
    return model


def padded_batches(lengths, budget):
    """Indices sorted by length (stable), cut so that count × longest ≤ budget (a single longer item
    stands alone): the peers' batching, the same token budget as learn-kern's."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[i] > budget:
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current] if current else batches
