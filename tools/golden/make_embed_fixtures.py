#!/usr/bin/env python3
"""Golden fixtures for the LLM forward pass and pooling (SPEC §2.2, §2.3), checked by tests/golden_embed.rs.

Writes two small random models in the Baichuan2 layout under tests/fixtures/embed/, each with a BPE
tokenizer.json trained here (Llama style: byte fallback, "▁" for spaces) on the mixed English/Chinese corpus
below, and an expected.json holding, for a set of item texts, the token ids Python produces and the content
embedding that transformers.LlamaModel computes in float64:

  f32_single/    float32 weights in one model.safetensors (with lm_head.weight and rotary_emb.inv_freq, which a
                 loader must skip); 3 layers; tokenizer adds <s> through its post-processor;
  bf16_sharded/  bfloat16 weights in two shards listed by model.safetensors.index.json; 2 layers, another RoPE
                 base and a large eps, model_max_length in place of max_position_embeddings; tokenizer adds no <s>.

The reference is LlamaModel with num_key_value_heads = num_attention_heads, no biases, W_pack split into
q/k/v, run in float64 (bf16 weights upcast, so both sides use the same values) with SDPA attention so softmax
stays in float64; Hugging Face keeps RMSNorm statistics and RoPE angles in float32, as SPEC §2.2 asks.
Embedding = mean of last_hidden_state over the tokens, L2-normalised (torch.nn.functional.normalize).

Regenerate (CPU only, a few seconds; needs torch, transformers, tokenizers, safetensors):
    python3 tools/golden/make_embed_fixtures.py            # from the repository root
then run `cargo test --test golden_embed`. Everything is seeded, but a new tokenizers release may train a
slightly different vocabulary: regenerate all fixtures together and commit them with this script.
"""

import json
import os
import shutil
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llama_torch import llama_model  # noqa: E402  (tools/llama_torch.py)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "embed")
MAX_TOKENS = 40

# Training text for the tokenizer: catalogue-like lines in English and Chinese, written for this script.
CORPUS = [
    "Wireless noise cancelling headphones with a long battery life and a soft carrying case.",
    "Stainless steel water bottle, keeps drinks cold for a full day at the beach or in the office.",
    "Running shoes for men and women, light mesh upper, cushioned sole, sizes from 36 to 46.",
    "A quiet mechanical keyboard with warm white backlight and keys that feel crisp under the fingers.",
    "Organic green tea from the mountains, picked in early spring and dried by hand.",
    "Title: Ceramic coffee mug\nCategory: Kitchen\nBrand: Morning Light\nPrice: 12.99",
    "Title: Cotton bed sheets\nCategory: Home\nKeywords: soft, breathable, queen size",
    "The camera takes sharp photos in low light and records video at sixty frames per second.",
    "Children love this wooden puzzle: bright colours, rounded edges, and pieces that fit small hands.",
    "Fresh mango, sweet and juicy, shipped cold within two days of harvest.",
    "无线降噪耳机，续航时间长，附带柔软的收纳包。",
    "不锈钢保温杯，可以让饮料保持一整天的低温，适合户外和办公室使用。",
    "男女通用跑步鞋，透气网面，缓震鞋底，尺码从三十六到四十六。",
    "有机绿茶，产自高山茶园，早春采摘，手工烘干，香气清新。",
    "标题：陶瓷咖啡杯\n类目：厨房用品\n品牌：晨光\n价格：九十九元",
    "这款相机在弱光环境下也能拍出清晰的照片，视频可以达到每秒六十帧。",
    "儿童木制拼图，颜色鲜艳，边角圆润，适合小朋友的小手。",
    "新鲜芒果，香甜多汁，采摘后两天内冷链发货。",
    "推荐给喜欢运动的用户：轻便的运动背包和速干毛巾。",
    "用户购买了耳机之后，常常还会购买充电器和数据线。",
    "Bluetooth speaker 蓝牙音箱, waterproof 防水, 12 hours of music 十二小时播放.",
    "Price 价格: 199 yuan 元, free shipping 包邮, 7-day returns 七天无理由退货.",
    "Customers who bought this phone case also bought a screen protector and a charging cable.",
    "Recommended for you: books about cooking, travel guides, and a notebook with a linen cover.",
]

# Item texts for the fixtures: English, Chinese, mixed, emoji and characters the corpus never saw (byte
# fallback), odd whitespace, and texts longer than MAX_TOKENS.
ITEMS = [
    "Wireless headphones",
    "无线降噪耳机",
    "Title: Ceramic coffee mug\nCategory: Kitchen\nPrice: 12.99",
    "跑步鞋 running shoes 🏃‍♀️👟 size 42",
    "  two  leading spaces and  double  spaces ",
    "Rare characters: 龘 鱻 and accents: café, naïve, Ørsted",
    "x",
    "🎁🎉",
    " ".join(CORPUS[:3]),
    "".join(CORPUS[10:14]),
    "Mixed 中英文 text with numbers 2024 and symbols #@%&* that repeat: " + "推荐 recommend " * 6,
]
HIDDEN_ITEM = 3  # the item whose whole last_hidden_state is also stored


def train_tokenizer():
    """A Llama-style BPE: byte-fallback tokens <0x00>..<0xFF>, spaces as ▁ with one prepended."""
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # Training splits on ▁ so merges stay inside words; encoding then runs, as Llama's converted tokenizer
    # does, with a normalizer and no pre-tokenizer.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials + byte_tokens, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.pre_tokenizer = None
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    spec = json.loads(tok.to_str())
    # The byte tokens are ordinary vocabulary entries for byte fallback, not added tokens matched in text.
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in specials]
    return Tokenizer.from_str(json.dumps(spec))


def with_bos(tok, bos):
    tok = Tokenizer.from_str(tok.to_str())
    if bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    return tok


def encode_all(tok_path):
    """Token ids as Python tokenizes for a model: the tokenizers library and transformers must agree."""
    tok = Tokenizer.from_file(tok_path)
    tok.enable_truncation(max_length=MAX_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_file=tok_path)
    ids = []
    for text in ITEMS:
        a = tok.encode(text).ids
        b = fast(text, max_length=MAX_TOKENS, truncation=True)["input_ids"]
        assert a == b, (text, a, b)
        ids.append(a)
    return ids


def random_weights(cfg, gen):
    d, f, v, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]

    def normal(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * std + mean

    w = {"model.embed_tokens.weight": normal(v, d), "model.norm.weight": normal(d, std=0.2, mean=1.0)}
    for i in range(layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = normal(d, std=0.2, mean=1.0)
        # Large enough that attention is far from uniform: softmax and causality matter.
        w[p + "self_attn.W_pack.weight"] = normal(3 * d, d, std=0.18)
        w[p + "self_attn.o_proj.weight"] = normal(d, d, std=0.1)
        w[p + "post_attention_layernorm.weight"] = normal(d, std=0.2, mean=1.0)
        w[p + "mlp.gate_proj.weight"] = normal(f, d, std=d**-0.5)
        w[p + "mlp.up_proj.weight"] = normal(f, d, std=d**-0.5)
        w[p + "mlp.down_proj.weight"] = normal(d, f, std=f**-0.5)
    return w


def reference(cfg, weights, ids_list):
    """Embeddings (and one whole last_hidden_state) from transformers.LlamaModel in float64."""
    model = llama_model(cfg, weights, torch.float64)
    embeddings, hidden = [], None
    with torch.no_grad():
        for i, ids in enumerate(ids_list):
            y = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
            embeddings.append(F.normalize(y.mean(0), dim=0, eps=1e-12))
            if i == HIDDEN_ITEM:
                hidden = y
    return embeddings, hidden


def short(x):
    # Nine significant digits are far below the 1e-4 tolerance and keep the JSON small.
    return float(f"{x:.9g}")


def write_fixture(name, cfg, tok, bos, dtype, shards, extra_tensors, seed):
    out = os.path.join(OUT, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    gen = torch.Generator().manual_seed(seed)
    weights = random_weights(cfg, gen)
    weights = {k: v.to(dtype) for k, v in weights.items()}
    stored = dict(weights)
    if extra_tensors:
        # Present in real checkpoints, never used: the loader must skip them.
        stored["lm_head.weight"] = torch.randn(cfg["vocab_size"], cfg["hidden_size"], generator=gen).to(dtype)
        stored["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(cfg["hidden_size"] // 8)
    if shards == 1:
        save_file(stored, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    else:
        # Shard 1: the embedding and layer 0; shard 2: the rest.
        files = [f"model-{s + 1:05d}-of-{shards:05d}.safetensors" for s in range(shards)]
        first = lambda n: n.startswith("model.embed_tokens") or n.startswith("model.layers.0.")
        parts = [{k: v for k, v in stored.items() if first(k)}, {k: v for k, v in stored.items() if not first(k)}]
        weight_map = {}
        for file, part in zip(files, parts):
            save_file(part, os.path.join(out, file), metadata={"format": "pt"})
            weight_map.update({k: file for k in part})
        total = sum(v.numel() * v.element_size() for v in stored.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as fh:
            json.dump(index, fh, indent=2)
    config = {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", "hidden_act": "silu", **cfg}
    config["torch_dtype"] = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    with open(os.path.join(out, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    tok_path = os.path.join(out, "tokenizer.json")
    with_bos(tok, bos).save(tok_path)

    ids = encode_all(tok_path)
    assert all(len(i) <= MAX_TOKENS for i in ids)
    assert any(len(i) == MAX_TOKENS for i in ids), "some item must be truncated"
    bos_id = tok.token_to_id("<s>")
    assert all((i[0] == bos_id) == bos for i in ids)
    embeddings, hidden = reference(cfg, weights, ids)
    expected = {
        "generator": "tools/golden/make_embed_fixtures.py",
        "max_tokens": MAX_TOKENS,
        "items": [
            {"text": t, "ids": i, "embedding": [short(x) for x in e.tolist()]}
            for t, i, e in zip(ITEMS, ids, embeddings)
        ],
        "last_hidden_state": {"item": HIDDEN_ITEM, "values": [[short(x) for x in row] for row in hidden.tolist()]},
    }
    with open(os.path.join(out, "expected.json"), "w") as fh:
        json.dump(expected, fh, ensure_ascii=False)
        fh.write("\n")
    return ids


def main():
    torch.manual_seed(0)
    tok = train_tokenizer()
    vocab = tok.get_vocab_size()
    common = {"hidden_size": 64, "intermediate_size": 176, "num_attention_heads": 4, "vocab_size": vocab}
    a = dict(common, num_hidden_layers=3, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=128)
    # An eps this large moves the outputs well past the tolerance, so a loader that ignored it would fail.
    b = dict(common, num_hidden_layers=2, rms_norm_eps=0.02, rope_theta=5000.0, model_max_length=96)
    ids_a = write_fixture("f32_single", a, tok, True, torch.float32, 1, True, seed=1)
    ids_b = write_fixture("bf16_sharded", b, tok, False, torch.bfloat16, 2, False, seed=2)
    byte_fallback = sum(1 for ids in ids_a for i in ids if 3 <= i < 3 + 256)
    assert byte_fallback > 0, "the items must exercise byte fallback"
    print(f"vocab {vocab}; token counts {[len(i) for i in ids_b]}; byte-fallback tokens {byte_fallback}")
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    sys.exit(main())
