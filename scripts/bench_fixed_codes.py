"""CPU cost of a fixed-code layer's quantized weight (forward + backward of
QLinear.weight_hat('soft')) with the direct expression (QLinear._direct_fixed, the default) and
through the LoRA-Rounding op, beside the layer's matmul at 4 x 256 tokens (DECISIONS, "Fixed
codes on the CPU skip the LoRA-Rounding op").

    python scripts/bench_fixed_codes.py
"""
import time

import torch

from cbq_ptq.config import parse_setting
from cbq_ptq.qlinear import QLinear

torch.set_num_threads(2)
st = parse_setting("W4A8")
for n, k in ((576, 1536), (1536, 576), (192, 576)):  # SmolLM2-135M's shapes
    x = torch.randn(4 * 256, k, requires_grad=True)
    times = {}
    for label in ("direct", "op", "matmul"):
        q = QLinear(torch.nn.Linear(k, n, bias=False), st, lora=False, learn_clipping=True)
        q._direct_fixed = label == "direct"
        q.start_from(torch.randint(0, 16, (n, k), dtype=torch.uint8), torch.ones(n, 1))

        def step(q=q, label=label, x=x):
            if label == "matmul":
                torch.nn.functional.linear(x, q.w.detach().requires_grad_()).sum().backward()
            else:
                q.weight_hat("soft")[0].sum().backward()

        step()
        t0 = time.perf_counter()
        for _ in range(20):
            step()
        times[label] = (time.perf_counter() - t0) / 20 * 1e3
    print(f"{n} x {k}: " + ", ".join(f"{k_} {v:.2f} ms" for k_, v in times.items()), flush=True)
