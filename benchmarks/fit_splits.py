"""Fit the split-K model's M > 8 terms (cbq_kernels.gemm_decode.SPLIT_ROW_COST, INT_CHUNK_COST)
to sweeps of benchmarks/sweep_decode.py: for each candidate pair, the split each row's
model picks (on 132 SMs) and that split's measured time against the row's best; prints the
best pairs (mean and max excess over the best split, total us saved against the sweep's
"default" column) and the rows at the committed constants. No GPU needed.

    python benchmarks/fit_splits.py [SWEEP_FILE ...]   (default: the file named below)
"""

import math
import re
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cbq_kernels import gemm_decode
from cbq_kernels.testing import LLAMA_LINEAR_SHAPES

RESULTS = Path(__file__).resolve().parent / "results"
# later files replace earlier rows; the committed constants' sweep (H100, four-column epilogue)
FILES = [RESULTS / "h100" / "sweep_decode_epi_2483d26" / "fit.txt"]
SPLITS = (1, 2, 3, 4, 6, 8, 12, 16, 24)
ROW = re.compile(r"(\S+) (\S+) (\d+) (\d+) \|(.*)\| S=")


def read(files) -> dict:
    rows = {}
    for f in files:
        for line in Path(f).read_text().splitlines():
            if m := ROW.match(line):
                shape, kind, em, default, times = m.groups()
                rows[(shape, kind, int(em))] = (int(default), [float(v) for v in times.split()])
    return rows


def at(times: list[float], s: int) -> float:
    """The measured time of the swept split nearest to s."""
    return times[SPLITS.index(min(SPLITS, key=lambda v: abs(v - s)))]


def score(rows: dict, row_cost: float, int_cost: float, show: bool = False):
    excess, saved = [], 0.0
    with mock.patch.object(gemm_decode, "SPLIT_ROW_COST", row_cost), \
         mock.patch.object(gemm_decode, "INT_CHUNK_COST", int_cost), \
         mock.patch.object(gemm_decode, "_sm_count", lambda index: 132):  # fmt: skip
        for (shape, kind, m), (default, times) in sorted(rows.items()):
            model, layer = shape.split("_", 1)
            n, k = LLAMA_LINEAR_SHAPES[model][layer]
            bits = 2 if kind.startswith("w2") else 4
            n_tiles, chunks = -(-n // gemm_decode.TILE_N), k // gemm_decode.chunk_k(bits)
            gemm_decode.default_splits.cache_clear()
            s = gemm_decode.default_splits(n_tiles, chunks, torch.device("cpu"), m,
                                           kind == "w4a8")  # fmt: skip
            best = min(t for t in times if not math.isnan(t))
            excess.append(at(times, s) / best - 1)
            saved += at(times, default) - at(times, s)
            if show:
                print(f"{shape:12s} {kind:11s} M={m:2d} sweep default S={default:2d} "
                      f"{at(times, default):6.1f} | model S={s:2d} {at(times, s):6.1f} | "
                      f"best {best:6.1f}")  # fmt: skip
    gemm_decode.default_splits.cache_clear()
    return sum(excess) / len(excess), max(excess), saved


def main() -> None:
    rows = read(sys.argv[1:] or FILES)
    grid = [(score(rows, r, c), r, c) for r in (0, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4)
            for c in (1.0, 0.75, 0.5, 0.35, 0.25)]  # fmt: skip
    print("mean excess, max excess, us saved vs the sweep's default | row cost, int chunk cost")
    for (mean, worst, saved), r, c in sorted(grid)[:6]:
        print(f"{mean:.4f} {worst:.3f} {saved:6.1f} | {r} {c}")
    print(f"\nat the committed constants ({gemm_decode.SPLIT_ROW_COST}, "
          f"{gemm_decode.INT_CHUNK_COST}):")  # fmt: skip
    score(rows, gemm_decode.SPLIT_ROW_COST, gemm_decode.INT_CHUNK_COST, show=True)


if __name__ == "__main__":
    main()
