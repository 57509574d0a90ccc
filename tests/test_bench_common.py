"""benchmarks/common.py on the CPU: row arithmetic and report files (the timing needs a GPU)."""

import csv

import pytest

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
    table.add("copy", "torch_copy", "1GiB", "u8", Timing(1.0, 1.0, 1.0), nbytes=2_000_000_000)
    table.add("read", "torch_sum", "1GiB", "bf16", Timing(0.5, 0.5, 0.5), nbytes=2_000_000_000)
    # (M, bf16, fp8, int4pack, w4a8, w2a16) in ms
    for m, bf16, fp8, i4, w4, w2 in ((4096, 2.0, 1.1, 9.0, 1.0, 2.2), (1, 0.18, 0.07, 0.09,
                                                                        0.05, 0.04)):
        shape = f"{m}x28672x8192"
        table.add("70b_gate_up", "cublas_bf16", shape, "bf16", Timing(bf16, bf16, bf16))
        for prov, t in (("scaled_mm", fp8), ("int4pack_mm", i4), ("w4a8", w4),
                        ("w2a16_g128", w2)):
            table.add("70b_gate_up", prov, shape, "x", Timing(t, t, t), nbytes=100_000_000)
    table.write_csv(tmp_path / "bench_gemm.csv")
    times, rates = load(tmp_path / "bench_gemm.csv")
    assert rates == {"torch_copy": 2000.0, "torch_sum": 4000.0}
    text = summarize(times, rates)
    # M = 1: w4a8 3.6x >= 3.0 (met) and faster than both peers, 1e8 B in 50 us = 2000 GB/s
    # (1.0 of the copy rate, 0.5 of the read rate); w2a16 4.5x >= 4.5 (met), faster than both
    assert ("| 70b_gate_up | 1 | w4a8 | 50.0 | 3.60 | 3.0 | yes | 1.40 | 1.80 | yes | 1.00 | "
            "0.50 |") in text
    assert "| 70b_gate_up | 1 | w2a16_g128 | 40.0 | 4.50 | 4.5 | yes | 1.75 | 2.25 | yes |" in text
    # M = 4096: w4a8 2.0x bf16 (>= 1.7) and 1.1x fp8 (>= 0.95): met; w2a16 0.91x < 0.95: not
    assert "| 70b_gate_up | 4096 | w4a8 | 1.000 | 2.00 | 1.70 | 1.10 | 0.95 | yes |" in text
    assert "| 70b_gate_up | 4096 | w2a16_g128 | 2.200 | 0.91 | 0.95 | 0.50 | - | no |" in text
    assert "Targets met: 5 of 6 judged rows" in text
    assert speedup_by_m(times)["w4a8"] == pytest.approx({1: 3.6, 4096: 2.0})


def test_summarize_gemm_merges_runs(tmp_path):
    """--merged: the rows of two runs in one CSV, the later run's row of the same layer,
    provider and shape replacing the earlier one; columns that differ are an error."""
    import csv

    from benchmarks.summarize_gemm import load, merge

    for name, commit, rows in (("a", "c1", (("1x8x8", 0.5), ("4096x8x8", 9.0))),
                               ("b", "c2", (("4096x8x8", 2.0), ("8192x8x8", 4.0)))):  # fmt: skip
        table = Table(Environment("TestGPU", "", "2.13", "3.9", "13.0", commit))
        for shape, ms in rows:
            table.add("70b_gate_up", "w4a8", shape, "x", Timing(ms, ms, ms))
        table.write_csv(tmp_path / f"{name}.csv")
    merge([tmp_path / "a.csv", tmp_path / "b.csv"], tmp_path / "m.csv")
    times, _ = load(tmp_path / "m.csv")
    got = {m: (float(t["w4a8"]["p50_ms"]), t["w4a8"]["commit"]) for (_, m, _, _), t in
           times.items()}  # fmt: skip
    assert got == {1: (0.5, "c1"), 4096: (2.0, "c2"), 8192: (4.0, "c2")}
    with (tmp_path / "a.csv").open() as f:
        rows = list(csv.reader(f))
    with (tmp_path / "c.csv").open("w", newline="") as f:
        csv.writer(f).writerows([r[:-1] for r in rows])  # one column fewer
    with pytest.raises(SystemExit, match="columns"):
        merge([tmp_path / "a.csv", tmp_path / "c.csv"], tmp_path / "m2.csv")


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
    with (tmp_path / "d.csv").open("w", newline="") as f:  # a captured prefill: its own mode
        w = csv.DictWriter(f, fieldnames=[*fields, "compile", "prefill"])
        w.writeheader()
        for setting, ttft in (("bf16", 70.0), ("W4A8", 50.0)):
            w.writerow({"model": "llama2-7b", "setting": setting, "batch": 1, "prompt": 2048,
                        "new_tokens": 64, "ttft_ms": ttft, "decode_tok_s": 100,
                        "weight_gib": 1, "gpu": "G", "torch": "t", "commit": "c",
                        "compile": "graph", "prefill": "graph"})  # fmt: skip
    captured = summary(merge([tmp_path / "c.csv", tmp_path / "d.csv"]))
    assert ("| W4A8 | graph, prefill graph, batch 1, prompt 2048 | ttft_ms | 50.0 vs bf16 70.0 "
            "| 1.40x | >= 1.4x | met |") in captured  # fmt: skip
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
    assert "- graph: 2 of 11 target rows measured, 0 met" in graph  # per-mode coverage
    assert "- auto: 3 of 11 target rows measured, 2 met" in graph
    # fused rows of one mode, whatever each fused (a W4A8 model fuses norms and SwiGLU too,
    # a weight-only one only its projections), compare with bf16 as one mode; other models
    # are listed beside their own bf16
    with (tmp_path / "e.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*fields, "compile", "fused", "speedup_vs_bf16"])
        w.writeheader()
        for model, setting, tok_s, fused in (
                ("llama2-7b", "bf16", 100.0, 0), ("llama2-7b", "W4A8", 200.0, 160),
                ("llama2-7b", "W4A16g128", 150.0, 64), ("smollm2-135m", "bf16", 300.0, 0),
                ("smollm2-135m", "W4A8", 450.0, 150)):  # fmt: skip
            w.writerow({"model": model, "setting": setting, "batch": 1, "prompt": 512,
                        "new_tokens": 64, "ttft_ms": 30, "decode_tok_s": tok_s,
                        "weight_gib": 1, "gpu": "G", "torch": "t", "commit": "c",
                        "compile": "graph", "fused": fused,
                        "speedup_vs_bf16": tok_s / (100 if model == "llama2-7b" else 300)})
    best = summary(merge([tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"]))
    # best against best: W4A16's 300 (graph) against bf16's 200 (graph), not against auto's 100
    assert ("| W4A16g128 | 1 | 512 | decode_tok_s | 300.0 (graph) | 200.0 (graph) | 1.50x "
            "| >= 2.5x | missed |") in best  # fmt: skip
    assert "## Best mode against best mode" not in summary(rows)  # one mode: nothing to add
    fused = summary(merge([tmp_path / "e.csv"]))
    assert "| W4A8 | graph, fused, batch 1, prompt 512 | decode_tok_s | 200.0 vs bf16" in fused
    assert "| W4A16g128 | graph, fused, batch 1, prompt 512 | decode_tok_s | 150.0 vs bf16" in fused
    assert [ln for ln in fused.splitlines() if ln.startswith("- graph")] == [
        "- graph, fused: 3 of 11 target rows measured, 0 met"]  # + weight_gib
    assert "| smollm2-135m | W4A8 |  | graph, fused | 1 | 512 | 30 | 450.0 | 1.5 | - |  |" in fused


def test_cold_rows_cycle_the_weight_copies():
    """bench_gemm's L2-cold rows (CBQ_BENCH_COLD=1): enough copies that 4 x the L2 lies
    between two reads of one copy, and consecutive calls take consecutive copies (a timed
    graph captures the calls in turn)."""
    from benchmarks.bench_gemm import Cycle, cold_copies

    l2 = 50 * 2**20
    assert cold_copies(32 * 2**20, l2) == 7  # 7B q/k/v/o in bf16: 32 MiB
    assert cold_copies(8 * 2**20 + 1, l2) == 25  # its 4-bit weight
    assert cold_copies(470 * 2**20, l2) == 1  # 70B gate/up in bf16: larger than 4 x the L2
    seen = []
    cycle = Cycle(lambda c: seen.append(c) or c * 10, ["a", "b", "c"])
    assert [cycle() for _ in range(7)] == ["a" * 10, "b" * 10, "c" * 10] * 2 + ["a" * 10]
    assert seen == ["a", "b", "c", "a", "b", "c", "a"]
