"""Warp-stall samples per SASS instruction from Nsight Compute's source page:

    ncu -i REPORT.ncu-rep --page source --csv --print-source sass > sass.csv
    python scripts/ncu_sass_stalls.py sass.csv [--top 12]

For each kernel of the CSV (ncu may print a kernel twice: the first copy is read): the share
of each stall reason in all samples, the instructions executed, and the instructions with the
most samples (share of all samples, executions, the SASS, the three largest reasons)."""

import argparse
import csv
import io


def blocks(path):
    out, cur = [], None
    with open(path) as f:
        for line in f:
            if line.startswith('"Kernel Name"'):
                cur = [line]
                out.append(cur)
            elif cur is not None:
                cur.append(line)
    return out


def num(v):
    try:
        return float(v.replace(",", ""))
    except ValueError:
        return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    seen = set()
    for b in blocks(args.csv):
        name = b[0].split('","')[1].rstrip('",\n')
        if name in seen:
            continue
        seen.add(name)
        rows = list(csv.reader(io.StringIO("".join(b[1:]))))
        hdr, data = rows[0], [r for r in rows[1:] if len(r) == len(rows[0])]
        col = {h: i for i, h in enumerate(hdr)}
        samples = "Warp Stall Sampling (All Samples)"
        reasons = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]
        total = sum(num(r[col[samples]]) for r in data) or 1.0
        share = {k: sum(num(r[col[k]]) for r in data) / total for k in reasons}
        print(f"\n{name}\n  samples {total:.0f}, instructions executed "
              f"{sum(num(r[col['Instructions Executed']]) for r in data):.0f}")
        print("  reasons: " + ", ".join(f"{k[6:]} {v:.3f}" for k, v in
                                        sorted(share.items(), key=lambda kv: -kv[1])[:8]))
        for r in sorted(data, key=lambda r: -num(r[col[samples]]))[:args.top]:
            s = num(r[col[samples]])
            top = sorted(((num(r[col[k]]), k[6:]) for k in reasons), reverse=True)[:3]
            why = ", ".join(f"{k} {v / max(s, 1):.2f}" for v, k in top if v)
            print(f"  {100 * s / total:5.1f}%  exec {num(r[col['Instructions Executed']]):>8.0f}  "
                  f"{r[col['Source']].strip()[:58]:58s} [{why}]")


if __name__ == "__main__":
    main()
