"""Registers and local-memory spills of the fused Hadamard + quantization kernel
(cbq_kernels.hadamard_quant) for Hopper, measured without a GPU: Triton compiles the kernel
ahead of time for sm_90a (``triton.compile`` with a ``GPUTarget``), then ``ptxas -v`` (the CUDA
toolkit's; the PTX's ``.version`` line is lowered to what that ptxas reads) prints what the
kernel uses per thread. Triton's own ptxas may be older than its PTX: hence the toolkit's.

    python scripts/triton_ptxas.py [--ptxas ptxas] [--max-m-pad M] [N:BITS:ROWS:WARPS ...]

``--max-m-pad`` raises the fused tile's limit on the padded small factor (hadamard_quant.
_MAX_M_PAD, 64) for this compile only: what a wider tile would use (11008 = 172 x 64 needs 256).

Default configurations: each fused width at its default (rows, warps) (`_config`), and 28672 at
16 warps. The numbers belong to the Triton version that runs the script (printed first).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cbq_kernels import hadamard_quant
from cbq_kernels.hadamard_quant import _config, _hadamard_quant_kernel, _tile

SIGNATURE = {"x_ptr": "*bf16", "sg_ptr": "*fp32", "a_ptr": "*fp16", "h1_ptr": "*fp16",
             "h2_ptr": "*fp16", "q_ptr": "*i32", "s_ptr": "*fp32", "T": "i32", "N": "i32",
             "M": "i32", "ratio": "fp32", "P": "fp32", "inv_sqrt_n": "fp32"}  # fmt: skip
CONSTEXPRS = ("BITS", "R", "MP", "P1", "P2", "EXACT_IN", "PER_WORD")


def usage(n: int, bits: int, rows: int, warps: int, ptxas: str, ptx_version: str) -> str:
    mp, p1, p2 = _tile(n)
    const = {"BITS": bits, "R": rows, "MP": mp, "P1": p1, "P2": p2, "EXACT_IN": True,
             "PER_WORD": 4 if bits == 8 else 8}  # fmt: skip
    sig = dict(SIGNATURE, **dict.fromkeys(CONSTEXPRS, "constexpr"))
    k = triton.compile(ASTSource(fn=_hadamard_quant_kernel, signature=sig, constexprs=const),
                       target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "enable_fp_fusion": False})  # fmt: skip
    ptx = re.sub(r"^\.version \d+\.\d+", f".version {ptx_version}", k.asm["ptx"], flags=re.M)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(src), "-o", str(Path(d) / "k.o")],
                           capture_output=True, text=True, check=True)  # fmt: skip
    info = "; ".join(line.split("info    : ")[-1].strip() for line in r.stderr.splitlines()
                     if "Used" in line or "spill" in line)  # fmt: skip
    return (f"n={n} bits={bits} tile=({mp},{p1},{p2}) rows={rows} warps={warps}: "
            f"shared {k.metadata.shared} B; {info}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("configs", nargs="*")
    ap.add_argument("--ptxas", default="ptxas")
    ap.add_argument("--ptx-version", default="8.8")
    ap.add_argument("--max-m-pad", type=int, default=None)
    args = ap.parse_args()
    if args.max_m_pad is not None:
        hadamard_quant._MAX_M_PAD = args.max_m_pad  # read by _tile at each call
    configs = [tuple(int(v) for v in c.split(":")) for c in args.configs]
    if not configs:
        for n in (1536, 4096, 28672):
            rows, warps = _config(_tile(n)[0] * _tile(n)[1] * _tile(n)[2])
            configs += [(n, b, rows, warps) for b in (8, 4)]
        configs += [(28672, 8, 1, 16)]
    ver = subprocess.run([args.ptxas, "--version"], capture_output=True, text=True).stdout
    print(f"# triton {triton.__version__}; {ver.strip().splitlines()[-1]}; target sm_90a")
    for n, bits, rows, warps in configs:
        print(usage(n, bits, rows, warps, args.ptxas, args.ptx_version), flush=True)


if __name__ == "__main__":
    main()
