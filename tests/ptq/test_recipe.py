"""GPTQ (baseline and start), the clipping search, LoRA-Rounding's start, the never-worse
rule and the default recipe against round-to-nearest (CPU, stories260K)."""

import copy

import pytest
import torch

from cbq_kernels.quant_math import (
    dequantize_weight,
    quantize_weight,
    quantize_weight_two_level,
    weight_params,
)
from cbq_ptq.config import CBQConfig, parse_setting
from cbq_ptq.data import calibration_data
from cbq_ptq.evaluate import evaluate_perplexity
from cbq_ptq.gptq import gptq, gptq_two_level, search_clip, search_clip_two_level
from cbq_ptq.models import SHARED_MODELS, load_model
from cbq_ptq.pipeline import quantize
from cbq_ptq.qlinear import QLinear, clip_logit, quantized
from tests.conftest import need_shared


def correlated(n_tok=512, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    return torch.randn(n_tok, k, generator=g) @ mix


def output_error(w, w_hat, h):
    d = (w - w_hat).double()
    return float(torch.einsum("nk,kl,nl->", d, h.double(), d))


@pytest.mark.parametrize(("bits", "gs"), [(4, None), (3, 16), (2, 32)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(bits, gs, act_order):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(24, 64, generator=g) * 0.05
    x = correlated(seed=bits)
    h = x.t() @ x / x.shape[0]
    codes, s, z = gptq(w, h, bits, gs, act_order=act_order, damp=0.01, block=16)
    rtn_codes, rs, rz = quantize_weight(w, bits, gs)
    assert torch.equal(s, rs) and torch.equal(z, rz)  # static groups: RTN's quantizer
    assert codes.dtype == torch.uint8 and int(codes.max()) < (1 << bits)
    err = output_error(w, dequantize_weight(codes, s, z, gs), h)
    err_rtn = output_error(w, dequantize_weight(rtn_codes, s, z, gs), h)
    assert err < 0.8 * err_rtn


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    """With a diagonal Hessian no error is fed forward: GPTQ's codes are RTN's exactly."""
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(4)) * 0.05
    h = torch.diag(torch.rand(32, generator=torch.Generator().manual_seed(5)) + 0.5)
    codes, _, _ = gptq(w, h, 3, 16, act_order=True, damp=0.0)
    assert torch.equal(codes, quantize_weight(w, 3, 16)[0])


def test_gptq_bad_shapes_are_clear_errors():
    w = torch.zeros(4, 32)
    with pytest.raises(ValueError, match=r"Hessian \(K, K\); got w \(4, 32\), Hessian \(16, 16\)"):
        gptq(w, torch.eye(16), 4, None)
    with pytest.raises(ValueError, match=r"clip must be \(N, groups\) = \(4, 2\)"):
        gptq(w, torch.eye(32), 4, 16, clip=torch.ones(4, 1))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_two_level_keeps_the_format_and_beats_its_round_to_nearest(act_order):
    """GPTQ on the two-level grid (settings.two_level): the same s1, s2, z as the
    round-to-nearest two-level quantizer, codes in 0..15 with s2 (q - z) inside int8 (what
    the served GEMM multiplies; some rows get steps > 8, where the clamp can bind), and a
    smaller output error on correlated inputs."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(32, 128, generator=g) * 0.05
    w[:4, :64] *= 0.05  # small groups beside a large row maximum: steps 1..2
    w[4:8, 64:] *= 4.0  # large groups: steps up to 16
    x = correlated(k=128, seed=12)
    h = x.t() @ x / x.shape[0]
    codes, s1, s2, z = gptq_two_level(w, h, 64, act_order=act_order, damp=0.01, block=32)
    rtn, rs1, rs2, rz = quantize_weight_two_level(w, 64)
    assert torch.equal(s1, rs1) and torch.equal(s2, rs2.float()) and torch.equal(z, rz.float())
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    gid = torch.arange(128) // 64
    w8 = s2[:, gid] * (codes.float() - z[:, gid])
    assert float(w8.abs().max()) <= 127 and float(s2.max()) > 8
    scales = s1[:, None] * s2
    err = output_error(w, dequantize_weight(codes, scales, z, 64), h)
    err_rtn = output_error(w, dequantize_weight(rtn, scales, rz.float(), 64), h)
    assert err < 0.8 * err_rtn
    with pytest.raises(ValueError, match=r"Hessian \(K, K\); got w \(32, 128\)"):
        gptq_two_level(w, torch.eye(64), 64)
    # with the clipping search's factors: still the format, and no worse on this problem
    clip = search_clip_two_level(w, h.diagonal(), 64)
    codes_c, s1_c, s2_c, z_c = gptq_two_level(w, h, 64, act_order=act_order, damp=0.01,
                                              block=32, clip=clip)  # fmt: skip
    assert torch.equal(s1_c, s1) and float(clip.min()) < 1.0  # s1 is the row's; some clipped
    w8_c = s2_c[:, gid] * (codes_c.float() - z_c[:, gid])
    assert float(w8_c.abs().max()) <= 127 and int(codes_c.max()) <= 15
    err_c = output_error(w, dequantize_weight(codes_c, s1_c[:, None] * s2_c, z_c, 64), h)
    assert err_c <= 1.05 * err


def test_two_level_clip_search_picks_the_grid_minimum():
    """search_clip_two_level: per group, the factor whose round-to-nearest two-level weight has
    the smallest diag-weighted error among the grid's (an outlier on a quiet input channel
    gets clipped)."""
    from cbq_kernels.quant_math import two_level_code_bounds, two_level_grid

    g = torch.Generator().manual_seed(13)
    w = torch.randn(6, 64, generator=g) * 0.05
    w[:, 3] = 0.5
    w[:, 40] = 0.3
    diag = torch.rand(64, generator=g) + 0.1
    diag[3] = 1e-4
    grid = [1.0, 0.8, 0.6, 0.4]
    best = search_clip_two_level(w, diag, 32, grid=grid)

    def errors(clip):
        _, s1, s2, z = two_level_grid(w, 32, clip=clip)
        s = (s1[:, None] * s2)[..., None]
        lo, hi = two_level_code_bounds(s2, z)
        wg = w.view(6, 2, 32)
        q = torch.minimum(torch.maximum(torch.round(wg / s) + z[..., None], lo[..., None]),
                          hi[..., None])  # fmt: skip
        return (diag.view(1, 2, 32) * (wg - (q - z[..., None]) * s) ** 2).sum(-1)

    got = errors(best)
    for f in grid:
        assert (got <= errors(torch.full((6, 2), f)) + 1e-12).all()
    assert int((best[:, 0] < 1.0).sum()) >= 4  # the outlier's group is clipped in most rows


def test_clip_search_picks_the_grid_minimum():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(5, 32, generator=g) * 0.05
    w[:, 3] = 0.5  # one outlier per row, on an input channel that carries little energy:
    diag = torch.rand(32, generator=g) + 0.1
    diag[3] = 1e-4  # clipping it pays at 2 bits
    best = search_clip(w, diag, 2, 16, grid=[1.0, 0.8, 0.6, 0.4])
    for f in (1.0, 0.8, 0.6, 0.4):
        fac = torch.full((5, 2), f)
        err = []
        for cand in (best, fac):
            codes, s, z = quantize_weight(w, 2, 16, False, cand, cand)
            d = diag * (w - dequantize_weight(codes, s, z, 16)) ** 2
            err.append(d.reshape(5, 2, 16).sum(-1))
        assert (err[0] <= err[1] + 1e-12).all()
    assert float(best[:, 0].max()) < 1.0  # the outlier's group is clipped


def lin(n=24, k=64, seed=0):
    layer = torch.nn.Linear(k, n)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return layer


@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize("setting", ["W4A16", "W2A16g32"])
def test_a_start_from_given_codes_is_reproduced_by_hardening(lora, setting):
    """start_from (the GPTQ start): before any training the hard forward and the hardened
    codes are the given codes, with or without LoRA-Rounding."""
    st = parse_setting(setting)
    layer = lin(seed=2)
    q = QLinear(layer, st, lora=lora, learn_clipping=True)
    groups = q.clip_max.shape[1]
    clip = torch.full((24, groups), 0.9)
    clip[::2] = 1.0  # a factor of 1 (min-max) is represented exactly
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 1 << st.w_bits, (24, 64), generator=g, dtype=torch.uint8)
    q.start_from(codes, clip)
    s, z = q.quant_params()
    _, _, _, s_want, z_want, _, _ = weight_params(q.w, q.gs, st.w_bits, False, clip, clip)
    torch.testing.assert_close(s, s_want, rtol=1e-6, atol=0)  # the start's quantizer
    assert torch.equal(z, z_want)
    with quantized([q], rounding="hard"):
        w_hard = q._scope[1]
    assert torch.allclose(w_hard, dequantize_weight(codes, s, z, q.gs), atol=1e-7)
    q.harden()
    assert torch.equal(q.codes, codes)


@pytest.mark.parametrize("lora", [True, False])
def test_a_rounding_base_fixed_at_the_start_keeps_its_candidates_when_the_step_moves(lora):
    """lora_base='start': the start's codes are reproduced as with 'step'; after the step
    grows by 8% the hard codes stay the start's (relative to the zero point) where 'step'
    re-derives floor(w_round / s) and moves the large ones; the soft weight's step gradient
    is that of s (floor(u) + h) with the integer floor fixed (checked against the formula
    by autograd)."""
    from cbq_kernels.lora_round import GAMMA, ZETA

    st = parse_setting("W4A16")
    codes = torch.randint(0, 16, (24, 64), generator=torch.Generator().manual_seed(4),
                          dtype=torch.uint8)  # fmt: skip
    clip = torch.full((24, 1), 0.9)
    layers = {}
    for base in ("step", "start"):
        q = QLinear(lin(seed=2), st, lora=lora, learn_clipping=True, lora_base=base)
        q.start_from(codes, clip)
        with quantized([q], rounding="hard"):
            assert torch.equal(q._scope[1], dequantize_weight(codes, *q.quant_params(), q.gs))
        layers[base] = q
    moved = {}
    for base, q in layers.items():
        s0, z0 = q.quant_params()
        with torch.no_grad():  # larger clipping factors: the step grows by 10%
            for p in (q.clip_max, q.clip_min):
                p.copy_(clip_logit(torch.full_like(clip, 0.99)))
        s1, _ = q.quant_params()
        assert float((s1 / s0).detach().min()) > 1.09
        with quantized([q], rounding="hard"):
            moved[base] = torch.round(q._scope[1] / s1) - (codes.float() - z0)
    assert int(moved["start"].abs().sum()) == 0
    assert int(moved["step"].abs().sum()) > 0
    q = layers["start"]
    w_soft, _ = q.weight_hat("soft")
    s, z = q.quant_params()
    v = (q.v0.float() if q.v0 is not None else 0) + q.lora_a @ q.lora_b
    h = (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
    want = s * ((q.w_base + h + z).clamp(0, 15) - z)
    torch.testing.assert_close(w_soft, want, rtol=0, atol=1e-6)
    g = torch.randn(24, 64, generator=torch.Generator().manual_seed(5))
    params = [q.clip_max, q.clip_min]
    got = torch.autograd.grad((w_soft * g).sum(), params)
    ref = torch.autograd.grad((want * g).sum(), params)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="lora_base"):
        QLinear(lin(), st, lora_base="floor")


def test_clipping_and_activation_ratios_start_at_one():
    """Without a search the clipping starts at min-max (factor 1 exactly) and the activation
    ratio at 1: the untrained layer quantizes as round-to-nearest does."""
    from cbq_ptq.qlinear import clip_factor

    layer = lin(seed=5)
    q = QLinear(layer, parse_setting("W4A8"), lora=False, learn_clipping=True)
    assert torch.equal(clip_factor(q.clip_max), torch.ones_like(q.clip_max))
    assert float(clip_factor(q.act_logit.detach())) == 1.0
    rtn = QLinear(layer, parse_setting("W4A8"), lora=False, train=False)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(6))
    with quantized([q], rounding="hard"):
        got = q(x)
    torch.testing.assert_close(got, rtn(x), rtol=0, atol=0)


def test_an_activation_clip_below_one_is_where_the_ratio_starts_and_what_rtn_keeps():
    from cbq_ptq.qlinear import clip_factor

    layer, st = lin(seed=5), parse_setting("W4A4")
    q = QLinear(layer, st, lora=False, learn_clipping=True, act_clip=0.9)
    assert q.act_logit.requires_grad
    torch.testing.assert_close(clip_factor(q.act_logit.detach()), torch.tensor([0.9]))
    rtn = QLinear(layer, st, lora=False, train=False, act_clip=0.9)
    assert rtn.act_logit is None and float(rtn.act_ratio) == pytest.approx(0.9)
    full = QLinear(layer, st, lora=False, train=False)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(6))
    x[:, 3] *= 20  # an outlier channel sets every token's range
    with quantized([q], rounding="hard"):
        got = q(x)
    torch.testing.assert_close(got, rtn(x), rtol=0, atol=1e-6)  # learned = fixed at the start
    assert not torch.allclose(rtn(x), full(x))  # 0.9 quantizes otherwise than 1.0
    q.harden()
    assert float(q.act_ratio) == pytest.approx(0.9)
    with pytest.raises(ValueError, match=r"act_clip must be in \(0, 1\], got 1.5"):
        QLinear(layer, st, act_clip=1.5)
    with pytest.raises(ValueError, match=r"act_clip must be in \(0, 1\], got 0"):
        CBQConfig(act_clip=0)


def test_lora_rounding_reaches_both_neighbours():
    """From the round-to-nearest start, V0 = +-margin: pushing V up / down moves codes to
    floor + 1 / floor, i.e. both neighbours of the weight are reachable."""
    q = QLinear(lin(seed=4), parse_setting("W3A16g32"), lora=True)
    s, z = q.quant_params()
    gid = torch.arange(64) // 32
    u = q.w / s[:, gid]
    fl = torch.floor(u) + z[:, gid]
    with torch.no_grad():
        q.lora_a.fill_(1.0)
        q.lora_b.fill_(100.0)  # V = V0 + 800 > 0 everywhere: every code is floor + 1
    up = copy.deepcopy(q)
    up.harden()
    assert torch.equal(up.codes.float(), (fl + 1).clamp(0, 7))
    with torch.no_grad():
        q.lora_b.fill_(-100.0)
    q.harden()
    assert torch.equal(q.codes.float(), fl.clamp(0, 7))


@pytest.fixture(scope="module")
def stories():
    need_shared(SHARED_MODELS / "stories260K" / "config.json")
    need_shared(SHARED_MODELS.parent / "data" / "tinystories-valid-prefix.txt")
    return load_model("stories260K")


@pytest.mark.slow
def test_a_diverging_window_keeps_its_start(stories):
    """A learning rate of 10 makes training diverge: every window keeps the better state on
    the held-out windows, here the start, and says so; the model equals the untrained one."""
    model, tok = stories
    torch.manual_seed(0)
    ids = calibration_data(tok, "tinystories", 8, 64, seed=1)
    st = parse_setting("W3A16g32", ragged_groups=True)
    wild = CBQConfig(settings=st, steps=6, lr=10.0, lr_lora=10.0, warmup=0.0, holdout=0.25)
    start = CBQConfig(settings=st, steps=1, lr=0.0, lr_lora=0.0, holdout=0.25)
    q, log = quantize(copy.deepcopy(model), wild, ids, progress=False)
    q0, _ = quantize(copy.deepcopy(model), start, ids, progress=False)
    assert all(e["loss_after"] <= e["loss_before"] for e in log)
    assert sum(e["kept"] == "start" for e in log) >= 3
    assert all(e["hard_end"] is None or e["hard_end"] > e["loss_after"] for e in log
               if e["kept"] == "start")  # fmt: skip
    with torch.no_grad():
        same = [torch.equal(a.codes, b.codes) for a, b in zip(
            [m for m in q.modules() if isinstance(m, QLinear)],
            [m for m in q0.modules() if isinstance(m, QLinear)], strict=True)]  # fmt: skip
    assert sum(same) >= 5 * 3  # the kept-start windows' blocks have the start's codes


@pytest.mark.slow
@pytest.mark.parametrize(("setting", "margin"), [("W2A16g32", 0.5), ("W4A4", 0.95)])
def test_default_cbq_beats_round_to_nearest_by_a_clear_margin(stories, setting, margin):
    """The CLI's default recipe for the setting (cbq_ptq.config.recipe) against RTN, on
    held-out TinyStories windows: CBQ's perplexity below margin x RTN's."""
    from cbq_ptq.config import recipe

    model, tok = stories
    ids = calibration_data(tok, "tinystories", 32, 256, seed=0)
    st = parse_setting(setting, ragged_groups=True)
    cbq = CBQConfig(settings=st, **recipe(st, "cpu"))
    rtn = CBQConfig(settings=st, epochs=0, cfp=False, lora_rounding=False, window=1, overlap=0)
    ev = {"corpus": "tinystories", "seq_len": 512, "bos": True, "max_windows": 16}
    ppl = {}
    for name, cfg in (("cbq", cbq), ("rtn", rtn)):
        q, _ = quantize(copy.deepcopy(model), cfg, ids, progress=False)
        ppl[name] = evaluate_perplexity(q, tok, **ev)["ppl"]
    assert ppl["cbq"] < margin * ppl["rtn"], ppl


def test_gptq_to_grid_is_gptq_on_the_same_grid_and_rounding_without_correlation():
    """gptq_to_grid (the hardening toward a target on a learned grid) runs GPTQ's column loop:
    on GPTQ's own grid and target it gives GPTQ's codes; with a diagonal Hessian it is
    round-to-nearest of the target on the given grid."""
    from cbq_kernels.quant_math import qrange, round_codes
    from cbq_ptq.gptq import gptq_to_grid

    g = torch.Generator().manual_seed(7)
    w = torch.randn(12, 64, generator=g) * 0.05
    x = correlated(seed=7)
    h = x.t() @ x / x.shape[0]
    codes, s, z = gptq(w, h, 3, 16, act_order=True, damp=0.01, block=16)
    assert torch.equal(gptq_to_grid(w, h, s, z, 3, 16, True, 0.01, 16), codes)
    target = w + torch.randn(12, 64, generator=g) * 0.01  # e.g. a soft-rounded weight
    diag = torch.diag(torch.rand(64, generator=g) + 0.5)
    got = gptq_to_grid(target, diag, s, z, 3, 16, True, 0.0, 16)
    gid = torch.arange(64) // 16
    lo, hi = qrange(3, False)
    want = round_codes(target / s[:, gid], z[:, gid], lo, hi)
    assert torch.equal(got, want.to(torch.uint8))
    with pytest.raises(ValueError, match=r"target must be \(N, K\) and the Hessian \(K, K\)"):
        gptq_to_grid(w, torch.eye(16), s, z, 3, 16)


def test_codes_given_to_a_layer_rule_its_forward_and_its_hardening():
    """QLinear.set_codes: the layer computes with the given codes under any rounding, harden
    keeps them, and None gives the trained parameters back."""
    st = parse_setting("W4A16")
    q = QLinear(lin(seed=3), st, lora=True, learn_clipping=True)
    s, z = q.quant_params()
    codes = torch.randint(0, 16, (24, 64), generator=torch.Generator().manual_seed(4),
                          dtype=torch.uint8)  # fmt: skip
    with quantized([q], rounding="soft"):
        soft = q._scope[1].clone()
    q.set_codes(codes, s, z)
    for rounding in ("soft", "hard"):
        with quantized([q], rounding=rounding):
            assert torch.equal(q._scope[1], dequantize_weight(codes, s, z, q.gs))
    q.set_codes(None)
    with quantized([q], rounding="soft"):
        assert torch.equal(q._scope[1], soft)
    q.set_codes(codes, s, z)
    q.harden()
    assert torch.equal(q.codes, codes) and q.lora_a is None


def test_hardening_toward_the_soft_weights_groups_layers_by_their_input(stories):
    """harden_toward_soft on a trained-from-start stories260K block: its groups
    (ArchSpec.groups, shared with GPTQ's start) are q / k / v, o, gate / up, down, in the order
    the block's forward calls them, and every layer gets codes on its own grid."""
    from cbq_ptq.models import arch_spec, blocks
    from cbq_ptq.pipeline import prepare_block
    from cbq_ptq.qlinear import qlinears, quantized
    from cbq_ptq.reconstruct import harden_toward_soft
    from cbq_ptq.streams import capture_inputs, run_block

    model, tok = stories
    m = copy.deepcopy(model)
    ids = calibration_data(tok, "tinystories", 4, 32, seed=2)
    x, kwargs = capture_inputs(m, ids)
    cfg = CBQConfig(settings=parse_setting("W4A16"), steps=1, batch_size=2)
    prepare_block(m, 0, x, kwargs, cfg)
    layers = blocks(m)
    qls = qlinears([layers[0]])
    spec = arch_spec(m)
    names = [[n.split(".")[-1] for n in grp] for grp in spec.groups]
    assert names == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"],
                     ["down_proj"]]  # fmt: skip
    calls = []  # the forward's call order
    hooks = [q.register_forward_pre_hook(lambda mod, args: calls.append(mod)) for q in qls]
    with torch.no_grad(), quantized(qls, rounding="hard"):
        run_block(layers[0], x[:1], kwargs)
    for h in hooks:
        h.remove()
    assert calls == [layers[0].get_submodule(n) for grp in spec.groups for n in grp]
    assert harden_toward_soft(layers, range(1), x, kwargs, qls, cfg, torch.arange(4), spec) == 7
    for q in qls:
        s, z = q.quant_params()
        assert q.codes is not None and torch.equal(q.scales, s) and torch.equal(q.zeros, z)
        assert int(q.codes.max()) <= 15


def test_the_asymmetric_target_is_the_least_squares_weight_for_the_inputs():
    """asymmetric_target: W' minimises ||x_ref W^T - x W'^T||^2 (undamped: lstsq), and is W
    when the inputs are the reference."""
    from cbq_ptq.gptq import asymmetric_target

    g = torch.Generator().manual_seed(3)
    x_ref = torch.randn(400, 32, generator=g, dtype=torch.float64)
    x = x_ref + 0.1 * torch.randn(400, 32, generator=g, dtype=torch.float64)
    w = torch.randn(8, 32, generator=g, dtype=torch.float64)
    h, cross = x.t() @ x / 400, x.t() @ (x_ref - x) / 400
    got = asymmetric_target(w, h, cross, 1e-12)
    want = torch.linalg.lstsq(x, x_ref @ w.t()).solution.t()
    assert torch.allclose(got, want, atol=1e-8)
    assert torch.equal(asymmetric_target(w, h, torch.zeros_like(h), 0.01), w)
    shrunk = asymmetric_target(w, h, cross, 0.5)  # dampening pulls W' toward W
    assert (shrunk - w).norm() < (got - w).norm()


def test_gptq_targets_on_a_block(stories):
    """gptq_target on a block whose reference input is its input: at W4A16 'fp' gives the
    first group (q/k/v: the same input in both runs, nothing quantizes it) GPTQ's codes of
    'quantized' and moves later groups; at W4A8 'act' (H of the quantized activations)
    moves the first group; a reference of another shape is a clear error."""
    from cbq_ptq.models import blocks
    from cbq_ptq.pipeline import prepare_block
    from cbq_ptq.qlinear import qlinears
    from cbq_ptq.streams import capture_inputs

    model, tok = stories
    x, kwargs = capture_inputs(model, calibration_data(tok, "tinystories", 4, 64, seed=2))

    def start(setting, target):
        m = copy.deepcopy(model)
        cfg = CBQConfig(settings=parse_setting(setting), init="gptq", steps=1, cfp=False,
                        gptq_target=target)  # fmt: skip
        info = prepare_block(m, 0, x, kwargs, cfg)
        assert info["start"] == "gptq" and ("target_shift_max" in info) == (target == "fp")
        return {q.name.split(".")[-1]: q.weight_hat("hard")[0] for q in qlinears([blocks(m)[0]])}

    first, later = ("q_proj", "k_proj", "v_proj"), ("o_proj", "gate_proj", "up_proj", "down_proj")
    plain, fp = start("W4A16", "quantized"), start("W4A16", "fp")
    assert all(torch.equal(fp[n], plain[n]) for n in first)
    assert all(not torch.equal(fp[n], plain[n]) for n in later)
    plain8, act8 = start("W4A8", "quantized"), start("W4A8", "act")
    assert all(not torch.equal(act8[n], plain8[n]) for n in first)
    with pytest.raises(ValueError, match="x_ref must have x_in's shape"):
        prepare_block(copy.deepcopy(model), 0, x, kwargs,
                      CBQConfig(settings=parse_setting("W4A8"), init="gptq", steps=1,
                                gptq_target="fp"), x[:2])  # fmt: skip
    with pytest.raises(ValueError, match="gptq_target must be one of"):
        CBQConfig(gptq_target="exact")


@pytest.mark.parametrize("setting", ["W4A8", "W3A16g32", "W2A16g16"])
@pytest.mark.parametrize("rounding", ["soft", "ste"])
def test_fixed_codes_on_the_cpu_take_the_ops_values_and_gradients(setting, rounding):
    """A fixed-code layer (GPTQ start, no LoRA-Rounding) skips the LoRA-Rounding op on the CPU
    (QLinear._direct_fixed): the same weight, regulariser and clipping gradients as the op,
    also after the steps moved and codes clamp at the range's ends."""
    st = parse_setting(setting)
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 1 << st.w_bits, (24, 64), generator=g, dtype=torch.uint8)
    codes[:, :4] = 0
    codes[:, 4:8] = (1 << st.w_bits) - 1  # range ends: clamped once the zero point moves
    got = {}
    for direct in (True, False):
        q = QLinear(lin(seed=4), st, lora=False, learn_clipping=True)
        q._direct_fixed = direct
        clip = torch.full(q.clip_max.shape, 0.9)
        q.start_from(codes, clip)
        with torch.no_grad():  # move the steps and zero points away from the start
            q.clip_max.add_(torch.linspace(-1.5, 1.5, q.clip_max.numel()).view_as(q.clip_max))
            q.clip_min.sub_(torch.linspace(-1.0, 1.0, q.clip_min.numel()).view_as(q.clip_min))
        w, reg = q.weight_hat(rounding)
        (w * torch.linspace(-1, 1, w.numel()).view_as(w)).sum().backward()
        got[direct] = (w.detach(), float(reg), q.clip_max.grad.clone(), q.clip_min.grad.clone())
    d, o = got[True], got[False]
    torch.testing.assert_close(d[0], o[0], rtol=1e-6, atol=1e-7)
    assert d[1] == o[1] == 0.0
    torch.testing.assert_close(d[2], o[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d[3], o[3], rtol=1e-5, atol=1e-6)
    assert d[2].abs().sum() > 0 and d[3].abs().sum() > 0


def test_gptq_toward_the_fp_outputs_runs_through_the_pipeline(stories, tmp_path):
    """gptq_target 'fp' end to end (the pipeline propagates the full-precision stream to each
    block's reference run): every block logs how far W' moved, and the model differs from the
    weight-target GPTQ's."""
    model, tok = stories
    ids = calibration_data(tok, "tinystories", 4, 32, seed=2)
    got = {}
    for target in ("quantized", "fp"):
        cfg = CBQConfig(settings=parse_setting("W4A8"), method="gptq", cfp=False, window=1,
                        overlap=0, gptq_target=target)  # fmt: skip
        q, log = quantize(copy.deepcopy(model), cfg, ids, progress=False,
                          log_path=tmp_path / f"{target}.jsonl")  # fmt: skip
        blocks_info = [b for w in log for b in w["cfp"]]
        assert blocks_info and all(("target_shift_max" in b) == (target == "fp")
                                   for b in blocks_info)  # fmt: skip
        got[target] = {k: v for k, v in q.state_dict().items() if v.dtype == torch.uint8}
    assert got["fp"] and got["fp"].keys() == got["quantized"].keys()
    assert any(not torch.equal(got["fp"][k], got["quantized"][k]) for k in got["fp"])
