"""Summary of a bench_gemm.csv against issue 13's targets, and a plot of speedup vs M.

    python benchmarks/summarize_gemm.py benchmarks/results/h200/bench_gemm.csv [--out NAME]
    python benchmarks/summarize_gemm.py --merged DIR/bench_gemm.csv A.csv B.csv ...

writes bench_gemm_summary.md (and bench_gemm_speedup.png when matplotlib is installed)
beside the CSV (NAME.md and NAME_speedup.png with --out). ``--merged PATH``: the rows of
several runs (e.g. the decode M of one call and the prefill M of another) written to PATH
first, a later file's row replacing an earlier one of the same layer, provider and shape
(each row keeps its commit column), then summarized. Targets, per layer shape (the
API's kernels: the rows named w4a16_g128, w4a8, w4a8_g128, w4a4, w2a16_g128; variant rows
such as w4a4_fp8 are listed, not judged):

* decode, M in {1, 4, 16}: W4A16 g128 / W4A8 / W4A4 >= 3.0x cuBLAS bf16 on the 70B shapes
  and >= 2.0x on the 7B shapes; W2A16 g128 >= 4.5x on the 70B shapes; every decode row
  faster than fp8 ``_scaled_mm`` and than ``_weight_int4pack_mm``; the achieved bandwidth
  (weight + activation bytes / time) as a fraction of the copy rate of the same run (and of
  the read-only rate: a decode kernel only reads);
* prefill, M >= 2048: W4A8 / W4A4 >= 1.7x bf16 and >= 0.95x fp8 ``_scaled_mm``; W4A8 g128
  >= 1.3x bf16; W4A16 g128 / W2A16 g128 >= 0.95x bf16. The two-level grouped W4A8 rows
  (w4a8_g128_2lvl, w4a8_g64_2lvl) are judged against the W4A8 g128 target and counted apart.
"""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from pathlib import Path

DECODE_MS = (1, 4, 16)
W4 = ("w4a16_g128", "w4a8", "w4a4")
# (kernel, model prefix) -> minimum speedup over cuBLAS bf16 at decode
DECODE_SPEEDUP = {**{(k, "70b"): 3.0 for k in W4}, **{(k, "7b"): 2.0 for k in W4},
                  ("w2a16_g128", "70b"): 4.5}  # fmt: skip
DECODE_KERNELS = ("w4a16_g128", "w4a8", "w4a8_g128", "w4a4", "w2a16_g128")
# kernel -> (minimum x bf16, minimum x fp8 _scaled_mm or None) at M >= 2048
PREFILL = {"w4a8": (1.7, 0.95), "w4a4": (1.7, 0.95), "w4a8_g128": (1.3, None),
           "w4a16_g128": (0.95, None), "w2a16_g128": (0.95, None)}  # fmt: skip
PEERS = ("scaled_mm", "int4pack_mm")
# the two-level grouped W4A8 (int8 per channel, then 4-bit codes per group with integer
# scales: prepare_weight's channel_scales), the lever for its grouped target: judged
# against the W4A8 g128 target and counted apart (another weight format than the w4a8_g128
# row's float group scales)
TWO_LEVEL = ("w4a8_g128_2lvl", "w4a8_g64_2lvl")


def load(path: Path) -> tuple[dict, dict]:
    """({(layer, M, N, K): {provider: row}}, {provider of the bandwidth rows: GB/s}): rows
    whose shape is not M x N x K (the copy and read-bandwidth rows) go to the second."""
    times: dict[tuple[str, int, int, int], dict[str, dict]] = defaultdict(dict)
    rates: dict[str, float] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            parts = row["shape"].split("x")
            if len(parts) != 3:
                rates[row["provider"]] = float(row["gbps"])
                continue
            m, n, k = (int(v) for v in parts)
            times[(row["op"], m, n, k)][row["provider"]] = row
    return dict(times), rates


def merge(paths: list[Path], out: Path) -> None:
    """The rows of ``paths`` in one CSV (their header must agree), a later file's row
    replacing an earlier one with the same (op, provider, shape)."""
    rows: dict[tuple[str, str, str], dict] = {}
    header = None
    for path in paths:
        with path.open() as f:
            reader = csv.DictReader(f)
            if header is not None and reader.fieldnames != header:
                raise SystemExit(f"{path}: columns {reader.fieldnames} differ from {header}")
            header = reader.fieldnames
            for row in reader:
                rows[(row["op"], row["provider"], row["shape"])] = row
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows.values())


def _ms(t: dict, prov: str) -> float | None:
    return float(t[prov]["p50_ms"]) if prov in t else None


def _ratio(t: dict, base: str, prov: str) -> float | None:
    a, b = _ms(t, base), _ms(t, prov)
    return a / b if a is not None and b is not None else None


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def summarize(times: dict, rates: dict) -> str:
    first = next(iter(next(iter(times.values())).values()))
    commits = sorted({r["commit"] for t in times.values() for r in t.values()})
    copy, read = rates.get("torch_copy"), rates.get("torch_sum")
    lines = ["# Quantized GEMMs against issue 13's targets", "",
             f"GPU: {first['gpu']}; torch {first['torch']}, Triton {first['triton']}, CUDA "
             f"{first['cuda']}; commit(s) {', '.join(commits)}; clocks as found: "
             f"{first['clocks']}.",
             f"Copy rate (1 GiB device-to-device, read + write) {_fmt(copy, 0)} GB/s; read-only "
             f"rate (a 1 GiB bf16 sum) {_fmt(read, 0)} GB/s.", ""]  # fmt: skip
    met = total = 0
    two_level = {p: [0, 0] for p in TWO_LEVEL}

    def judge(ok: bool | None) -> str:
        nonlocal met, total
        if ok is None:
            return "-"
        total += 1
        met += ok
        return "yes" if ok else "no"

    lines += ["## Decode (M <= 16)", "",
              "Target: x bf16 per the issue (70B: W4 3.0x, W2 4.5x; 7B: W4 2.0x; 13B: "
              "reported); 'peers': faster than fp8 `_scaled_mm` and `_weight_int4pack_mm`. "
              "Bandwidth: the row's bytes (weights, scales, activations, output) per second "
              "as a fraction of the copy rate and of the read-only rate.", "",
              "| layer | M | kernel | us | x bf16 | target | met | x fp8 | x int4pack | peers met "
              "| frac copy | frac read |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (layer, m, _n, _k), t in sorted(times.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if m not in DECODE_MS:
            continue
        for prov in DECODE_KERNELS:
            if prov not in t:
                continue
            vb = _ratio(t, "cublas_bf16", prov)
            goal = DECODE_SPEEDUP.get((prov, layer.split("_")[0]))
            ok = judge(None if goal is None or vb is None else vb >= goal)
            peers = [_ratio(t, p, prov) for p in PEERS]
            peers_ok = judge(None if None in peers else all(v > 1.0 for v in peers))
            gbps = float(t[prov]["gbps"])
            lines.append(
                f"| {layer} | {m} | {prov} | {_ms(t, prov) * 1e3:.1f} | {_fmt(vb)} | "
                f"{_fmt(goal, 1)} | {ok} | {_fmt(peers[0])} | {_fmt(peers[1])} | {peers_ok} | "
                f"{_fmt(gbps / copy if copy else None)} | {_fmt(gbps / read if read else None)} |"
            )
    lines += ["", "## Prefill (M >= 2048)", "",
              "| layer | M | kernel | ms | x bf16 | target | x fp8 | target | met |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (layer, m, _n, _k), t in sorted(times.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if m < 2048:
            continue
        for prov in (*PREFILL, *TWO_LEVEL, "w4a4_fp8"):
            if prov not in t:
                continue
            vb, vf = _ratio(t, "cublas_bf16", prov), _ratio(t, "scaled_mm", prov)
            gb, gf = PREFILL.get(prov, PREFILL["w4a8_g128"] if prov in TWO_LEVEL else (None, None))
            ok = (
                None
                if gb is None or vb is None
                else (vb >= gb and (gf is None or (vf is not None and vf >= gf)))
            )
            if prov in TWO_LEVEL:  # counted apart
                two_level[prov][0] += bool(ok)
                two_level[prov][1] += ok is not None
                verdict = "-" if ok is None else ("yes" if ok else "no") + " (two-level)"
            else:
                verdict = judge(ok)
            lines.append(
                f"| {layer} | {m} | {prov} | {_ms(t, prov):.3f} | {_fmt(vb)} | {_fmt(gb)} | "
                f"{_fmt(vf)} | {_fmt(gf)} | {verdict} |"
            )
    lines += ["", f"Targets met: {met} of {total} judged rows (decode speed-up, decode peers, "
              "prefill)."]  # fmt: skip
    lines += [f"Two-level grouped W4A8 `{p}` against the W4A8 g128 target (1.3x bf16), counted "
              f"apart: {a} of {b} rows." for p, (a, b) in two_level.items() if b]  # fmt: skip
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
        if prov.endswith(
            ("_triton", "_tiles", "_inloop", "_mt1", "_mt2", "_pdl", "_nopdl", "_tma", "_ptr")
        ):
            continue  # the variants of the sweep: in the CSV, not in the picture
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
    import argparse

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("csv", type=Path, nargs="+", help="a bench_gemm.csv (several: --merged)")
    ap.add_argument(
        "--merged",
        type=Path,
        default=None,
        help="write the rows of the CSVs given, later ones replacing earlier "
        "rows of the same layer / provider / shape, to this path and summarize it",
    )
    ap.add_argument("--out", default="bench_gemm_summary",
                    help="name of the summary (.md) and plot (.png) beside the CSV "
                    "(default: bench_gemm_summary, bench_gemm_speedup)")  # fmt: skip
    args = ap.parse_args()
    for path in args.csv:
        if not path.is_file():
            ap.error(f"no such CSV: {path}")
    if len(args.csv) > 1 and args.merged is None:
        ap.error("several CSVs: give --merged PATH (where their rows go)")
    path = args.csv[0]
    if args.merged is not None:
        merge(args.csv, args.merged)
        path = args.merged
    times, rates = load(path)
    text = summarize(times, rates)
    (path.parent / f"{args.out}.md").write_text(text)
    png = "bench_gemm_speedup" if args.out == "bench_gemm_summary" else f"{args.out}_speedup"
    drew = plot(times, path.parent / f"{png}.png")
    print(text + ("" if drew else "\n(matplotlib not installed: no plot)"))


if __name__ == "__main__":
    main()
