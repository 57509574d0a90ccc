"""Hadamard matrices and the transform x @ R (cbq_kernels.hadamard): exact orthogonality of
every construction used, the factorisation of the widths of SmolLM2 and Llama-2, and the fast
transform against the dense matrix."""

import numpy as np
import pytest
import torch

from cbq_kernels import hadamard


@pytest.mark.parametrize("m", sorted(o for o in hadamard.small_orders() if o <= 400))
def test_every_paley_order_is_a_hadamard_matrix(m):
    h = hadamard._small(m)
    assert h.shape == (m, m) and set(np.unique(h)) == {-1, 1}
    assert np.array_equal(h @ h.T, m * np.eye(m, dtype=np.int64))


def test_williamson_order_172_is_a_hadamard_matrix_and_the_search_is_exact():
    # four symmetric sequences of length 43 whose periodic autocorrelations cancel (an integer
    # identity, checked here directly), and the 172 x 172 matrix of Williamson's array
    seq = hadamard.williamson_sequences(43)
    assert seq.shape == (4, 43) and set(np.unique(seq)) == {-1, 1}
    assert np.array_equal(seq[:, 1:], seq[:, :0:-1])  # symmetric: a[i] = a[43 - i]
    for s in range(1, 43):
        assert int((seq * np.roll(seq, -s, axis=1)).sum()) == 0
    h = hadamard._small(172)
    assert h.shape == (172, 172) and set(np.unique(h)) == {-1, 1}
    assert np.array_equal(h @ h.T, 172 * np.eye(172, dtype=np.int64))
    assert hadamard.williamson_sequences(47) is None  # 188: none of this form (none at all)
    with pytest.raises(ValueError, match="odd primes, got 45"):
        hadamard.williamson_sequences(45)


@pytest.mark.parametrize(("n", "m"), [(64, 1), (172, 172), (576, 36), (1536, 12), (4096, 1),
                                      (5120, 20), (11008, 172), (13824, 108),
                                      (28672, 28)])  # fmt: skip
def test_model_widths_factor_into_a_small_order_and_a_power_of_two(n, m):
    got_m, p = hadamard.factor(n)
    assert (got_m, got_m * p) == (m, n) and p & (p - 1) == 0
    r = hadamard.hadamard(n) if n <= 1536 else None
    if r is not None:
        assert np.array_equal(r @ r.T, n * np.eye(n, dtype=np.int64))


def test_construction_1_keeps_the_paley_factorisation_of_older_rotations():
    assert hadamard.factor(11008, 1) == (344, 32) and hadamard.factor(11008) == (172, 64)
    assert hadamard.factor(576, 1) == hadamard.factor(576) == (36, 16)
    with pytest.raises(ValueError, match="size 172"):
        hadamard.factor(172, 1)


def test_a_width_without_a_construction_names_itself_and_the_nearest():
    with pytest.raises(ValueError, match=r"size 188 .* nearest supported size is 192; .*'random'"):
        hadamard.factor(188)
    assert not hadamard.supported(188) and hadamard.supported(192) and hadamard.supported(172)
    # a large prime odd part is not searched (the search's memory grows with it): a quick no
    assert not hadamard.supported(4 * 250_007)


@pytest.mark.parametrize("n", [12, 20, 64, 172, 576, 688, 1536])
def test_transform_is_x_times_the_dense_orthogonal_matrix(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, 5, n, generator=g, dtype=torch.float64)
    signs = hadamard.random_signs(n, seed=7)
    r = hadamard.matrix(n, signs)
    torch.testing.assert_close(r @ r.t(), torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(hadamard.transform(x, signs), x @ r, rtol=0, atol=1e-12)
    xb = x.to(torch.bfloat16)
    yb = hadamard.transform(xb, signs)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.double(), xb.double() @ r, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("n", [8, 12, 64, 172, 576, 1536, 4096, 8192, 11008, 28672])
def test_the_matrix_product_form_equals_the_butterflies(n):
    # transform_matmul (the GPU path: Sylvester factors <= 64, then the small factor) is the
    # same map: fp64 to 1e-12, fp32 to a few ulps of the row scale, gradients included
    g = torch.Generator().manual_seed(n)
    signs = hadamard.random_signs(n, seed=3)
    x = torch.randn(2, 3, n, generator=g, dtype=torch.float64)
    torch.testing.assert_close(hadamard.transform_matmul(x, signs), hadamard.transform(x, signs),
                               rtol=0, atol=1e-12)  # fmt: skip
    x32 = x.float().requires_grad_()
    y = hadamard.transform_matmul(x32, signs)
    assert y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y, hadamard.transform(x32.detach(), signs), rtol=0, atol=2e-5)
    y.square().sum().backward()  # orthogonal: the gradient of |x R|^2 is 2 x
    torch.testing.assert_close(x32.grad, 2 * x32.detach(), rtol=0, atol=1e-4)
    assert hadamard.apply(x32.detach(), signs).equal(hadamard.transform(x32.detach(), signs))


def test_bad_signs_are_refused():
    with pytest.raises(ValueError, match=r"signs must have shape \(64,\), got \(32,\)"):
        hadamard.transform(torch.randn(2, 64), torch.ones(32))
