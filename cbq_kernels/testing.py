"""Shape tables and tolerances shared by the tests and the benchmarks (one table each)."""

from __future__ import annotations

import contextlib

import torch

# Odd sizes on purpose: not multiples of any tile, word or group size.
ODD_M = (1, 3, 13, 67, 1151)
ODD_K = (1, 7, 13, 15, 17, 31, 33, 64, 65, 100, 172, 257)

# Packing shapes (N, K) small enough for the CPU, covering K % 4, % 8, % 16 != 0.
PACK_SHAPES_CPU = ((1, 1), (3, 7), (13, 17), (5, 33), (8, 64), (67, 100), (4, 172), (2, 513))

# Real projection shapes (N = out_features, K = in_features) of Llama-2 7B / 13B / 70B.
LLAMA_LINEAR_SHAPES = {
    "7b": {"qkvo": (4096, 4096), "gate_up": (11008, 4096), "down": (4096, 11008)},
    "13b": {"qkvo": (5120, 5120), "gate_up": (13824, 5120), "down": (5120, 13824)},
    "70b": {"q_o": (8192, 8192), "kv": (1024, 8192), "gate_up": (28672, 8192),
            "down": (8192, 28672)},
}  # fmt: skip

# The shape the packing benchmark and the large GPU tests use (70B gate/up, transposed).
PACK_BENCH_SHAPE = (8192, 28672)

# Error allowed against an fp32/fp64 reference after scaling, per output dtype: (rtol, atol).
# Integer work (pack, unpack, codes) and the dequantize contract are exact: no tolerance.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (8e-3, 1e-5),
}


def all_codes(rows: int, k: int, bits: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """(rows, k) uint8 codes in which each column position cycles through every code value.

    With ``rows >= 2**bits`` every value appears at every position of every packed word.
    """
    n = torch.arange(rows, device=device).unsqueeze(1)
    kk = torch.arange(k, device=device).unsqueeze(0)
    return ((n + kk) % (1 << bits)).to(torch.uint8)


@contextlib.contextmanager
def pytorch_paths_on_cpu():
    """Within the block, CPU tensors run the ops' PyTorch formulas even when Triton's
    interpreter is on (the tests' default): what a CPU user runs. For tests of the front end
    (generation, the CLI), not of the kernels, which their own tests run interpreted."""
    from cbq_kernels import _validate

    before = _validate._INTERPRET_ON_CPU[0]
    _validate._INTERPRET_ON_CPU[0] = False
    try:
        yield
    finally:
        _validate._INTERPRET_ON_CPU[0] = before
