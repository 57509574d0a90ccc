"""Packing benchmark (H100 target: >= 70% of the copy bandwidth measured in the same run).

pack / unpack / dequantize of 8192 x 28672 codes at 2 and 4 bits on the GPU, against
a device-to-device copy of the same tensor in bf16 and against the eager PyTorch references.
"cbq_kernel" rows time the CUDA kernel alone; "cbq_op" rows the public op as a user calls it
(argument checks, allocation, and for pack the read-back of the out-of-range flag, which
synchronises the stream).

    python benchmarks/bench_packing.py --out benchmarks/results
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Environment, Table, bench, cli, write_report
from cbq_kernels import formats
from cbq_kernels.packing import (
    _lib,
    _stream,
    dequantize,
    dequantize_ref,
    pack,
    pack_ref,
    unpack,
    unpack_ref,
)
from cbq_kernels.testing import PACK_BENCH_SHAPE

TARGET = 0.70


def bench_copy(table: Table, n: int, k: int) -> float:
    src = torch.randn((n, k), device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))
    nbytes = 2 * src.numel() * src.element_size()
    gbps = nbytes / t.p50_ms / 1e6
    table.add("copy", "torch.copy_", f"{n}x{k}", "bf16", t, nbytes=nbytes, copy_gbps=gbps)
    return gbps


def bench_bits(table: Table, n: int, k: int, bits: int, copy_gbps: float) -> None:
    shape, dev, lib = f"{n}x{k}", torch.device("cuda"), _lib()
    codes = torch.randint(0, 1 << bits, (n, k), device=dev, dtype=torch.uint8)
    packed = pack(codes, bits)
    codes_out = torch.empty_like(codes)
    flag = torch.zeros(1, dtype=torch.int32, device=dev)
    stream = _stream(dev)
    nbytes = codes.numel() + packed.numel() * 4

    def rows(op: str, dtype: str, nbytes: int, ref_fn, kernel_fn, op_fn, op_name="cbq_op"):
        ref = bench(ref_fn)
        table.add(op, "torch_ref", shape, dtype, ref, nbytes=nbytes, copy_gbps=copy_gbps)
        for name, fn in (("cbq_kernel", kernel_fn), (op_name, op_fn)):
            if fn is not None:
                table.add(op, name, shape, dtype, bench(fn), nbytes=nbytes, copy_gbps=copy_gbps,
                          baseline=ref, baseline_name="torch_ref")  # fmt: skip

    rows(
        f"pack_int{bits}", "uint8", nbytes,
        lambda: pack_ref(codes, bits),
        lambda: lib.pack_cuda(codes.data_ptr(), packed.data_ptr(), flag.data_ptr(), n, k, bits,
                              dev.index or 0, stream),
        lambda: pack(codes, bits),
        op_name="cbq_op(checked)",
    )  # fmt: skip
    rows(
        f"unpack_int{bits}", "uint8", nbytes,
        lambda: unpack_ref(packed, bits, k),
        lambda: lib.unpack_cuda(packed.data_ptr(), codes_out.data_ptr(), n, k, bits,
                                dev.index or 0, stream),
        lambda: unpack(packed, bits, k),
    )  # fmt: skip
    for group_size in (128, None):
        groups = 1 if group_size is None else formats.num_groups(k, group_size)
        scales = torch.rand((n, groups), device=dev) * 0.01
        zeros = torch.randint(0, 1 << bits, (n, groups), device=dev).float()
        args = (packed, bits, k, scales, zeros, group_size, torch.bfloat16)
        name = f"g{group_size}" if group_size else "perchannel"
        rows(
            f"dequant_int{bits}_{name}", "bf16",
            packed.numel() * 4 + 2 * scales.numel() * 4 + n * k * 2,
            lambda args=args: dequantize_ref(*args),
            None,
            lambda args=args: dequantize(*args),
        )  # fmt: skip


def main() -> None:
    out = cli(__doc__)

    torch.manual_seed(0)
    n, k = PACK_BENCH_SHAPE
    table = Table(Environment.detect())
    copy_gbps = bench_copy(table, n, k)
    for bits in (2, 4):
        bench_bits(table, n, k, bits, copy_gbps)

    note = (
        f"Shape {n}x{k} codes; target >= {TARGET:.0%} of the copy bandwidth "
        f"({copy_gbps:.0f} GB/s measured here); GB/s counts bytes read + written."
    )
    columns = ("op", "provider", "p50_ms", "gbps", "frac_copy_bw", "speedup", "baseline")
    print(write_report(table, out, "bench_packing", "Packing benchmark",
                       "benchmarks/bench_packing.py", columns, [note]))  # fmt: skip


if __name__ == "__main__":
    main()
