"""Timing and result rows shared by every benchmark script (one schema for all ops).

Timing: ``triton.testing.do_bench`` (CUDA events, warm-up first), median with p20/p80.
Rates: GB/s counts the bytes that must move (every input read once, every output written
once, packed operands at their packed width); TFLOP/s where an op does arithmetic worth
counting. Every row carries the GPU, clocks as found, library versions and the git commit.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

COLUMNS = (
    "op", "provider", "shape", "dtype", "p50_ms", "p20_ms", "p80_ms", "tflops", "gbps",
    "frac_copy_bw", "speedup", "baseline", "gpu", "clocks", "torch", "triton", "cuda", "commit",
)  # fmt: skip


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


@dataclasses.dataclass(frozen=True)
class Environment:
    gpu: str
    clocks: str
    torch: str
    triton: str
    cuda: str
    commit: str

    @staticmethod
    def detect() -> Environment:
        import triton

        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
        clocks = _run([
            "nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,"
            "power.draw,temperature.gpu", "--format=csv,noheader",
        ])  # fmt: skip
        # CBQ_COMMIT: for copies of a checkout without its git history (the lent GPU machine).
        commit = os.environ.get("CBQ_COMMIT") or _run(["git", "rev-parse", "--short=12", "HEAD"])
        dirty = "" if os.environ.get("CBQ_COMMIT") else _run(["git", "status", "--porcelain"])
        commit = commit or "unknown"
        return Environment(
            gpu=gpu,
            clocks=clocks.replace(",", ";"),
            torch=torch.__version__,
            triton=triton.__version__,
            cuda=str(torch.version.cuda),
            commit=commit + ("+dirty" if dirty else ""),
        )


@dataclasses.dataclass(frozen=True)
class Timing:
    p50_ms: float
    p20_ms: float
    p80_ms: float


def bench(fn: Callable[[], object], warmup_ms: float = 50, rep_ms: float = 300) -> Timing:
    """Median (p20, p80) time of fn() in ms."""
    from triton.testing import do_bench

    p50, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return Timing(p50, p20, p80)


class Table:
    """Rows of one benchmark run; baselines are rows of the same table, measured alongside."""

    def __init__(self, env: Environment) -> None:
        self.env = env
        self.rows: list[dict[str, object]] = []

    def add(
        self,
        op: str,
        provider: str,
        shape: str,
        dtype: str,
        t: Timing,
        *,
        nbytes: int | None = None,
        flops: int | None = None,
        copy_gbps: float | None = None,
        baseline: Timing | None = None,
        baseline_name: str = "",
    ) -> dict[str, object]:
        gbps = nbytes / t.p50_ms / 1e6 if nbytes else None
        row: dict[str, object] = {
            "op": op,
            "provider": provider,
            "shape": shape,
            "dtype": dtype,
            "p50_ms": round(t.p50_ms, 5),
            "p20_ms": round(t.p20_ms, 5),
            "p80_ms": round(t.p80_ms, 5),
            "tflops": round(flops / t.p50_ms / 1e9, 2) if flops else "",
            "gbps": round(gbps, 1) if gbps else "",
            "frac_copy_bw": round(gbps / copy_gbps, 3) if gbps and copy_gbps else "",
            "speedup": round(baseline.p50_ms / t.p50_ms, 2) if baseline else "",
            "baseline": baseline_name,
            **{f: getattr(self.env, f) for f in ("gpu", "clocks", "torch", "triton", "cuda")},
            "commit": self.env.commit,
        }
        self.rows.append(row)
        return row

    def write_csv(self, path: Path) -> None:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows)

    def markdown(self, columns: tuple[str, ...]) -> str:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in self.rows]
        return "\n".join(lines)


def cli(doc: str | None) -> Path:
    """The benchmarks' command line: --out DIR (created), default benchmarks/results."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_report(
    table: Table,
    out: Path,
    stem: str,
    title: str,
    script: str,
    columns: tuple[str, ...],
    notes: list[str] | tuple[str, ...] = (),
) -> str:
    """Writes OUT/STEM.csv and OUT/STEM.md (environment, command, notes, table); returns the
    markdown, which the scripts also print."""
    table.write_csv(out / f"{stem}.csv")
    env = table.env
    text = "\n".join(
        [
            f"# {title}",
            "",
            f"GPU: {env.gpu}; clocks as found (sm, mem, max sm, max mem, power, temp): "
            f"{env.clocks}",
            f"torch {env.torch}, triton {env.triton}, CUDA {env.cuda}, commit {env.commit}",
            f"Command: python {script} --out {out}",
            *notes,
            "",
            table.markdown(columns),
            "",
        ]
    )
    (out / f"{stem}.md").write_text(text)
    return text
