"""GPU tests of the fake-quantization kernels at real shapes (same contracts as on CPU)."""

import pytest
import torch

from cbq_kernels.fake_quant import fake_quant, fake_quant_act, fake_quant_act_ref, fake_quant_ref

pytestmark = pytest.mark.cuda


def run(fn, x, params, dy):
    x = x.detach().clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in params]
    y = fn(x, *params)
    return y, torch.autograd.grad(y, [x, *params], dy)


@pytest.mark.parametrize(
    ("shape", "group_size", "symmetric"),
    [((4096, 11008), None, False), ((4096, 11008), 128, False), ((11008, 4096), 128, True),
     ((11008, 4096), None, True), ((67, 1000), 64, False), ((13, 333), 100, False)],
)  # fmt: skip
@pytest.mark.parametrize("bits", [2, 4])
def test_weights_real_shapes(shape, group_size, symmetric, bits):
    g = torch.Generator(device="cuda").manual_seed(0)
    n, k = shape
    groups = 1 if group_size is None else -(-k // group_size)
    x = (torch.randn(shape, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
    params = [torch.rand(n, groups, generator=g, device="cuda") * 0.3 + 0.7]
    if not symmetric:
        params.append(torch.rand(n, groups, generator=g, device="cuda") * 0.3 + 0.7)
    dy = torch.randn(shape, generator=g, device="cuda").to(torch.bfloat16)

    def kern(x, *f):
        return fake_quant(x, bits, group_size, *f, *([None] if symmetric else []), symmetric)

    def ref(x, *f):
        return fake_quant_ref(x, bits, group_size, *f, *([None] if symmetric else []), symmetric)

    y, grads = run(kern, x, params, dy)
    y_ref, grads_ref = run(ref, x, params, dy)
    assert torch.equal(y, y_ref)
    assert torch.equal(grads[0], torch.where(grads_ref[0] != 0, dy, 0))
    for got, want in zip(grads[1:], grads_ref[1:], strict=True):
        torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-4 * want.abs().max())
    # The GPU kernel and the CPU implementation agree too.
    assert torch.equal(y.cpu(), fake_quant(x.cpu(), bits, group_size, *[p.cpu() for p in params],
                                           *([None] if symmetric else []), symmetric))  # fmt: skip


@pytest.mark.parametrize("bits", [4, 8])
def test_activations_8192_tokens(bits):
    g = torch.Generator(device="cuda").manual_seed(1)
    x = (torch.randn(8192, 4096, generator=g, device="cuda") * 2).to(torch.bfloat16)
    dy = torch.randn(8192, 4096, generator=g, device="cuda").to(torch.bfloat16)
    logit = torch.tensor([2.0], device="cuda")
    y, (dx, dl) = run(lambda x, lg: fake_quant_act(x, bits, lg), x, [logit], dy)
    y_ref, (dx_ref, dl_ref) = run(lambda x, lg: fake_quant_act_ref(x, bits, lg), x, [logit], dy)
    assert torch.equal(y, y_ref)
    assert torch.equal(dx, torch.where(dx_ref != 0, dy, 0))
    torch.testing.assert_close(dl, dl_ref, rtol=2e-3, atol=1e-3)


def test_opcheck_cuda():
    x = torch.randn(64, 384, device="cuda", dtype=torch.bfloat16)
    f = torch.rand(64, 3, device="cuda") * 0.3 + 0.7
    torch.library.opcheck(torch.ops.cbq.fake_quant.default, (x, 4, 128, f, f.clone(), False))
