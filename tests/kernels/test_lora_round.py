"""LoRA-Rounding kernels against the PyTorch reference (CPU: Triton's interpreter)."""

import pytest
import torch

from cbq_kernels.lora_round import (
    harden,
    harden_ref,
    lora_round,
    lora_round_init,
    lora_round_params,
    lora_round_ref,
    start_logits,
)

# (N, K, group_size, rank): odd sizes, ragged last groups, per-channel.
# (9, 400, 192, 8): segments of 3 tiles cut by the split of the backward over K.
CASES = ((37, 70, None, 8), (40, 96, 32, 4), (33, 100, 16, 16), (5, 48, 64, 1), (64, 17, None, 32),
         (9, 400, 192, 8))  # fmt: skip


def setup(n, k, gs, r, bits, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
    groups = 1 if gs is None else -(-k // gs)
    la = (torch.rand(n, groups, generator=g) * 2 + 1).requires_grad_()
    lc = (torch.rand(n, groups, generator=g) * 2 + 1).requires_grad_()
    a = (torch.randn(n, r, generator=g) * 0.5).requires_grad_()
    b = (torch.randn(r, k, generator=g) * 0.5).requires_grad_()
    return w, la, lc, a, b


def loss_and_grads(fn, w, la, lc, a, b, bits, gs, beta, dy):
    s, z = lora_round_params(w, bits, gs, la, lc)
    y, reg = fn(w, a, b, s, z, bits, gs, beta)
    loss = (y.float() * dy).sum() + 0.01 * reg
    return y, reg, torch.autograd.grad(loss, [a, b, la, lc])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_forward_and_gradients_match_reference(case, bits):
    n, k, gs, r = case
    w, la, lc, a, b = setup(n, k, gs, r, bits, seed=bits)
    dy = torch.randn(n, k, generator=torch.Generator().manual_seed(9))
    y, reg, grads = loss_and_grads(lora_round, w, la, lc, a, b, bits, gs, 3.0, dy)
    y_ref, reg_ref, grads_ref = loss_and_grads(lora_round_ref, w, la, lc, a, b, bits, gs, 3.0, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(reg, reg_ref.float(), rtol=1e-5, atol=1e-3)
    for got, want in zip(grads, grads_ref, strict=True):  # dA, dB, both clipping logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max())


def kernel_against_reference(w, la, lc, a, b, bits, gs, beta, v0, ste, seed):
    """lora_round and lora_round_ref on the same case: forward, regulariser and gradients
    (dA, dB, both clipping logits) must agree; returns the kernel's forward."""
    dy = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed))

    def run(fn):
        s, z = lora_round_params(w, bits, gs, la, lc)
        y, reg = fn(w, a, b, s, z, bits, gs, beta, v0, ste)
        return y, reg, torch.autograd.grad((y.float() * dy).sum() + 0.01 * reg, [a, b, la, lc])

    y, reg, grads = run(lora_round)
    y_ref, reg_ref, grads_ref = run(lora_round_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(reg, reg_ref.float(), rtol=1e-5, atol=1e-3)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max())
    return y


@pytest.mark.parametrize("case", CASES[:4])
def test_straight_through_rounding_matches_reference_and_hardening(case):
    """ste=True: the forward weight is the hardened codes' weight exactly; the gradients
    (those of h(V) through the hard forward's clamp mask) equal the reference's."""
    n, k, gs, r = case
    w, la, lc, a, b = setup(n, k, gs, r, 4, seed=21)
    g = torch.Generator().manual_seed(22)
    v0 = start_logits(torch.rand(n, k, generator=g) < 0.5, 1.0, torch.float32)
    y = kernel_against_reference(w, la, lc, a, b, 4, gs, 3.0, v0, True, seed=23)
    s, z = lora_round_params(w, 4, gs, la, lc)
    codes = harden(w, a, b, s, z, 4, gs, v0=v0).float()
    gid = torch.arange(k) // (k if gs is None else gs)
    want = s.detach()[:, gid] * (codes - z.detach()[:, gid])
    torch.testing.assert_close(y.detach(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", CASES[:4])
def test_frozen_start_logits_v0_match_reference(case):
    """V = V0 + A B: forward, regulariser, gradients and hardened codes equal the reference's."""
    n, k, gs, r = case
    w, la, lc, a, b = setup(n, k, gs, r, 3, seed=11)
    g = torch.Generator().manual_seed(12)
    v0 = start_logits(torch.rand(n, k, generator=g) < 0.5, 2.0, torch.float32)
    a = (a.detach() * 0.1).requires_grad_()
    kernel_against_reference(w, la, lc, a, b, 3, gs, 4.0, v0, False, seed=13)
    s, z = lora_round_params(w, 3, gs, la, lc)
    codes = harden(w, a, b, s, z, 3, gs, rows_per_step=5, v0=v0)
    assert torch.equal(codes, harden_ref(w, a, b, s, z, 3, gs, v0))
    # With A B = 0 the hardened codes are floor + 1 exactly where V0 says so.
    zero_a = torch.zeros_like(a)
    codes0 = harden(w, zero_a, b, s, z, 3, gs, v0=v0).float()
    gid = torch.arange(k) // (k if gs is None else gs)
    base = torch.floor(w * (1 / s.detach())[:, gid]) + z.detach()[:, gid]
    want = (base + (v0 > 0).float()).clamp(0, 7)
    assert torch.equal(codes0, want)


def test_bf16_weights():
    w, la, lc, a, b = setup(32, 64, 32, 8, 4, dtype=torch.bfloat16)
    s, z = lora_round_params(w, 4, 32, la, lc)
    y, _ = lora_round(w, a, b, s, z, 4, 32)
    y_ref, _ = lora_round_ref(w, a, b, s, z, 4, 32)
    assert y.dtype == torch.bfloat16
    assert (y.float() - y_ref.float()).abs().max() <= y_ref.float().abs().max() * 2**-7


@pytest.mark.parametrize("case", CASES)
def test_harden_exact_and_consistent_with_saturated_forward(case):
    n, k, gs, r = case
    w, la, lc, a, b = setup(n, k, gs, r, 4)
    s, z = lora_round_params(w, 4, gs, la, lc)
    codes = harden(w, a, b, s, z, 4, gs, rows_per_step=7)
    assert codes.dtype == torch.uint8
    assert torch.equal(codes, harden_ref(w, a, b, s, z, 4, gs))
    # With |V| large, h saturates at 0 or 1 and the soft forward equals the hard codes
    # (scaling A keeps the sign of V = AB).
    y, _ = lora_round(w, a.detach() * 1e4, b, s, z, 4, gs)
    gid = torch.arange(k) // (k if gs is None else gs)
    want = s.detach()[:, gid] * (codes.float() - z.detach()[:, gid])
    saturated = (a @ b).detach().abs() * 1e4 > 3  # h(V) is exactly 0 or 1 beyond |V| ~ 2.4
    torch.testing.assert_close(y[saturated], want[saturated], rtol=1e-6, atol=1e-7)


def test_full_rank_svd_init_hardens_to_round_to_nearest():
    w, _la, _lc, _, _ = setup(12, 16, None, 1, 4)
    s, z = lora_round_params(w, 4, None)
    a, b = lora_round_init(w, s, None, rank=12)
    codes = harden(w, a, b, s, z, 4)
    rtn = (torch.round(w / s) + z).clamp(0, 15)
    frac = w / s - torch.floor(w / s)
    away_from_ties = ((frac - 0.5).abs() > 0.02) & (frac > 0.02) & (frac < 0.98)
    assert torch.equal(codes.float()[away_from_ties], rtn[away_from_ties])


@pytest.mark.parametrize("gs", [None, 16])
def test_gradcheck_reference_fp64(gs):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(6, 32, generator=g, dtype=torch.float64) * 0.05
    s, z = lora_round_params(w, 4, gs)
    s, z = s.double().detach(), z.double().detach()
    a = (torch.randn(6, 3, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    b = (torch.randn(3, 32, generator=g, dtype=torch.float64) * 0.3).requires_grad_()

    def fn(a, b):
        y, reg = lora_round_ref(w, a, b, s, z, 4, gs, 2.5)
        return y, reg

    assert torch.autograd.gradcheck(fn, (a, b), eps=1e-6, atol=1e-6)


def test_bad_input():
    w, _la, _lc, a, b = setup(8, 32, None, 4, 4)
    s, z = lora_round_params(w, 4, None)
    with pytest.raises(ValueError, match=r"a must be \(N, r\) and b \(r, K\)"):
        lora_round(w, a, b[:, :16], s, z, 4)
    with pytest.raises(ValueError, match=r"rank r = 65 must be in \[1, 64\]"):
        lora_round(w, torch.zeros(8, 65), torch.zeros(65, 32), s, z, 4)
    with pytest.raises(ValueError, match="group_size must be a multiple of 16"):
        lora_round(w, a, b, torch.ones(8, 2), torch.ones(8, 2), 4, 24)
    with pytest.raises(ValueError, match=r"scales must have shape \(N, groups\) = \(8, 2\)"):
        lora_round(w, a, b, s, z, 4, 16)
    with pytest.raises(ValueError, match=r"bits must be an int in \[2, 8\]"):
        lora_round(w, a, b, s, z, 9)
    with pytest.raises(TypeError, match="a must be a float tensor"):
        lora_round(w, a.detach().int(), b, s, z, 4)
    with pytest.raises(ValueError, match=r"v0 must be a contiguous tensor of w's shape \(8, 32\)"):
        lora_round(w, a, b, s, z, 4, v0=torch.zeros(8, 16))
    with pytest.raises(ValueError, match="v0 must be a contiguous tensor"):
        lora_round(w, a, b, s, z, 4, v0=torch.zeros(32, 8).t())
    with pytest.raises(TypeError, match="v0 must be a float tensor"):
        lora_round(w, a, b, s, z, 4, v0=torch.zeros(8, 32, dtype=torch.int32))


def test_opcheck_and_compile():
    w, la, lc, a, b = setup(32, 64, 32, 8, 4)
    s, z = lora_round_params(w, 4, 32, la, lc)
    args = (w, a, b, s.detach(), z.detach(), 4, 32, 2.0)
    torch.library.opcheck(torch.ops.cbq.lora_round.default, args)
    v0 = start_logits(torch.rand(32, 64, generator=torch.Generator().manual_seed(1)) < 0.5, 2.0)
    torch.library.opcheck(torch.ops.cbq.lora_round.default, (*args, v0, True))

    def loss(a, b):
        y, reg = lora_round(w, a, b, s.detach(), z.detach(), 4, 32)
        return (y**2).sum() + reg

    compiled = torch.compile(loss, fullgraph=True)
    got = compiled(a, b)
    (ga,) = torch.autograd.grad(got, [a])
    want = loss(a, b)
    (wa,) = torch.autograd.grad(want, [a])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(ga, wa)
