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


def test_gemm_summary_checks_the_targets(tmp_path):
    from benchmarks.summarize_gemm import load, speedup_by_m, summarize

    env = Environment("TestGPU", "", "2.13", "3.9", "13.0", "abc")
    table = Table(env)
    for m, bf16, int_mm, ours in ((4096, 2.0, 1.5, 1.0), (1, 0.18, 0.1, 0.04)):
        shape = f"{m}x28672x8192"
        base = Timing(bf16, bf16, bf16)
        table.add("70b_gate_up", "cublas_bf16", shape, "bf16", base)
        table.add("70b_gate_up", "int_mm", shape, "int8", Timing(int_mm, int_mm, int_mm))
        table.add("70b_gate_up", "w4a8", shape, "int4", Timing(ours, ours, ours))
        table.add("70b_gate_up", "w2a16_g128", shape, "bf16", Timing(ours, ours, ours))
    table.write_csv(tmp_path / "bench_gemm.csv")
    times = load(tmp_path / "bench_gemm.csv")
    text = summarize(times)
    # M=4096: 2.0x bf16 and 1.5x int_mm -> met; M=1: w4a8 40 us <= 50 met, w2a16 40 > 30 not.
    assert "| 70b_gate_up | 4096 | 28672 | 8192 | w4a8 | 2.00 | 1.5 | None | yes |" in text
    assert "| 1 | w4a8 | 40.0 | 50 | 180.0 | yes |" in text
    assert "| 1 | w2a16_g128 | 40.0 | 30 | 180.0 | no |" in text
    assert "| 70b_gate_up | 28672 | 8192 | w2a16_g128 | 2.00 | yes |" in text
    assert speedup_by_m(times)["w4a8"] == {1: 4.5, 4096: 2.0}


def test_summarize_generate_merges_parts_and_checks_the_targets(tmp_path):
    import csv

    from benchmarks.summarize_generate import merge, summary

    fields = ["model", "setting", "batch", "prompt", "new_tokens", "ttft_ms", "decode_tok_s",
              "weight_gib", "gpu", "torch", "commit"]  # fmt: skip
    parts = {"a.csv": [("bf16", 1, 100.0, 12.0), ("W4A16g128", 1, 10.0, 7.0)],
             "b.csv": [("W4A16g128", 1, 260.0, 3.8), ("W4A8", 32, 900.0, 4.0),
                       ("bf16", 32, 1000.0, 12.0)]}  # fmt: skip
    for name, rows in parts.items():
        with (tmp_path / name).open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for setting, batch, tok_s, gib in rows:
                w.writerow({"model": "llama2-7b", "setting": setting, "batch": batch,
                            "prompt": 512, "new_tokens": 64, "ttft_ms": 30,
                            "decode_tok_s": tok_s, "weight_gib": gib, "gpu": "G", "torch": "t",
                            "commit": "c"})  # fmt: skip
    with (tmp_path / "c.csv").open("w", newline="") as f:  # the captured loop: its own mode
        w = csv.DictWriter(f, fieldnames=[*fields, "compile"])
        w.writeheader()
        for setting, tok_s in (("bf16", 200.0), ("W4A16g128", 300.0)):
            w.writerow({"model": "llama2-7b", "setting": setting, "batch": 1, "prompt": 512,
                        "new_tokens": 64, "ttft_ms": 30, "decode_tok_s": tok_s,
                        "weight_gib": 1, "gpu": "G", "torch": "t", "commit": "c",
                        "compile": "graph"})  # fmt: skip
    rows = merge([tmp_path / "a.csv", tmp_path / "b.csv"])  # b's W4A16 row replaces a's
    assert len(rows) == 4
    assert len(merge([tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"])) == 6
    graph = summary(merge([tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"]))
    assert "| W4A16g128 | graph, batch 1, prompt 512 | decode_tok_s | 300.0 vs bf16 200.0 | 1.50x" \
        in graph  # fmt: skip
    text = summary(rows)
    assert "| decode_tok_s | 260.0 vs bf16 100.0 | 2.60x | >= 2.5x | met" in text
    assert "| W4A8 | auto, batch 32, prompt 512 | decode_tok_s | 900.0 vs bf16 1000.0 |" in text
    assert "| >= 1.5x | missed |" in text
    assert "| weight_gib | 3.8 vs bf16 12.0 | 0.32x | <= 0.32x | met |" in text
