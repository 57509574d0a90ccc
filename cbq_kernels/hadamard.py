"""Hadamard matrices of the sizes LLM layers have, and the orthogonal transform ``x @ H``.

A rotation by a (randomised) Hadamard matrix spreads an activation outlier over every channel
(QuaRot, SpinQuant). Layer widths are rarely powers of two (SmolLM2: 576 = 36 x 16, 1536 =
12 x 128; Llama-2: 11008 = 344 x 32, 13824 = 108 x 128, 28672 = 28 x 1024), so a size n is
written ``n = m * 2^j`` with a small Hadamard order m, and

    H_n = H_m (x) H_(2^j)            (Kronecker product, index i * 2^j + l)

where H_(2^j) is Sylvester's matrix (a fast Walsh-Hadamard transform: j butterfly stages) and
H_m comes from Paley's constructions over a finite field GF(q), q a prime or a prime's square
or cube: Paley I (q = 3 mod 4) gives order q + 1, Paley II (q = 1 mod 4) order 2 (q + 1).
Orders like 172 need other constructions (Williamson); a size with no factorisation here gets
an error that names it and the nearest sizes that have one.

``x @ R`` with ``R = diag(signs) H_n / sqrt(n)`` costs j additions per element plus an m x m
product per block of 2^j, instead of n multiply-adds: :func:`transform` (the reference,
PyTorch) and :func:`matrix` (the dense R, for rotations folded into weights).

The matrices are built here from the constructions (tests check H H^T = n I for every order
used); no table of matrices is copied from elsewhere.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor

MAX_FIELD = 2048  # largest q of the Paley constructions (an m x m matrix, m <= 2 q + 2)


# ---------------------------------------------------------------- finite fields GF(p^k)


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k, k <= 3 (fields up to cubes), or None."""
    for p in range(2, int(q**0.5) + 2):
        if q % p == 0:
            k, r = 0, q
            while r % p == 0:
                r //= p
                k += 1
            return (p, k) if r == 1 and k <= 3 else None
    return (q, 1) if q >= 2 else None


def _poly_mulmod(a: np.ndarray, b: np.ndarray, f: np.ndarray, p: int) -> np.ndarray:
    """a * b mod (f, p) for coefficient vectors (lowest degree first) of length k."""
    k = len(f) - 1
    prod = np.convolve(a, b) % p
    for d in range(len(prod) - 1, k - 1, -1):  # reduce with the monic f
        c = prod[d]
        if c:
            prod[d - k : d + 1] = (prod[d - k : d + 1] - c * f) % p
    return prod[:k]


def _irreducible(p: int, k: int) -> np.ndarray:
    """A monic polynomial of degree k <= 3 over GF(p) with no root (irreducible for k <= 3)."""
    if k == 1:
        return np.array([0, 1])
    for code in range(p**k):
        coeffs = [(code // p**i) % p for i in range(k)]
        f = np.array([*coeffs, 1])
        if all(sum(int(c) * pow(x, i, p) for i, c in enumerate(f)) % p for x in range(p)):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")


@functools.cache
def _character_table(q: int) -> tuple[np.ndarray, np.ndarray]:
    """(chi, diff): chi[a] the quadratic character of field element a (0, 1 or -1), diff[a, b]
    the element a - b, elements numbered by their base-p digits."""
    p, k = _prime_power(q)  # type: ignore[misc]
    f = _irreducible(p, k)
    digits = np.array([[(a // p**i) % p for i in range(k)] for a in range(q)])
    weights = p ** np.arange(k)
    chi = -np.ones(q, dtype=np.int64)
    chi[0] = 0
    for a in range(1, q):
        sq = _poly_mulmod(digits[a], digits[a], f, p)
        chi[int(sq @ weights)] = 1
    diff = ((digits[:, None, :] - digits[None, :, :]) % p) @ weights
    return chi, diff


def _jacobsthal(q: int) -> np.ndarray:
    chi, diff = _character_table(q)
    return chi[diff]  # Q[a, b] = chi(a - b)


def paley(q: int) -> np.ndarray:
    """A Hadamard matrix from GF(q): Paley I (q = 3 mod 4, order q + 1) or Paley II (q = 1
    mod 4, order 2 (q + 1)); entries +-1, int64."""
    if _prime_power(q) is None or q % 2 == 0:
        raise ValueError(f"Paley's constructions need an odd prime power q <= p^3, got {q}")
    jac = _jacobsthal(q)
    ones = np.ones((q, 1), dtype=np.int64)
    if q % 4 == 3:  # I + [[0, 1^T], [-1, Q]]
        s = np.block([[np.zeros((1, 1), dtype=np.int64), ones.T], [-ones, jac]])
        return np.eye(q + 1, dtype=np.int64) + s
    conference = np.block([[np.zeros((1, 1), dtype=np.int64), ones.T], [ones, jac]])
    return np.kron(conference, np.array([[1, 1], [1, -1]])) + np.kron(
        np.eye(q + 1, dtype=np.int64), np.array([[1, -1], [-1, -1]])
    )


@functools.cache
def small_orders() -> dict[int, int]:
    """{order m: the field size q it is built from}, for the Paley orders that are not powers of
    two (the power-of-two part is Sylvester's)."""
    orders: dict[int, int] = {}
    for q in range(3, MAX_FIELD + 1, 2):
        if _prime_power(q) is None:
            continue
        m = q + 1 if q % 4 == 3 else 2 * (q + 1)
        if m & (m - 1) and m not in orders:  # not a power of two; first (smallest) field wins
            orders[m] = q
    return orders


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _split(n: int) -> tuple[int, int] | None:
    """(m, 2^j) with n = m * 2^j, m = 1 or the smallest Paley order that fits; None if none."""
    if _is_pow2(n):
        return 1, n
    for m in sorted(small_orders()):
        if m > n:
            break
        if n % m == 0 and _is_pow2(n // m):
            return m, n // m
    return None


def factor(n: int) -> tuple[int, int]:
    """(m, 2^j) with n = m * 2^j and m = 1 or a Paley order (the smallest such m: the fast
    part is as long as possible). A clear error when n has no such factorisation."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"a Hadamard size must be a positive integer, got {n!r}")
    found = _split(n)
    if found is not None:
        return found
    near = [s for s in range(max(1, n - 64), n + 65) if s != n and _split(s) is not None]
    nearest = min(near, key=lambda s: (abs(s - n), s)) if near else None
    raise ValueError(
        f"no Hadamard matrix of size {n} here (n = m * 2^j with m a Paley order or 1); the "
        f"nearest supported size is {nearest}; rotation kind 'random' (a dense random orthogonal "
        f"matrix) takes any width"
    )


def supported(n: int) -> bool:
    """Whether :func:`factor` has a factorisation of n."""
    return isinstance(n, int) and n >= 1 and _split(n) is not None


@functools.cache
def _small(m: int) -> np.ndarray:
    return np.ones((1, 1), dtype=np.int64) if m == 1 else paley(small_orders()[m])


@functools.lru_cache(maxsize=64)
def _small_tensor(m: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """H_m on a device (built and copied once, not on every call of the online rotation)."""
    return torch.from_numpy(_small(m)).to(device=device, dtype=dtype)


def sylvester(n: int) -> np.ndarray:
    """Sylvester's Hadamard matrix of a power-of-two order (+-1 entries)."""
    if not _is_pow2(n):
        raise ValueError(f"Sylvester's construction needs a power of two, got {n}")
    h = np.ones((1, 1), dtype=np.int64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def hadamard(n: int) -> np.ndarray:
    """The +-1 Hadamard matrix of order n used here: H_m (x) H_(2^j) (see :func:`factor`)."""
    m, p = factor(n)
    return np.kron(_small(m), sylvester(p))


def random_signs(n: int, seed: int) -> Tensor:
    """n random signs (+1 / -1, fp32) from a seeded generator: the randomisation of a
    randomised Hadamard rotation."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).float() * 2 - 1


def matrix(n: int, signs: Tensor | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
    """The orthogonal R = diag(signs) H_n / sqrt(n) (n x n), for rotations folded into
    weights: x @ R == transform(x, signs)."""
    r = torch.from_numpy(hadamard(n)).to(torch.float64) / math.sqrt(n)
    if signs is not None:
        r = signs.to(torch.float64)[:, None] * r
    return r.to(dtype)


def _fwht(x: Tensor) -> Tensor:
    """Unnormalised Walsh-Hadamard transform over the last dimension (a power of two): x @ H
    with Sylvester's H, by log2(n) butterfly stages."""
    n = x.shape[-1]
    h = 1
    while h < n:
        y = x.reshape(*x.shape[:-1], n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*x.shape[:-1], n)
        h *= 2
    return x


def _signed(x: Tensor, signs: Tensor | None) -> tuple[Tensor, int, int]:
    """x * signs in the working precision (fp32; fp64 for fp64 inputs) and n's factors (m,
    2^j): the start of both forms of the transform."""
    n = x.shape[-1]
    m, p = factor(n)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(work)
    if signs is not None:
        if signs.shape != (n,):
            raise ValueError(f"signs must have shape ({n},), got {tuple(signs.shape)}")
        y = y * signs.to(device=x.device, dtype=work)
    return y, m, p


_MAX_FACTOR = 64  # largest Sylvester factor per matrix product in transform_matmul


@functools.lru_cache(maxsize=64)
def _sylvester_tensor(p: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.from_numpy(sylvester(p)).to(device=device, dtype=dtype)


def transform_matmul(x: Tensor, signs: Tensor | None = None) -> Tensor:
    """:func:`transform` as a few matrix products (the GPU path where the fused kernel does not
    take the width): the 2^j part as Sylvester factors of at most 64 (H_(ab) = H_a (x) H_b),
    each a product along one axis, then the m x m factor; fp32 (fp64 for fp64 inputs). Equal
    to :func:`transform` up to the order of the fp32 additions. The butterflies of
    :func:`transform` take log2(2^j) passes over x, a pass per stage: 8192 x 11008 in 7.24 ms
    on the H200, the products (then act_quant) in 2.83 ms (benchmarks/results/h200/
    bench_hadamard_ad8bc8c.md)."""
    y, m, p = _signed(x, signs)
    n, work = x.shape[-1], y.dtype
    rows = y.numel() // n if n else 0
    inner = 1  # the length of the axes right of the one being multiplied
    left = p
    while left > 1:  # peel factors of at most 64 off the right end of the 2^j index
        f = min(left, _MAX_FACTOR)
        h = _sylvester_tensor(f, x.device, work)
        left //= f
        if inner == 1:
            y = (y.reshape(-1, f) @ h).reshape(-1)
        else:  # y[o, i', r] = sum_i H[i, i'] y[o, i, r] (H symmetric)
            y = torch.matmul(h, y.reshape(-1, f, inner)).reshape(-1)
        inner *= f
    if m > 1:  # A^T X, X = (m, 2^j) per row
        a = _small_tensor(m, x.device, work)
        y = torch.matmul(a.t(), y.reshape(rows, m, p))
    return (y.reshape(x.shape) * (1 / math.sqrt(n))).to(x.dtype)


def apply(x: Tensor, signs: Tensor | None = None) -> Tensor:
    """x @ R for a model's online rotation: :func:`transform_matmul` on a GPU (a few matrix
    products), :func:`transform` (the butterflies, the reference) elsewhere."""
    return transform_matmul(x, signs) if x.is_cuda else transform(x, signs)


def transform(x: Tensor, signs: Tensor | None = None) -> Tensor:
    """x @ R over the last dimension, R = diag(signs) H_n / sqrt(n) (the reference: a fast
    Walsh-Hadamard transform of the 2^j part and an m x m product). Computed in fp32 (fp64
    for fp64 inputs), returned in x's dtype."""
    y, m, p = _signed(x, signs)
    n, work = x.shape[-1], y.dtype
    y = _fwht(y.reshape(*x.shape[:-1], m, p))  # X B
    if m > 1:
        y = torch.einsum("...ij,ik->...kj", y, _small_tensor(m, x.device, work))  # A^T X B
    return (y.reshape(x.shape) * (1 / math.sqrt(n))).to(x.dtype)
