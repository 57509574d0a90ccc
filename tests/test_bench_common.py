"""benchmarks/common.py on the CPU: row arithmetic and report files (the timing needs a GPU)."""

import csv

from benchmarks.common import COLUMNS, Environment, Table, Timing, write_report


def test_rows_and_report(tmp_path):
    env = Environment("TestGPU", "1980 MHz", "2.13", "3.9", "13.0", "abc123")
    table = Table(env)
    base = Timing(2.0, 1.9, 2.1)
    fast = Timing(0.5, 0.45, 0.55)
    table.add("copy", "torch.copy_", "4", "bf16", base, nbytes=2_000_000, copy_gbps=1.0)
    row = table.add("op", "cbq", "4", "bf16", fast, nbytes=1_000_000, flops=10**9,
                    copy_gbps=4.0, baseline=base, baseline_name="ref")  # fmt: skip
    assert row["gbps"] == 2.0  # 1e6 bytes / 0.5 ms
    assert row["frac_copy_bw"] == 0.5 and row["speedup"] == 4.0 and row["tflops"] == 2.0
    text = write_report(table, tmp_path, "bench_x", "Title", "benchmarks/bench_x.py",
                        ("op", "provider", "speedup"), ["a note"])  # fmt: skip
    assert "TestGPU" in text and "a note" in text and "| op | cbq | 4.0 |" in text
    with (tmp_path / "bench_x.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == COLUMNS and rows[1]["commit"] == "abc123"
    assert (tmp_path / "bench_x.md").read_text() == text
