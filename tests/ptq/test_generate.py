"""Generation with a saved quantized model on the CPU (stories260K): cbq_ptq.generate and
``cbq generate``."""

import copy

import pytest
import torch

from cbq_ptq.cli import main
from cbq_ptq.config import CBQConfig, parse_setting
from cbq_ptq.data import calibration_windows
from cbq_ptq.generate import generate, load_for_generation
from cbq_ptq.models import SHARED_MODELS, load_model
from cbq_ptq.pipeline import quantize
from tests.conftest import need_shared, random_llama

PROMPTS = ["Once upon a time", "The little dog", "Lily saw a big"]  # two batches of 2


@pytest.fixture(scope="module", autouse=True)
def _pytorch_paths():
    """The front end's tests run what a CPU user runs, the ops' PyTorch formulas, not the
    kernels through Triton's interpreter (the kernels' tests do that): 79 s -> a few seconds
    for a 5-token generation on CI's 2 cores."""
    from cbq_kernels.testing import pytorch_paths_on_cpu

    with pytorch_paths_on_cpu():
        yield


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("W4A16", marks=pytest.mark.slow),
        pytest.param("W4A8", marks=pytest.mark.slow),
    ],
)
def saved(request, tmp_path_factory):
    from cbq_ptq.io import save

    need_shared(SHARED_MODELS / "stories260K" / "config.json")
    model, tok = load_model("stories260K")
    tokens = torch.randint(3, 512, (4096,), generator=torch.Generator().manual_seed(0))
    config = CBQConfig(settings=parse_setting(request.param, ragged_groups=True), epochs=0,
                       lora_rounding=False)  # fmt: skip
    q, _ = quantize(copy.deepcopy(model), config, calibration_windows(tokens, 2, 32, seed=1),
                    progress=False)  # fmt: skip
    assert q.config.use_cache  # quantize() restores it: the saved model generates with a cache
    out = tmp_path_factory.mktemp("gen") / request.param
    save(q, out, tok, base_model="stories260K")
    return out, request.param


def test_greedy_generation_is_deterministic_and_matches_the_fake_quantized_model(saved):
    path, setting = saved
    model, tok, table = load_for_generation(path, "cpu")
    assert len(table) == 35 and all(v == f"{setting} kernel" for v in table.values())
    # 5 new tokens (the GPU check, scripts/check_generate.py, 16)
    first = generate(model, tok, PROMPTS, max_new_tokens=5, batch_size=2)
    again = generate(model, tok, PROMPTS, max_new_tokens=5, batch_size=2)
    assert first.tokens == again.tokens and first.texts == again.texts
    assert all(0 < len(t) <= 5 for t in first.tokens) and all(first.texts)
    assert first.decode_tokens > 0 and first.decode_tokens_per_second > 0
    fake, tok2, none = load_for_generation(path, "cpu", kernels=False)
    assert none == {}
    want = generate(fake, tok2, PROMPTS, max_new_tokens=5, batch_size=2)
    # int8 codes may flip at a rounding boundary (W4A8)
    agree = sum(a == b for a, b in zip(first.tokens, want.tokens, strict=True))
    assert agree >= (3 if setting == "W4A16" else 2), (first.texts, want.texts)


def test_sampling_is_seeded(saved):
    path, setting = saved
    if setting != "W4A16":
        pytest.skip("one setting is enough: sampling does not depend on the GEMM")
    model, tok, _ = load_for_generation(path, "cpu")
    a = generate(model, tok, PROMPTS[0], max_new_tokens=6, sample=True, temperature=1.0, seed=3)
    b = generate(model, tok, PROMPTS[0], max_new_tokens=6, sample=True, temperature=1.0, seed=3)
    assert a.tokens == b.tokens


def test_the_served_model_holds_no_full_precision_copy_of_a_quantized_weight(saved):
    path, setting = saved
    from cbq_ptq.serve import FusedMember, SwiGLUMLP

    # fuse_swiglu is on by default on a GPU only: asked for here
    model, _, table = load_for_generation(path, "cpu", fuse_swiglu=True)
    fused = [n for n in table if isinstance(model.get_submodule(n), FusedMember)]
    swiglu = [m for m in model.modules() if isinstance(m, SwiGLUMLP)]
    # 5 blocks: q / k / v and gate / up fused (load_for_generation); with integer activations
    # each MLP is a SwiGLUMLP (fuse_swiglu), its gate | up GEMM listed as mlp.gate_up
    assert len(swiglu) == (5 if setting == "W4A8" else 0)
    assert len(fused) == 25 - 2 * len(swiglu)
    assert all(f"model.layers.{i}.mlp.gate_up" in table for i in range(len(swiglu)))
    for name in table:
        layer = model.get_submodule(name)
        if isinstance(layer, FusedMember):  # the GEMM it shares with its block's siblings
            layer = layer.group.fused
        tensors = list(layer.parameters()) + list(layer.buffers())
        w = layer.weight
        assert not any(t.numel() >= layer.in_features * layer.out_features for t in tensors)
        assert w.nbytes < 0.3 * layer.in_features * layer.out_features * 4  # vs its fp32 weight


def test_eval_kernels_scores_the_model_generate_runs(saved, capsys):
    from cbq_ptq.evaluate import evaluate_perplexity

    path, _ = saved
    rc = main(["eval", str(path), "--kernels", "--corpus", "tinystories", "--eval-windows", "1",
               "--seq-len", "64", "--bos", "--also", "", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if "perplexity " in ln][-1]
    printed = float(line.split("perplexity ")[1].split()[0])
    model, tok, _ = load_for_generation(path, "cpu")
    want = evaluate_perplexity(model, tok, "tinystories", seq_len=64, bos=True,
                               max_windows=1)["ppl"]  # fmt: skip
    assert printed == pytest.approx(want, abs=6e-4)


def test_eval_kernels_takes_dtype(saved, capsys):
    """`cbq eval --kernels --dtype D` scores the kernels' model in D (it was always the
    device's default: issue 14's check compared fp32 generate with bf16 eval on the GPU)."""
    from cbq_ptq.evaluate import evaluate_perplexity

    path, _ = saved
    rc = main(["eval", str(path), "--kernels", "--corpus", "tinystories", "--eval-windows", "1",
               "--seq-len", "64", "--bos", "--also", "", "--device", "cpu",
               "--dtype", "bfloat16"])  # fmt: skip
    assert rc == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if "perplexity " in ln][-1]
    assert "bfloat16" in line
    printed = float(line.split("perplexity ")[1].split()[0])
    model, tok, _ = load_for_generation(path, "cpu", dtype=torch.bfloat16)
    want = evaluate_perplexity(model, tok, "tinystories", seq_len=64, bos=True,
                               max_windows=1)["ppl"]  # fmt: skip
    assert printed == pytest.approx(want, abs=6e-4)


def test_bad_arguments(saved):
    model, tok, _ = load_for_generation(saved[0], "cpu")
    with pytest.raises(ValueError, match="prompts must be one or more non-empty strings"):
        generate(model, tok, [])
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1, got 0"):
        generate(model, tok, "hi", max_new_tokens=0)
    with pytest.raises(ValueError, match="sampling needs temperature > 0"):
        generate(model, tok, "hi", sample=True, temperature=0.0)


def test_cli_generate(saved, capsys, tmp_path):
    path, _ = saved
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n\nThe little dog\n", encoding="utf-8")
    rc = main(["generate", str(path), "--prompts-file", str(prompts), "--max-new-tokens", "6",
               "--device", "cpu"])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0
    assert out.out.startswith("Once upon a time") and "The little dog" in out.out
    assert "tokens/s" in out.err and "35 x" in out.err
    for argv, message in (
        (["generate", str(tmp_path)], "neither a folder written by cbq quantize"),
        (["generate", str(path)], "give at least one prompt"),
        (["generate", str(path), "--prompt", "a", "--top-p", "0"], "argument --top-p: must be > 0"),
        (["generate", str(path), "--prompts-file", str(tmp_path / "no")], "is not a file"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bench_generate_smoke_run(tmp_path):
    """benchmarks/bench_generate.py on a 2-block model on the CPU: every setting, a row each."""
    import csv
    import os
    import subprocess
    import sys

    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # PyTorch paths
    subprocess.run([sys.executable, str(root / "benchmarks" / "bench_generate.py"), "--tiny",
                    "--out", str(tmp_path)], check=True, capture_output=True, env=env)  # fmt: skip
    rows = list(csv.DictReader((tmp_path / "bench_generate.csv").open()))
    assert [r["setting"] for r in rows[::2]] == ["bf16", "W4A16g128", "W4A8", "W4A4", "W2A16g128",
                                                 "W4A4rot"]  # fmt: skip
    env.update(CBQ_GEN_COMPILE="graph", CBQ_GEN_SETTINGS="bf16,W4A8",  # the manual loop,
               CBQ_GEN_PROFILE=str(tmp_path / "prof"),  # the per-kernel profile
               CBQ_GEN_POLICY='{"decode_pdl": true}',  # and a GemmPolicy for the kernels
               CBQ_GEN_FUSE="2")  # with fused projections and their norms in the quantizer
    subprocess.run([sys.executable, str(root / "benchmarks" / "bench_generate.py"), "--tiny",
                    "--out", str(tmp_path / "graph")], check=True, capture_output=True,
                   env=env)  # fmt: skip
    graph = list(csv.DictReader((tmp_path / "graph" / "bench_generate.csv").open()))
    assert [(r["setting"], r["compile"]) for r in graph[::2]] == [("bf16", "graph"),
                                                                  ("W4A8", "graph")]
    assert [r["policy"] for r in graph[::2]] == ["", '{"decode_pdl": true}']
    # 2 blocks: q / k / v and gate / up fused (4 groups) and both norms of each moved (4)
    assert [r["fused"] for r in graph[::2]] == ["0", "8"]
    assert all(float(r["decode_tok_s"]) > 0 for r in graph)
    prof = (tmp_path / "prof" / "profile_tiny_W4A8_b1_p16.md").read_text()
    assert "| **sum** |" in prof and "| gemm |" in prof  # on the CPU: the operators' times
    assert all(float(r["decode_tok_s"]) > 0 and float(r["ttft_ms"]) > 0 for r in rows)
    # each setting is measured in its own process; the parent relates it to bf16
    assert all(float(r["speedup_vs_bf16"]) > 0 for r in rows)


def test_bench_generate_measures_a_saved_model_beside_its_base(saved, tmp_path):
    """--saved: the bf16 base (once) and each saved folder, each in its own process (CPU, 2
    tokens); the rows name the base model and relate each folder to the base's speed."""
    import csv
    import os
    import subprocess
    import sys

    path, setting = saved
    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CBQ_GEN_SETTINGS="none", CBQ_GEN_BATCHES="1", CBQ_GEN_NEW="3")
    subprocess.run([sys.executable, str(root / "benchmarks" / "bench_generate.py"), "--tiny",
                    "--saved", str(path), str(path), "--out", str(tmp_path)], check=True,
                   capture_output=True, env=env)  # fmt: skip
    rows = list(csv.DictReader((tmp_path / "bench_generate.csv").open()))
    # saved by io.save directly: no summary.json beside it to name the method
    assert [(r["model"], r["setting"], r["weights"]) for r in rows] == [
        ("stories260K", "bf16", "bf16"), *[("stories260K", setting, "saved")] * 2]
    assert all(float(r["decode_tok_s"]) > 0 for r in rows)
    assert rows[0]["speedup_vs_bf16"] == ""
    assert all(float(r["speedup_vs_bf16"]) > 0 for r in rows[1:])


def test_decode_loop_equals_generate_greedy_with_and_without_padding():
    """The manual decode loop (here without capture: CPU) gives the tokens of Hugging Face's
    greedy generate with a static cache, for unpadded and for left-padded prompts, and checks
    its arguments."""
    from cbq_ptq.generate import decode_loop

    model = random_llama()
    ids = torch.randint(3, 300, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # row 1: a 6-token prompt, row 2: 9 tokens, left-padded
    mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    for m in (None, mask):
        out, prefill, decode = decode_loop(model, ids, 8, m)
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids) if m is None
                             else m, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                             pad_token_id=0, cache_implementation="static")  # fmt: skip
        assert torch.equal(out, ref[:, 10:]), m
        assert isinstance(prefill, float) and isinstance(decode, float) and prefill > 0 < decode
    one, _, none = decode_loop(model, ids, 1, mask)
    assert torch.equal(one, out[:, :1]) and none == 0.0
    with pytest.raises(ValueError, match="graph capture needs a CUDA device, got cpu"):
        decode_loop(model, ids, 4, capture=True)
    with pytest.raises(ValueError, match="new_tokens must be an int >= 1, got 0"):
        decode_loop(model, ids, 0)
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids"):
        decode_loop(model, ids, 2, mask[:, 1:])
    context = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=rf"10 tokens.* and {context} new tokens exceed the "
                                         rf"model's context of {context} positions"):  # fmt: skip
        decode_loop(model, ids, context)
    assert decode_loop(model, ids[:1, :2], 2)[0].shape == (1, 2)


def test_decode_loop_sampling_is_seeded_and_keeps_the_nucleus():
    """Sampling: the same seed gives the same tokens, another seed other tokens; a tiny top_p
    keeps only the most likely token (greedy), and the nucleus filter of _next_token keeps the
    smallest set of most likely tokens whose probability reaches top_p."""
    from cbq_ptq.generate import _next_token, decode_loop

    model = random_llama()
    ids = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(2))
    draws = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        draws.append(decode_loop(model, ids, 10, sample=True, temperature=1.5)[0])
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    greedy = decode_loop(model, ids, 10)[0]
    assert torch.equal(decode_loop(model, ids, 10, sample=True, top_p=1e-6)[0], greedy)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.manual_seed(0)
    picks = {int(_next_token(logits, True, 1.0, 0.75)) for _ in range(300)}
    assert picks == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3: the first two tokens


def test_a_decode_session_reuses_its_cache_and_gives_a_fresh_loops_tokens():
    """DecodeSession keeps the cache and buffers of the last shape: calls of the same shape
    (another prompt, other padding) reuse them and give the tokens of a fresh decode_loop
    (the previous call's keys and values after the prompt are masked until overwritten);
    another shape builds a new cache; capture_prefill without capture is refused."""
    from cbq_ptq.generate import DecodeSession, decode_loop

    model = random_llama()
    gen = torch.Generator().manual_seed(4)
    a = torch.randint(3, 300, (2, 9), generator=gen)
    b = torch.randint(3, 300, (2, 9), generator=gen)
    mask_b = torch.ones_like(b)
    mask_b[0, :3] = 0
    b = b.masked_fill(mask_b == 0, 0)
    session = DecodeSession(model)
    first, _, _ = session.run(a, 6)
    cache = session._shape.cache
    for ids, mask in ((b, mask_b), (a, None), (b, mask_b)):
        out, prefill, decode = session.run(ids, 6, mask)
        assert torch.equal(out, decode_loop(model, ids, 6, mask)[0])
        assert session._shape.cache is cache and prefill > 0 < decode
    assert torch.equal(session.run(a, 6)[0], first)
    session.run(a[:, :5], 6)  # another prompt length: a new cache
    assert session._shape.cache is not cache
    with pytest.raises(ValueError, match="capture_prefill needs graph capture"):
        DecodeSession(model, capture_prefill=True).run(a, 2)


def test_chat_prompts_use_the_tokenizers_template(saved, capsys):
    """--chat / chat=True: each prompt becomes a user turn of the tokenizer's chat template
    (the generation equals generating from the rendered text); a tokenizer without one
    (stories260K's) is a one-line error."""
    path, _ = saved
    from cbq_ptq.generate import chat_prompts

    model, tok, _ = load_for_generation(path, "cpu")
    rc = main(["generate", str(path), "--prompt", "Hello", "--chat", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "has no chat template" in err and len(err.strip().splitlines()) == 1
    tok.chat_template = ("{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}Story:{% endif %}")  # fmt: skip
    assert chat_prompts(tok, ["a dog"]) == ["User: a dog\nStory:"]
    chat = generate(model, tok, ["a dog", "the sun"], max_new_tokens=3, chat=True)
    plain = generate(model, tok, ["User: a dog\nStory:", "User: the sun\nStory:"],
                     max_new_tokens=3)  # fmt: skip
    assert chat.tokens == plain.tokens


def test_check_generate_script_on_the_cpu(tmp_path):
    """scripts/check_generate.py (issue 14's GPU check) end to end on the CPU: a round-to-
    nearest W4A16 stories260K, 4 prompts of 4 tokens. The kernels' model is the PyTorch path
    here, so both checks must pass exactly: equal continuations, agreement 1.0, and the
    perplexity through generate's model equal to `cbq eval --kernels` on the same windows
    (512 tokens with BOS for stories260K: the script asks the CLI's own window rule)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from cbq_ptq.data import SHARED_DATA

    need_shared(SHARED_MODELS / "stories260K" / "config.json")
    need_shared(SHARED_DATA / "wikitext2-raw-test.txt")
    import os

    out = tmp_path / "q"
    root = Path(__file__).resolve().parents[2]
    # without Triton's interpreter (the CPU path needs none): 6 s each instead of ~45
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for cmd in (["-m", "cbq_ptq.cli", "quantize", "--model", "stories260K", "--setting", "W4A16",
                 "--ragged-groups", "--method", "rtn", "--corpus", "tinystories",
                 "--eval-windows", "1", "--also", "", "--out", str(out)],
                [str(root / "scripts" / "check_generate.py"), str(out / "model"), "--device",
                 "cpu", "--prompts", "4", "--tokens", "4", "--eval-windows", "1", "--out",
                 str(tmp_path / "check.json")]):  # fmt: skip
        proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env,
                              cwd=root)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "check.json").read_text())
    assert (result["equal_prompts"], result["greedy_check"], result["ppl_equal"]) == (4, True, True)
    assert result["teacher_forced_agreement"] == 1.0
    assert "reference_gpu_vs_cpu_teacher_forced" not in result  # a GPU's measure only
