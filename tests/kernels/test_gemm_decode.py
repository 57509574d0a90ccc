"""The decode kernel's weight layout on the CPU: the layout read back through the PTX fragment
layouts of mma.m16n8k16 (cbq_kernels.gemm_decode.emulate) gives the reference product; the
CUDA kernel itself is tested on the GPU (test_gemm_decode_cuda.py)."""

import pytest
import torch

from cbq_kernels.gemm import gemm_ref, prepare_weight
from cbq_kernels.gemm_decode import emulate, prepare_decode, tile_n
from cbq_kernels.packing import pack_ref

# (bits, N, K, group_size, M): N not a multiple of the tile, K not of 16, M from 1 to 16
CASES = [(4, 70, 48, None, 1), (4, 130, 96, 32, 16), (3, 64, 34, None, 5), (2, 200, 80, 16, 1),
         (2, 129, 34, None, 2), (4, 65, 160, 32, 13), (2, 128, 64, 32, 16)]  # fmt: skip


def make(bits, n, k, group_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    groups = 1 if group_size is None else -(-k // group_size)
    scales = torch.rand(n, groups, generator=g) + 0.5
    zeros = torch.randint(0, 1 << bits, (n, groups), generator=g).float()
    return codes, scales, zeros


@pytest.mark.parametrize(("bits", "n", "k", "group_size", "m"), CASES)
def test_layout_through_the_mma_fragments_is_the_reference_product(bits, n, k, group_size, m):
    codes, scales, zeros = make(bits, n, k, group_size)
    dw = prepare_decode(codes, scales, zeros, bits, group_size)
    tn = tile_n(dw.bits)
    assert dw.words.shape == (-(-n // tn), -(-k // 16), 32, 4) and dw.n_pad % tn == 0
    if group_size is None:  # gemm_ref's weight from the same codes (per channel)
        weight = prepare_weight(pack_ref(codes, bits), bits, k, scales, zeros, decode=False)
        x = torch.randn(m, k, dtype=torch.float64)
        want = gemm_ref(x, weight)
        torch.testing.assert_close(emulate(x, dw), want, rtol=1e-12, atol=1e-12)
    gid = torch.arange(k) // (group_size or k)
    wq = (codes.double() - zeros.double()[:, gid]) * scales.double()[:, gid]
    x = torch.randn(m, k, dtype=torch.float64)
    torch.testing.assert_close(emulate(x, dw), x @ wq.t(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("bits", "n", "k", "group_size", "m"), CASES)
def test_integer_accumulator_is_exact(bits, n, k, group_size, m):
    codes, scales, zeros = make(bits, n, k, group_size, seed=3)
    dw = prepare_decode(codes, scales, zeros, bits, group_size)
    x = torch.randint(-127, 128, (m, k))
    gid = torch.arange(k) // (group_size or k)
    want = x.long() @ (codes.long() - zeros.long()[:, gid]).t()
    assert torch.equal(emulate(x, dw, debug=True), want)
    xs = torch.rand(m, dtype=torch.float64)
    wq = (codes.double() - zeros.double()[:, gid]) * scales.double()[:, gid]
    torch.testing.assert_close(emulate(x, dw, x_scales=xs), (x.double() * xs[:, None]) @ wq.t())


def test_padding_is_zero_codes_scales_and_zero_points():
    codes, scales, zeros = make(4, 70, 40, None)
    dw = prepare_decode(codes, scales, zeros, 4, None)
    assert dw.n_pad == 128 and torch.equal(dw.scales[:, 70:], torch.zeros(1, 58))
    assert torch.equal(dw.zeros[:, 70:], torch.zeros(1, 58, dtype=torch.int32))
    assert torch.equal(dw.counters, torch.zeros(2, dtype=torch.int32))


def test_prepare_weight_builds_the_layout_on_request_and_checks_k():
    codes, scales, zeros = make(4, 16, 48, None)
    w = prepare_weight(pack_ref(codes, 4), 4, 48, scales, zeros, decode=True)
    assert w.decode is not None and w.decode.k == 48 and w.decode.n == 16
    assert prepare_weight(pack_ref(codes, 4), 4, 48, scales, zeros).decode is None  # CPU
    odd = torch.randint(0, 16, (16, 47), dtype=torch.uint8)
    with pytest.raises(ValueError, match="decode layout needs an even K, got k=47"):
        prepare_weight(pack_ref(odd, 4), 4, 47, scales, zeros, decode=True)
