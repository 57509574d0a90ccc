"""Summary of a bench_gemm.csv against the targets of KERNELS.md, and a plot of speedup vs M.

    python benchmarks/summarize_gemm.py benchmarks/results/h100/bench_gemm.csv

writes bench_gemm_summary.md (and bench_gemm_speedup.png when matplotlib is installed)
beside the CSV. Targets checked, each per layer shape:

* W4A8 / W4A4 at M >= 2048: >= 1.5x cuBLAS bf16 and >= 1.0x torch._int_mm;
* M <= 16 at K = 8192, N = 28672: W4A8 / W4A4 / W4A16 <= 50 us, W2A16 <= 30 us;
* weight-only at M = 4096: >= 0.9x cuBLAS bf16.
"""

from __future__ import annotations

import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

INT_KERNELS = ("w4a8", "w4a8_g128", "w4a4")
WONLY_KERNELS = ("w4a16_g128", "w2a16_g128")
DECODE_LIMIT_MS = {"w4a8": 0.050, "w4a8_g128": 0.050, "w4a4": 0.050, "w4a16_g128": 0.050,
                   "w2a16_g128": 0.030}  # fmt: skip


def load(path: Path) -> dict[tuple[str, int, int, int], dict[str, float]]:
    """{(layer, M, N, K): {provider: p50_ms}}."""
    times: dict[tuple[str, int, int, int], dict[str, float]] = defaultdict(dict)
    with path.open() as f:
        for row in csv.DictReader(f):
            m, n, k = (int(v) for v in row["shape"].split("x"))
            times[(row["op"], m, n, k)][row["provider"]] = float(row["p50_ms"])
    return dict(times)


def _ratio(t: dict[str, float], base: str, prov: str) -> float | None:
    return t[base] / t[prov] if base in t and prov in t else None


def summarize(times: dict[tuple[str, int, int, int], dict[str, float]]) -> str:
    lines = ["# Quantized GEMMs against the targets", ""]
    # 1. Large M: integer kernels vs bf16 and _int_mm.
    lines += ["## W4A8 / W4A4 at M >= 2048 (target >= 1.5x bf16 and >= 1.0x `_int_mm`)", "",
              "| layer | M | N | K | kernel | x bf16 | x int_mm | x scaled_mm (fp8) | met |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (layer, m, n, k), t in sorted(times.items()):
        if m < 2048:
            continue
        for prov in INT_KERNELS:
            vb, vi, vf = (_ratio(t, b, prov) for b in ("cublas_bf16", "int_mm", "scaled_mm"))
            if vb is None:
                continue
            met = vb >= 1.5 and (vi or 0) >= 1.0
            lines.append(
                f"| {layer} | {m} | {n} | {k} | {prov} | {vb:.2f} | "
                f"{vi if vi is None else round(vi, 2)} | "
                f"{vf if vf is None else round(vf, 2)} | {'yes' if met else 'no'} |"
            )
    # 2. Decode at K = 8192, N = 28672.
    lines += [
        "",
        "## M <= 16 at K = 8192, N = 28672 (W4 <= 50 us, W2A16 <= 30 us)",
        "",
        "| M | kernel | time (us) | limit (us) | bf16 (us) | met |",
        "|---|---|---|---|---|---|",
    ]
    for (_layer, m, n, k), t in sorted(times.items()):
        if m > 16 or (n, k) != (28672, 8192):
            continue
        for prov, limit in DECODE_LIMIT_MS.items():
            if prov in t:
                ok = "yes" if t[prov] <= limit else "no"
                lines.append(
                    f"| {m} | {prov} | {t[prov] * 1e3:.1f} | {limit * 1e3:.0f} | "
                    f"{t.get('cublas_bf16', float('nan')) * 1e3:.1f} | {ok} |"
                )
    # 3. Weight-only at M = 4096.
    lines += [
        "",
        "## Weight-only at M = 4096 (target >= 0.9x bf16)",
        "",
        "| layer | N | K | kernel | x bf16 | met |",
        "|---|---|---|---|---|---|",
    ]
    for (layer, m, n, k), t in sorted(times.items()):
        if m != 4096:
            continue
        for prov in WONLY_KERNELS:
            v = _ratio(t, "cublas_bf16", prov)
            if v is not None:
                lines.append(
                    f"| {layer} | {n} | {k} | {prov} | {v:.2f} | {'yes' if v >= 0.9 else 'no'} |"
                )
    return "\n".join(lines) + "\n"


def speedup_by_m(times) -> dict[str, dict[int, float]]:
    """Median over layer shapes of (bf16 time / provider time), per provider and M."""
    acc: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (_layer, m, _n, _k), t in times.items():
        for prov in t:
            if prov != "cublas_bf16" and (v := _ratio(t, "cublas_bf16", prov)) is not None:
                acc[prov][m].append(v)
    return {p: {m: statistics.median(v) for m, v in sorted(d.items())} for p, d in acc.items()}


def plot(times, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for prov, series in sorted(speedup_by_m(times).items()):
        ax.plot(list(series), list(series.values()), marker="o", label=prov)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("M (tokens)")
    ax.set_ylabel("speedup vs cuBLAS bf16 (median over layer shapes)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", lw=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    path = Path(sys.argv[1])
    times = load(path)
    text = summarize(times)
    (path.parent / "bench_gemm_summary.md").write_text(text)
    drew = plot(times, path.parent / "bench_gemm_speedup.png")
    print(text + ("" if drew else "\n(matplotlib not installed: no plot)"))


if __name__ == "__main__":
    main()
