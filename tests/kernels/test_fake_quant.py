"""Fake-quantization kernels against the PyTorch reference (CPU: Triton's interpreter)."""

from unittest import mock

import pytest
import torch

from cbq_kernels import fake_quant as fq_module
from cbq_kernels.fake_quant import (
    fake_quant,
    fake_quant_act,
    fake_quant_act_ref,
    fake_quant_ref,
    fake_quant_weight,
    fake_quant_weight_ref,
)
from cbq_kernels.quant_math import qrange, segment_index, segment_reduce, weight_params

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (rows, K, group_size): per-channel, dividing groups, ragged last groups, group > K.
LAYOUTS = ((5, 37, None), (6, 64, 16), (4, 100, 32), (3, 50, 7), (2, 20, 64), (1, 1, None))


def make_case(n, k, group_size, factors, symmetric, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, k, generator=g) * 0.1).to(dtype)
    groups = 1 if group_size is None else -(-k // group_size)
    shape = (1,) if factors == "shared" else (n, groups)
    fmax = fmin = None
    if factors != "none":
        fmax = torch.rand(shape, generator=g) * 0.4 + 0.6
        fmin = None if symmetric else torch.rand(shape, generator=g) * 0.4 + 0.6
    return x, fmax, fmin


def grads(fn, x, fmax, fmin, dy):
    x = x.detach().clone().requires_grad_()
    params = [f.detach().clone().requires_grad_() if f is not None else None for f in (fmax, fmin)]
    y = fn(x, *params)
    inputs = [x] + [p for p in params if p is not None]
    return y, torch.autograd.grad(y, inputs, dy)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("factors", ["none", "segment", "shared"])
def test_weight_forward_exact_and_gradients(layout, bits, symmetric, factors):
    n, k, gs = layout
    x, fmax, fmin = make_case(n, k, gs, factors, symmetric, seed=bits)
    dy = torch.randn(n, k, generator=torch.Generator().manual_seed(1))

    def kern(x, a, b):
        return fake_quant(x, bits, gs, a, b, symmetric)

    def ref(x, a, b):
        return fake_quant_ref(x, bits, gs, a, b, symmetric)

    y, g = grads(kern, x, fmax, fmin, dy)
    y_ref, g_ref = grads(ref, x, fmax, fmin, dy)
    assert torch.equal(y, y_ref)  # quantize -> dequantize is exact
    # STE input gradient, exactly: dy where the reference passes a gradient, 0 where clamped.
    assert torch.equal(g[0], torch.where(g_ref[0] != 0, dy, 0.0))
    # Clipping factors: fp32 sums in another order.
    for got, want in zip(g[1:], g_ref[1:], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * want.abs().max())


@pytest.mark.parametrize("dtype", DTYPES)
def test_storage_dtypes(dtype):
    x, fmax, fmin = make_case(7, 96, 32, "segment", False, dtype)
    y = fake_quant(x, 4, 32, fmax, fmin)
    assert y.dtype == dtype
    assert torch.equal(y, fake_quant_ref(x, 4, 32, fmax, fmin))
    dy = torch.randn(7, 96).to(dtype)
    dx, _, _ = torch.ops.cbq.fake_quant_backward(dy, x, 4, 32, fmax, fmin, False)
    assert dx.dtype == dtype


def test_weight_wrapper_takes_logits():
    w = torch.randn(8, 64)
    a = torch.full((8, 2), 2.0, requires_grad=True)
    c = torch.full((8, 2), 1.0, requires_grad=True)
    y = fake_quant_weight(w, 3, 32, a, c)
    y_ref = fake_quant_weight_ref(w, 3, 32, a, c)
    assert torch.equal(y, y_ref)
    (y * y).sum().backward()
    assert a.grad is not None and c.grad is not None and a.grad.abs().sum() > 0


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_activation_per_token(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 5, 48, generator=g) * 3
    logit = torch.tensor([1.5], requires_grad=True)
    xr = x.clone().requires_grad_()
    y = fake_quant_act(xr, bits, logit)
    y_ref = fake_quant_act_ref(x, bits, logit)
    assert y.shape == x.shape and torch.equal(y, y_ref)
    dy = torch.randn(x.shape, generator=g)
    dx, dlogit = torch.autograd.grad(y, [xr, logit], dy)
    xr2 = x.clone().requires_grad_()
    logit2 = logit.detach().clone().requires_grad_()
    dx_ref, dlogit_ref = torch.autograd.grad(
        fake_quant_act_ref(xr2, bits, logit2), [xr2, logit2], dy
    )
    assert torch.equal(dx, torch.where(dx_ref != 0, dy, 0.0))
    torch.testing.assert_close(dlogit, dlogit_ref, rtol=1e-4, atol=1e-7)
    # Each token has its own scale: its largest magnitude times the ratio lands on a level.
    levels = (1 << (bits - 1)) - 1
    s = torch.sigmoid(logit.detach()) * x.abs().amax(-1, keepdim=True) / levels
    assert torch.allclose(y / s, torch.round(y / s), atol=1e-3)


def test_constant_and_zero_segments():
    x = torch.zeros(3, 16)
    x[1] = 0.25
    y = fake_quant(x, 4, 8)
    assert torch.equal(y, fake_quant_ref(x, 4, 8)) and torch.isfinite(y).all()


# ------------------------------------------------------------------ gradcheck (fp64)


class FrozenRounding:
    """Holds the rounding residuals round(t) - t of a base point fixed, so that the STE
    surrogate is an ordinary piecewise-linear function whose true derivative is the STE
    gradient: gradcheck then verifies the LSQ / zero-point formulas of the reference."""

    def __init__(self):
        self.residuals: list[torch.Tensor] = []
        self.calls = 0

    def __call__(self, t):
        if self.calls < len(self.residuals):
            r = self.residuals[self.calls]
        else:
            r = (torch.round(t) - t).detach()
            self.residuals.append(r)
        self.calls += 1
        return t + r


def kink_free_case(n, k, group_size, bits, symmetric, g):
    """fp64 data and factors such that no element sits on a clamp kink of the STE surrogate:
    each segment's extremes are strictly clamped, every other element rounds to a code at
    least one level inside the range. A finite difference then stays on one linear piece."""
    gs = k if group_size is None else group_size
    groups = k // gs
    x = torch.zeros(n, k, dtype=torch.float64)
    x.view(n, groups, gs)[:, :, 0] = torch.rand(n, groups, generator=g, dtype=torch.float64) + 0.5
    x.view(n, groups, gs)[:, :, 1] = -torch.rand(n, groups, generator=g, dtype=torch.float64) - 0.5
    if symmetric:  # +-max|x|: with factors < 7/8.5 both land strictly beyond -8 and 7
        x.view(n, groups, gs)[:, :, 1] = -x.view(n, groups, gs)[:, :, 0]
    fmax = torch.rand(n, groups, generator=g, dtype=torch.float64) * 0.1 + 0.65
    fmin = None
    if not symmetric:
        fmin = torch.rand(n, groups, generator=g, dtype=torch.float64) * 0.1 + 0.65
    _, _, _, s, z, _, gid = weight_params(x, group_size, bits, symmetric, fmax, fmin)
    qlo, qhi = qrange(bits, symmetric)
    codes = torch.randint(int(qlo) + 1, int(qhi) - 1, (n, k), generator=g).double()
    frac = torch.rand(n, k, generator=g, dtype=torch.float64) * 0.3 + 0.1
    frac = frac * torch.where(torch.rand(n, k, generator=g) < 0.5, -1.0, 1.0).double()
    inner = (codes - z[:, gid] + frac) * s[:, gid]
    keep = x != 0
    return torch.where(keep, x, inner), fmax, fmin


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [None, 8])
def test_gradcheck_reference_fp64(symmetric, group_size):
    # x itself is not checked here: the statistics (max/min) are constants of the STE by
    # definition, but a finite difference on an extreme element moves them. dx is checked
    # exactly against the clamp mask above.
    x, fmax, fmin = kink_free_case(
        3, 16, group_size, 4, symmetric, torch.Generator().manual_seed(3)
    )
    frozen = FrozenRounding()
    inputs = (
        (fmax.requires_grad_(),) if symmetric else (fmax.requires_grad_(), fmin.requires_grad_())
    )

    def fn(*factors):
        frozen.calls = 0
        return fake_quant_ref(x, 4, group_size, factors[0], None if symmetric else factors[1],
                              symmetric)  # fmt: skip

    from cbq_kernels import quant_math

    with mock.patch.object(fq_module, "round_ste", frozen), \
            mock.patch.object(quant_math, "round_ste", frozen):  # fmt: skip
        fn(*inputs)
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-7, atol=1e-6)


# ------------------------------------------------------------------ errors and registration


def test_bad_input():
    x = torch.randn(4, 32)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        fake_quant(x.to(torch.int32), 4)
    with pytest.raises(ValueError, match=r"x must be 2-D.*shape \(32,\)"):
        fake_quant(x[0], 4)
    with pytest.raises(ValueError, match="x must be contiguous"):
        fake_quant(x.t(), 4)
    with pytest.raises(ValueError, match=r"bits must be in \[2, 8\], got 9"):
        fake_quant(x, 9)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        fake_quant(x, 4, 0)
    with pytest.raises(ValueError, match=r"max factor must have one element .*\(4, 4\).*got "
                                         r"shape \(4, 2\)"):  # fmt: skip
        fake_quant(x, 4, 8, torch.ones(4, 2))
    with pytest.raises(ValueError, match="min factor is meaningless for symmetric"):
        fake_quant(x, 4, None, torch.ones(1), torch.ones(1), True)
    with pytest.raises(ValueError, match=r"activation bits must be in \[4, 8\], got 3"):
        fake_quant_act(x, 3)
    with pytest.raises(ValueError, match="clip_logit must have one element"):
        fake_quant_act(x, 8, torch.ones(2))


def test_opcheck_and_compile():
    x, fmax, fmin = make_case(6, 40, 16, "segment", False)
    torch.library.opcheck(torch.ops.cbq.fake_quant.default, (x, 4, 16, fmax, fmin, False))
    dy = torch.randn(6, 40)
    torch.library.opcheck(
        torch.ops.cbq.fake_quant_backward.default, (dy, x, 4, 16, fmax, fmin, False)
    )

    def loss(x, a, b):
        return (fake_quant_weight(x, 4, 16, a, b) ** 2).sum()

    a = torch.full((6, 3), 3.0, requires_grad=True)
    b = torch.full((6, 3), 3.0, requires_grad=True)
    compiled = torch.compile(loss, fullgraph=True)
    got = compiled(x, a, b)
    (ga,) = torch.autograd.grad(got, [a])
    want = loss(x, a, b)
    (wa,) = torch.autograd.grad(want, [a])
    assert torch.equal(got, want) and torch.allclose(ga, wa)


@pytest.mark.parametrize("layout", [(5, 37, None), (4, 100, 32), (3, 50, 7)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_two_sweep_path(layout, symmetric):
    """Segments longer than one tile (K > 4096 per channel on the GPU) take the looped
    two-sweep path; small tiles force it here on small shapes."""
    n, k, gs = layout
    x, fmax, fmin = make_case(n, k, gs, "segment", symmetric, seed=3)
    dy = torch.randn(n, k, generator=torch.Generator().manual_seed(2))

    def ref(x, a, b):
        return fake_quant_ref(x, 4, gs, a, b, symmetric)

    def kern(x, a, b):
        return fake_quant(x, 4, gs, a, b, symmetric)

    with mock.patch.object(fq_module, "_grid_config", return_value=(2, 4, 1, False)):
        y, g = grads(kern, x, fmax, fmin, dy)
    y_ref, g_ref = grads(ref, x, fmax, fmin, dy)
    assert torch.equal(y, y_ref)
    assert torch.equal(g[0], torch.where(g_ref[0] != 0, dy, 0.0))
    for got, want in zip(g[1:], g_ref[1:], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * want.abs().max())


@pytest.mark.parametrize(("k", "group_size"), [(64, None), (64, 16), (70, 16), (10, 32), (1, 1)])
@pytest.mark.parametrize("op", ["amax", "amin", "sum"])
def test_segment_reduce_matches_a_scatter(k, group_size, op):
    """The reshape-based segment reduction equals a scatter over the segment index (ragged
    last segment and a segment longer than the row included)."""
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    gid, groups = segment_index(k, group_size, x.device)
    init = {"amax": float("-inf"), "amin": float("inf"), "sum": 0.0}[op]
    want = x.new_full((5, groups), init).scatter_reduce(1, gid.expand(5, k), x, op)
    torch.testing.assert_close(segment_reduce(x, group_size, op), want)
