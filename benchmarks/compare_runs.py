"""Rows of several bench_gemm CSVs side by side: p50 in us per run and the ratio of the mean of
the runs named NEW to the run named BASE, for A/B comparisons made on one machine (e.g.
``gpu_lease.sh OUT abw``: new / old / new, so drift between runs shows as new1 vs new2).

    python benchmarks/compare_runs.py BASE=old.csv NEW1=new1.csv NEW2=new2.csv [--out FILE]

The first ``NAME=path`` is the base; every other run counts as new."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def table(runs: list[tuple[str, Path]]) -> str:
    rows: dict[tuple[str, str, str], dict[str, float]] = {}
    for name, path in runs:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                key = (r["op"], r["provider"], r["shape"])
                rows.setdefault(key, {})[name] = float(r["p50_ms"]) * 1000
    base, news = runs[0][0], [n for n, _ in runs[1:]]
    head = ["layer", "provider", "M x N x K", *[f"{n} us" for n, _ in runs], f"new / {base}"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(rows):
        v = rows[key]
        if base not in v or not all(n in v for n in news):
            continue
        ratio = sum(v[n] for n in news) / len(news) / v[base]
        cells = [*key, *[f"{v[n]:.2f}" for n, _ in runs], f"{ratio:.3f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="NAME=path/to/bench_gemm.csv (the first is the base)")
    ap.add_argument("--out", type=Path, help="write the markdown table here too")
    args = ap.parse_args()
    runs = []
    for spec in args.runs:
        name, sep, path = spec.partition("=")
        if not sep or not Path(path).is_file():
            raise SystemExit(f"compare_runs: expected NAME=existing.csv, got {spec!r}")
        runs.append((name, Path(path)))
    if len(runs) < 2:
        raise SystemExit("compare_runs: give a base run and at least one new run")
    text = table(runs)
    print(text, end="")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
