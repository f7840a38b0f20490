#!/usr/bin/env python3
"""Peers of `learn-kern bench embed` (SPEC §7): the same model shape, items and token budget through
Hugging Face transformers, in fp16 on the same GPU, printing the same JSON.

Two styles:
  --mode batched  LlamaModel with SDPA attention over length-sorted, right-padded batches, each holding at
                  most --batch-tokens padded tokens (count × longest), mean-pooled over the attention mask;
                  the strongest plain-PyTorch way to embed a catalogue.
  --mode bs1      the official LEARN extraction style: one item per forward pass (batch size 1, no padding),
                  mean over its tokens.
Both L2-normalise, as learn-kern does, and time everything from token ids on the host to embeddings on the
host. Baichuan2 is LlamaModel with fused W_pack and no biases (SPEC §2.2), so LlamaModel with
num_key_value_heads = num_attention_heads has exactly its shapes and operations. Weights are random
(initialised on the device in fp16): throughput does not depend on their values.

usage: embed_hf.py --preset baichuan2-7b --lengths lengths.txt [--mode batched|bs1] [--json FILE]
"""

import argparse
import json
import os
import random
import sys
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llama_torch import padded_batches  # noqa: E402  (tools/llama_torch.py)

PRESETS = {  # hidden, intermediate, layers, heads, vocab — as src/llm/config.rs
    "tiny": (128, 352, 2, 4, 4096),
    "small": (512, 1376, 4, 8, 4096),
    "baichuan2-7b": (4096, 11008, 32, 32, 125696),
}


def build_model(preset, device):
    d, f, layers, heads, vocab = PRESETS[preset]
    config = LlamaConfig(
        hidden_size=d,
        intermediate_size=f,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        attention_bias=False,
        mlp_bias=False,
    )
    config._attn_implementation = "sdpa"
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in fp16 directly: a 7B fp32 copy would not fit a V100
    try:
        with torch.device(device):
            model = LlamaModel(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    flops_per_token = 2 * layers * (4 * d * d + 3 * d * f)
    return model, vocab, flops_per_token, d, layers


@torch.inference_mode()
def embed_batch(model, seqs, device):
    longest = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), longest), dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s)
        mask[row, : len(s)] = 1
    ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1, dtype=torch.float32) / m.sum(1, dtype=torch.float32)
    return F.normalize(pooled, dim=-1).cpu()


@torch.inference_mode()
def embed_one(model, seq, device):
    ids = torch.tensor([seq], dtype=torch.long).to(device)
    hidden = model(input_ids=ids).last_hidden_state
    return F.normalize(hidden.float().mean(1), dim=-1).cpu()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="baichuan2-7b", choices=sorted(PRESETS))
    p.add_argument("--lengths", required=True, help="item lengths, one per line (learn-kern bench --save-lengths)")
    p.add_argument("--mode", default="batched", choices=["batched", "bs1"])
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per batch (batched mode)")
    p.add_argument("--max-items", type=int, default=0, help="run only the first N items (bs1 is slow); 0 = all")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", help="write the report here as well as to stdout")
    args = p.parse_args()

    lengths = [int(line) for line in open(args.lengths) if line.strip()]
    if args.max_items:
        lengths = lengths[: args.max_items]
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model, vocab, flops_per_token, d, layers = build_model(args.preset, device)
    rng = random.Random(args.seed)
    items = [[rng.randrange(vocab) for _ in range(n)] for n in lengths]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    if args.mode == "batched":
        batches = padded_batches(lengths, args.batch_tokens)
        for batch in batches[-args.warmup :] if args.warmup else []:
            embed_batch(model, [items[i] for i in batch], device)
        sync()
        start = time.perf_counter()
        for batch in batches:
            embed_batch(model, [items[i] for i in batch], device)
        sync()
        seconds = time.perf_counter() - start
        padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        engine, batch_count = "hf-llama-fp16-sdpa-batched", len(batches)
    else:
        for seq in items[: args.warmup]:
            embed_one(model, seq, device)
        sync()
        start = time.perf_counter()
        for seq in items:
            embed_one(model, seq, device)
        sync()
        seconds = time.perf_counter() - start
        padded, engine, batch_count = sum(lengths), "learn-official-bs1-fp16", len(items)

    tokens = sum(lengths)
    attention = sum(layers * n * (n + 1) // 2 * 4 * d for n in lengths)
    report = {
        "bench": "embed",
        "engine": engine,
        "preset": args.preset,
        "device": {"name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "torch": torch.__version__},
        "batch_tokens": args.batch_tokens if args.mode == "batched" else None,
        "items": len(items),
        "tokens": tokens,
        "batches": batch_count,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "items_per_s": len(items) / seconds,
        "tflops": (tokens * flops_per_token + attention) / seconds / 1e12,
        "padding_efficiency": tokens / padded,
        "memory": {"peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None},
    }
    text = json.dumps(report, indent=2)
    if args.json:
        with open(args.json, "w") as out:
            out.write(text + "\n")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
