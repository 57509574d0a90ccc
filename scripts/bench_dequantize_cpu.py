"""Speed of the compiled CPU dequantization (cbq::dequantize, csrc/pack_cpu.cpp), the CPU
forward of every served quantized layer: milliseconds and codes per second at SmolLM2-135M's
layer shapes, and bit equality with packing.dequantize_ref; then pack (save) and unpack with
their equality to pack_ref / unpack_ref.

    python scripts/bench_dequantize_cpu.py
"""

import platform
import time

import torch

from cbq_kernels import packing

SHAPES = [(1536, 576, 4, None), (576, 1536, 4, None), (1536, 576, 4, 64), (1536, 576, 2, 32),
          (1536, 576, 3, 64), (576, 1536, 8, None)]  # fmt: skip


def main() -> None:
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
          f"threads, torch {torch.__version__}")  # fmt: skip
    g = torch.Generator().manual_seed(0)
    for n, k, bits, gs in SHAPES:
        codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=g)
        packed = packing.pack(codes, bits)
        groups = 1 if gs is None else k // gs
        scales = torch.rand(n, groups, generator=g) + 0.1
        zeros = torch.randint(0, 2**bits, (n, groups), generator=g).float()
        out = packing.dequantize(packed, bits, k, scales, zeros, gs, torch.float32)
        same = torch.equal(out, packing.dequantize_ref(packed, bits, k, scales, zeros, gs,
                                                       torch.float32))  # fmt: skip
        reps = 20
        t = time.perf_counter()
        for _ in range(reps):
            packing.dequantize(packed, bits, k, scales, zeros, gs, torch.float32)
        dt = (time.perf_counter() - t) / reps
        print(f"{n} x {k}, {bits}-bit, group {gs or 'row'}: {dt * 1e3:.3f} ms, "
              f"{n * k / dt / 1e9:.2f} Gcodes/s, equal to the reference: {same}")
    for n, k, bits, _ in SHAPES:
        codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=g)
        packed = packing.pack(codes, bits)
        same = torch.equal(packed, packing.pack_ref(codes, bits)) and torch.equal(
            packing.unpack(packed, bits, k), packing.unpack_ref(packed, bits, k))
        times = {}
        calls = {"pack": lambda c=codes, b=bits: packing.pack(c, b),
                 "unpack": lambda p=packed, b=bits, k=k: packing.unpack(p, b, k)}
        for name, fn in calls.items():
            t = time.perf_counter()
            for _ in range(20):
                fn()
            times[name] = (time.perf_counter() - t) / 20
        print(f"{n} x {k}, {bits}-bit: pack {n * k / times['pack'] / 1e9:.2f} Gcodes/s, unpack "
              f"{n * k / times['unpack'] / 1e9:.2f} Gcodes/s, equal to the references: {same}")


if __name__ == "__main__":
    main()
