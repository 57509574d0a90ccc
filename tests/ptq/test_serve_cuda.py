"""The inference kernels run a saved quantized model on the GPU (stories260K)."""

import copy

import pytest
import torch

from cbq_ptq.config import CBQConfig, parse_setting
from cbq_ptq.data import calibration_windows
from cbq_ptq.pipeline import quantize
from cbq_ptq.serve import use_kernels
from tests.conftest import random_llama

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize(
    ("setting", "atol"), [("W4A16", 1e-3), ("W3A16g32", 1e-3), ("W4A4", 1e-3), ("W4A8", 0.25)]
)
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_kernels_on_the_gpu_reproduce_the_fake_quantized_logits(stories_cuda, setting, atol,
                                                                compute, tmp_path):  # fmt: skip
    from cbq_ptq.io import load, save

    if setting == "W4A4" and compute == torch.bfloat16:
        # Measured (CPU interpreter and H100 alike): on stories260K with 4-bit activations,
        # casting the activations to bf16 moves codes across rounding boundaries, and the
        # bf16 *fake-quantized* model already differs from the fp32 one as much (mean |dlogit|
        # 0.79 of 8.7, argmax agreement 53%) as the bf16 kernels do. The fp32 case is the
        # exactness contract for W4A4.
        pytest.skip("W4A4 in bf16 is chaotic on stories260K whatever computes it")
    model, tok = stories_cuda
    tokens = torch.randint(3, 512, (8192,), generator=torch.Generator().manual_seed(0))
    x = calibration_windows(tokens, 4, 128, seed=1).cuda()
    config = CBQConfig(settings=parse_setting(setting, ragged_groups=True), epochs=1)
    q, _ = quantize(copy.deepcopy(model), config, x, progress=False)
    save(q, tmp_path / "q", tok)
    served = load(tmp_path / "q", device="cuda")
    with torch.no_grad():
        want = served(x).logits
    table = use_kernels(served, compute)
    assert all(v.endswith("kernel") for v in table.values()), table
    with torch.no_grad():
        got = served(x).logits
    agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    if compute == torch.float32:
        # the contract, layer by layer: each kernel layer on the fake-quantized layer's input
        worst = layerwise_worst(load(tmp_path / "q", device="cuda"), served, x)
        assert worst <= atol, (setting, worst)
    if compute == torch.float32 and setting == "W4A8":
        # int8 codes flip where a layer's fp32 sums differ (GPU fake-quantized vs kernels), and
        # a flip moves a few logits: H200, 2d9c58b, 15 of 262144 logits beyond 0.25, at most
        # 0.37 (the CPU contract, max <= 0.25, failed there); bounded by count and size
        err = (got - want).abs()
        assert float((err > atol).float().mean()) <= 1e-3 and float(err.max()) <= 4 * atol
        assert agree >= 0.95
    elif compute == torch.float32 and setting == "W4A4":
        # a 4-bit code flips where the two paths' fp32 sums (1e-5 apart) straddle a rounding
        # boundary, and a flip (one step = max / 7) carries along its sequence: H200 and CPU
        # interpreter, 7a9193f, one token's o_proj input of block 1 flipped -> 12.8% of the
        # logits beyond 1e-3 (max 2.1) with every layer within 1.3e-5 of its fake-quantized
        # twin on the same input (layerwise_worst above) and argmax agreement 0.986
        assert agree >= 0.95
    elif compute == torch.float32:
        torch.testing.assert_close(got, want, rtol=0, atol=atol)
        assert agree >= 0.95
    else:  # bf16 activations: rounding differences, bounded loosely
        assert float((got - want).abs().mean()) < 0.05 * float(want.abs().mean())
        assert agree >= 0.9


def layerwise_worst(fake, served, x) -> float:
    """The largest difference between a kernel layer of ``served`` and the fake-quantized
    layer of the same name in ``fake``, both given the input the latter saw in fake(x)."""
    from cbq_ptq.qlinear import QLinear

    seen = {}
    for name, m in fake.named_modules():
        if isinstance(m, QLinear):
            m.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, (i[0], o)))
    worst = 0.0
    with torch.no_grad():
        fake(x)
        assert seen, "no quantized layer in the loaded model"
        for name, (inp, out) in seen.items():
            worst = max(worst, float((served.get_submodule(name)(inp) - out).abs().max()))
    return worst


@pytest.mark.parametrize("setting", ["bf16", "W4A16g128", "W4A8", "W4A4"])
def test_decode_loop_replays_give_the_eager_loops_tokens(setting):
    """decode_loop with its decode step captured in one CUDA graph (the kernels included)
    gives the tokens of the same loop run eagerly (capture=False), which the CPU test holds
    equal to Hugging Face's greedy generate, for unpadded and left-padded prompts; a second
    call (a new cache, a new capture) the same again; seeded sampling repeats itself."""
    from cbq_ptq.generate import decode_loop
    from cbq_ptq.serve import rtn_kernels

    model = random_llama(256, 512, vocab=1000, device="cuda", dtype=torch.bfloat16)
    if setting != "bf16":
        rtn_kernels(model, parse_setting(setting), torch.bfloat16)
    ids = torch.randint(3, 1000, (3, 40), generator=torch.Generator().manual_seed(1)).cuda()
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    for m in (None, mask):
        out, prefill, decode = decode_loop(model, ids, 12, m)
        eager, _, _ = decode_loop(model, ids, 12, m, capture=False)
        again, _, _ = decode_loop(model, ids, 12, m)
        assert torch.equal(out, eager) and torch.equal(out, again), m
        assert isinstance(prefill, float) and isinstance(decode, float) and prefill > 0 < decode
    torch.manual_seed(3)
    one = decode_loop(model, ids, 12, mask, sample=True, top_p=0.9)[0]
    torch.manual_seed(3)
    assert torch.equal(decode_loop(model, ids, 12, mask, sample=True, top_p=0.9)[0], one)


@pytest.mark.parametrize("setting", ["bf16", "W4A8", "W4A4"])
def test_a_session_with_a_captured_prefill_gives_the_eager_loops_tokens(setting):
    """DecodeSession(capture_prefill=True): the first call runs the prefill eagerly and then
    captures it; later calls of the shape replay it (other prompts, other padding) and give
    the tokens of the eager loop; the prefill graph is kept for the shape."""
    from cbq_ptq.generate import DecodeSession, decode_loop
    from cbq_ptq.serve import rtn_kernels

    model = random_llama(256, 512, vocab=1000, device="cuda", dtype=torch.bfloat16)
    if setting != "bf16":
        rtn_kernels(model, parse_setting(setting), torch.bfloat16)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 1000, (3, 72), generator=gen).cuda() for _ in range(3)]
    mask = torch.ones_like(prompts[1])
    mask[2, :9] = 0
    session = DecodeSession(model, capture_prefill=True)
    for i, (ids, m) in enumerate(((prompts[0], None), (prompts[1], mask), (prompts[2], None),
                                  (prompts[0], None))):  # fmt: skip
        out, prefill, decode = session.run(ids, 10, m)
        assert session._shape.prefill_graph is not None
        assert torch.equal(out, decode_loop(model, ids, 10, m, capture=False)[0]), i
        assert prefill > 0 < decode
    # seeded sampling through a reused session (replays of graphs captured in an earlier
    # call) repeats itself, as generate() reuses one session across its batches
    draws = []
    for _ in range(2):
        torch.manual_seed(3)
        draws.append(session.run(prompts[0], 10, sample=True, top_p=0.9)[0])
    assert torch.equal(draws[0], draws[1])
    # and as the eager loop draws them (a capture's warm-ups do not move the generator on)
    torch.manual_seed(3)
    eager = decode_loop(model, prompts[0], 10, sample=True, top_p=0.9, capture=False)[0]
    assert torch.equal(draws[0], eager)


@pytest.mark.parametrize("fuse", [False, True])
def test_decode_loop_with_a_compiled_step_gives_the_eager_tokens(fuse):
    """compile=True: the step's forward through torch.compile (the cbq GEMM and act-quant
    ops opaque inside it), captured, gives the eager loop's tokens (fp32 compute, so that
    inductor's reordered elementwise arithmetic cannot flip an argmax); also with q / k / v
    and gate / up fused (fuse_projections), the combination bench_generate times next."""
    from cbq_ptq.generate import decode_loop
    from cbq_ptq.serve import fuse_projections, rtn_kernels

    model = random_llama(256, 512, vocab=1000, device="cuda")
    rtn_kernels(model, parse_setting("W4A8"), torch.float32)
    if fuse:
        assert fuse_projections(model) > 0
    ids = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(1)).cuda()
    eager, _, _ = decode_loop(model, ids, 10, capture=False)
    compiled, _, decode = decode_loop(model, ids, 10, compile=True)
    assert torch.equal(compiled, eager) and decode > 0


@pytest.mark.parametrize("setting", ["W4A16g128", "W4A8", "W4A4"])
def test_fused_projections_on_the_gpu_kernels(setting):
    """fuse_projections on decode-layout weights (layout 'auto' on the GPU): the fused model's
    logits match the unfused one's up to the bf16 rounding of differently split sums, at
    decode (M = 2, the CUDA kernel) and prefill (M = 96, the expanded path) sizes."""
    from cbq_ptq.serve import fuse_projections, rtn_kernels

    model = random_llama(512, 1408, heads=8, vocab=1000, device="cuda", dtype=torch.bfloat16)
    rtn_kernels(model, parse_setting(setting), torch.bfloat16)
    fused = copy.deepcopy(model)
    assert fuse_projections(fused) == 4
    for rows in (1, 48):
        ids = torch.randint(3, 1000, (2, rows), generator=torch.Generator().manual_seed(rows))
        with torch.no_grad():
            want, got = model(ids.cuda()).logits.float(), fused(ids.cuda()).logits.float()
        assert float((got - want).abs().max()) <= 0.02 * float(want.abs().max()), rows


def _assert_fused_serves_as_unfused(setting, ref, model, fused):
    """The contract of a fusion into the activation quantizer (fuse_norms, fuse_swiglu), at a
    decode and a prefill size: W4A8 logits within 0.05 of the unfused model's max |logit|
    (measured on an H200 for the norms: 0.022-0.037); W4A4 as close to the unquantized ``ref``
    as the unfused model is. With 4-bit activations one level is 1/7 of a row's absmax, and the
    fused quantizer's fp32 values round differently from the unfused bf16 ones: the two models
    differ by 0.25-0.40 of max |logit| even with every norm weight 1 (H200,
    scripts/diag_fuse_norms.py), as much as either differs from the bf16 model, so the contract
    is accuracy (mean |error| ratio 0.95-1.04 measured). Then the captured decode loop runs."""
    from cbq_ptq.generate import decode_loop

    for rows in (1, 48):
        ids = torch.randint(3, 1000, (2, rows), generator=torch.Generator().manual_seed(rows))
        with torch.no_grad():
            r, want, got = (m(ids.cuda()).logits.float() for m in (ref, model, fused))
        if setting == "W4A8":
            assert float((got - want).abs().max()) <= 0.05 * float(want.abs().max()), rows
        else:
            err_fused, err_unfused = (float((x - r).abs().mean()) for x in (got, want))
            assert err_fused <= 1.15 * err_unfused, (rows, err_fused, err_unfused)
    ids = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(1)).cuda()
    tokens, _, decode = decode_loop(fused, ids, 8)
    assert tokens.shape == (2, 8) and decode > 0


@pytest.mark.parametrize("setting", ["W4A8", "W4A4"])
def test_fused_norms_on_the_gpu_kernels(setting):
    """fuse_norms on the GPU (bf16): each block's norms run inside the Triton activation
    quantizer of the fused q / k / v and gate / up GEMMs; the logits match the unfused model
    up to the bf16 rounding of the normed values that the fused quantizer skips (codes at a
    rounding boundary move by one level), at decode and prefill sizes, and the captured
    decode loop runs with it."""
    from cbq_ptq.serve import FoldedNorm, fuse_norms, fuse_projections, rtn_kernels

    model = random_llama(512, 1408, heads=8, vocab=1000, device="cuda", dtype=torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(5)
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.data = (torch.rand(norm.weight.shape, generator=g, device="cuda")
                                + 0.5).to(torch.bfloat16)  # fmt: skip
    ref = copy.deepcopy(model)
    rtn_kernels(model, parse_setting(setting), torch.bfloat16)
    assert fuse_projections(model) == 4
    fused = copy.deepcopy(model)
    assert fuse_norms(fused) == 4
    assert isinstance(fused.model.layers[0].input_layernorm, FoldedNorm)
    _assert_fused_serves_as_unfused(setting, ref, model, fused)


@pytest.mark.parametrize("setting", ["W4A8", "W4A4"])
def test_fused_swiglu_on_the_gpu_kernels(setting):
    """fuse_swiglu on the GPU (bf16, after fuse_projections and fuse_norms, as
    load_for_generation(fuse_swiglu=True) runs them): each MLP's SwiGLU runs inside the down
    projection's Triton activation quantizer. W4A8: the logits within 0.05 of the max |logit|
    of the unfused model; W4A4: as close to the unquantized model as the unfused one (the
    contract of test_fused_norms_on_the_gpu_kernels, for the same reason); the captured
    decode loop runs with it."""
    from cbq_ptq.serve import SwiGLUMLP, fuse_norms, fuse_projections, fuse_swiglu, rtn_kernels

    model = random_llama(512, 1408, heads=8, vocab=1000, device="cuda", dtype=torch.bfloat16)
    ref = copy.deepcopy(model)
    rtn_kernels(model, parse_setting(setting), torch.bfloat16)
    fuse_projections(model)
    fuse_norms(model)
    fused = copy.deepcopy(model)
    assert fuse_swiglu(fused) == 2
    assert isinstance(fused.model.layers[0].mlp, SwiGLUMLP)
    _assert_fused_serves_as_unfused(setting, ref, model, fused)
