"""Which orders 4 p the Williamson search of cbq_kernels.hadamard finds (odd primes p up to
hadamard.WILLIAMSON_MAX_P whose 4 p is not a Paley order), with the search's seconds, and a
check that every matrix found satisfies H H^T = 4 p I exactly; then the factorisation of
Llama-2's widths before (construction 1) and now.

    python scripts/williamson_orders.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cbq_kernels import hadamard


def main() -> None:
    for p in range(3, hadamard.WILLIAMSON_MAX_P + 1, 2):
        if not hadamard._is_odd_prime(p) or 4 * p in hadamard.small_orders():
            continue
        t0 = time.perf_counter()
        seq = hadamard.williamson_sequences(p)
        dt = time.perf_counter() - t0
        if seq is not None:
            h = hadamard.williamson(p)
            assert np.array_equal(h @ h.T, 4 * p * np.eye(4 * p, dtype=np.int64))
        print(f"p={p} order {4 * p}: {'found' if seq is not None else 'none'} ({dt:.3f} s)")
    for n in (4096, 11008, 13824, 28672):
        print(f"{n}: construction 1 {hadamard.factor(n, 1)}, now {hadamard.factor(n)}")


if __name__ == "__main__":
    main()
