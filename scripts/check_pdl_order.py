"""No global load of the decode kernel above griddepcontrol.wait (ACQBULK in the SASS).

With programmatic dependent launch the kernel in front of a decode GEMM writes x while the GEMM
runs its prologue, so every global load (LDG; the weight copies LDGSTS read what no kernel
writes and may go first) must sit below ACQBULK. ptxas moved two ld.global.nc loads of the
activation register ring above it once (csrc/gemm_decode.cu, the comment above ALoad).

    python scripts/check_pdl_order.py [BINARY]   # default: the built cbq_kernels/_C*.so
Needs cuobjdump (CUDA toolkit, or the PyPI wheel nvidia-cuda-cuobjdump) on PATH or in
$CUOBJDUMP. Exit status 1 when an instance loads above ACQBULK, 2 when nothing was checked."""

import glob
import os
import re
import subprocess
import sys
from pathlib import Path


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    binary = sys.argv[1] if len(sys.argv) > 1 else next(
        iter(sorted(glob.glob(str(root / "cbq_kernels" / "_C*.so")))), None)
    if binary is None:
        print("check_pdl_order: no built extension (cbq_kernels/_C*.so); pass a binary")
        return 2
    tool = os.environ.get("CUOBJDUMP", "cuobjdump")
    try:
        sass = subprocess.run([tool, "-sass", binary], capture_output=True, text=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"check_pdl_order: cuobjdump -sass {binary} failed ({tool}): {e}")
        return 2
    checked = bad = 0
    for part in re.split(r"\n\s+Function : ", sass)[1:]:
        name, body = part.split("\n", 1)
        if "decode_kernel" not in name:
            continue
        lines = body.split("\n")
        acq = [i for i, s in enumerate(lines) if "ACQBULK" in s]
        loads = [i for i, s in enumerate(lines) if re.search(r"\bLDG\.E", s)]
        if not acq:
            continue
        checked += 1
        if loads and min(loads) < acq[0]:
            bad += 1
            print(f"LDG above ACQBULK: {name.strip()}: {lines[min(loads)].strip()[:90]}")
    print(f"check_pdl_order: {checked} decode-kernel instances, {bad} with a load above ACQBULK")
    return 1 if bad else (0 if checked else 2)


if __name__ == "__main__":
    sys.exit(main())
