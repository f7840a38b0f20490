"""Times one PCH training step (forward + backward, float32, eager) in PyTorch on the CPU: the official LEARN
module structure (adaptor Linear -> transformers BertEncoder with an additive causal mask -> Linear head ->
F.normalize), the shape examples/pch_step.rs runs.
Usage: python3 tools/pch_speed.py [threads] [eager|sdpa] [small|base] [iterations]
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertEncoder

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
attn = sys.argv[2] if len(sys.argv) > 2 else "eager"
shape = sys.argv[3] if len(sys.argv) > 3 else "small"
iterations = int(sys.argv[4]) if len(sys.argv) > 4 else 20
torch.set_num_threads(threads)
torch.manual_seed(0)

SHAPES = {"small": (256, 4, 4, 1024, 8), "base": (768, 12, 12, 3072, 30)}  # d_model, layers, heads, d_ff, B
D, LAYERS, HEADS, FF, B = SHAPES[shape]
D_CONTENT, D_OUT, L = 512, 64, 80
adaptor = torch.nn.Linear(D_CONTENT, D)
encoder = BertEncoder(BertConfig(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                 intermediate_size=FF, hidden_act="gelu", layer_norm_eps=1e-12,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                 attn_implementation=attn))
head = torch.nn.Linear(D, D_OUT)
params = [p for m in (adaptor, encoder, head) for p in m.parameters()]

content = torch.randn(B, L, D_CONTENT)
weights = torch.randn(B, L, D_OUT)
causal = torch.ones(L, L, dtype=torch.bool).tril()
mask = torch.zeros(B, 1, L, L).masked_fill(~causal, torch.finfo(torch.float32).min)


def step():
    t0 = time.perf_counter()
    x = encoder(adaptor(content), attention_mask=mask).last_hidden_state
    out = F.normalize(head(x), p=2, dim=-1, eps=1e-12)
    loss = (out * weights).sum()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    for p in params:
        p.grad = None
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3


for _ in range(3):
    step()
cpu0, wall0 = time.process_time(), time.perf_counter()
times = sorted((step() for _ in range(iterations)), key=sum)
cpu, wall = (time.process_time() - cpu0) * 1e3 / iterations, (time.perf_counter() - wall0) * 1e3 / iterations
fwd, bwd = times[len(times) // 2]
print(f"torch {torch.__version__} {attn}, {shape} (d_model {D}, {LAYERS} layers, B {B}), {threads} threads: forward {fwd:.1f} ms + backward {bwd:.1f} ms "
      f"= {fwd + bwd:.1f} ms (median of {iterations}); mean {wall:.1f} ms wall, {cpu:.1f} ms CPU per step")
