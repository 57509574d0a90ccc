"""GPU tests of LoRA-Rounding at real shapes (same contracts as on CPU)."""

import pytest
import torch

from cbq_kernels.lora_round import harden, harden_ref, lora_round, lora_round_params, lora_round_ref

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize(("shape", "group_size"), [((4096, 11008), None), ((11008, 4096), 128),
                                                    ((67, 1000), 64)])  # fmt: skip
@pytest.mark.parametrize("rank", [1, 8, 32])  # 1: the recipe's fixed codes (QLinear.start_from)
def test_real_shapes(shape, group_size, rank):
    g = torch.Generator(device="cuda").manual_seed(0)
    n, k = shape
    groups = 1 if group_size is None else -(-k // group_size)
    w = (torch.randn(shape, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
    la = (torch.rand(n, groups, generator=g, device="cuda") + 2).requires_grad_()
    a = (torch.randn(n, rank, generator=g, device="cuda") * 0.3).requires_grad_()
    b = (torch.randn(rank, k, generator=g, device="cuda") * 0.3).requires_grad_()
    dy = torch.randn(shape, generator=g, device="cuda")

    def run(fn):
        s, z = lora_round_params(w, 4, group_size, la, la)
        y, reg = fn(w, a, b, s, z, 4, group_size, 4.0)
        return y, reg, torch.autograd.grad((y.float() * dy).sum() + 1e-3 * reg, [a, b, la])

    y, reg, grads = run(lora_round)
    y_ref, reg_ref, grads_ref = run(lora_round_ref)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(reg, reg_ref.float(), rtol=1e-4, atol=1.0)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * want.abs().max())
    s, z = lora_round_params(w, 4, group_size, la, la)
    assert torch.equal(
        harden(w, a, b, s, z, 4, group_size), harden_ref(w, a, b, s, z, 4, group_size)
    )


def test_peak_memory_is_o_of_n_plus_k_times_r():
    n, k, r = 4096, 11008, 32
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    a = (torch.randn(n, r, device="cuda") * 0.3).requires_grad_()
    b = (torch.randn(r, k, device="cuda") * 0.3).requires_grad_()
    s, z = lora_round_params(w, 4, None)
    dy = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    y, reg = lora_round(w, a, b, s, z, 4)
    torch.autograd.backward((y, reg), (dy, torch.ones((), device="cuda")))
    extra = torch.cuda.max_memory_allocated() - base
    # The output (bf16) is the only N x K tensor allowed; an fp32 N x K temporary would add
    # 4 * N * K bytes.
    assert extra < n * k * 2 + 64 * (n + k) * r + (1 << 22)
