"""Hadamard matrices of the sizes LLM layers have, and the orthogonal transform ``x @ H``.

A rotation by a (randomised) Hadamard matrix spreads an activation outlier over every channel
(QuaRot, SpinQuant). Layer widths are rarely powers of two (SmolLM2: 576 = 36 x 16, 1536 =
12 x 128; Llama-2: 11008 = 344 x 32, 13824 = 108 x 128, 28672 = 28 x 1024), so a size n is
written ``n = m * 2^j`` with a small Hadamard order m, and

    H_n = H_m (x) H_(2^j)            (Kronecker product, index i * 2^j + l)

where H_(2^j) is Sylvester's matrix (a fast Walsh-Hadamard transform: j butterfly stages) and
H_m comes from Paley's constructions over a finite field GF(q), q a prime or a prime's square
or cube: Paley I (q = 3 mod 4) gives order q + 1, Paley II (q = 1 mod 4) order 2 (q + 1); or,
for an order 4 p (p an odd prime) that Paley does not reach, from Williamson matrices found
by a small search (:func:`williamson`: 172 = 4 x 43, so Llama-2's 11008 = 172 x 64 and
stories260K's FFN width 172). A size with no factorisation here gets an error that names it
and the nearest sizes that have one.

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


# ------------------------------------------------------------- Williamson matrices of order 4 p

WILLIAMSON_MAX_CLASSES = 9  # <= 2^10 sequences per class count: the search takes < 0.1 s
WILLIAMSON_MAX_P = 257  # the primes searched (measured: only 43 has a solution of this form)


def _primitive_root(p: int) -> int:
    return next(g for g in range(2, p) if len({pow(g, k, p) for k in range(p - 1)}) == p - 1)


def _is_odd_prime(p: int) -> bool:
    return p > 2 and p % 2 == 1 and all(p % d for d in range(3, int(p**0.5) + 1, 2))


@functools.cache
def williamson_sequences(p: int) -> np.ndarray | None:
    """Four symmetric +-1 sequences A, B, C, D of length p (p an odd prime) with periodic
    autocorrelations summing to 0 at every non-zero shift (Williamson matrices: the circulants
    satisfy A^2 + B^2 + C^2 + D^2 = 4 p I), or None if the search finds none.

    The search (written here) looks only at sequences that are constant on the cosets of a
    subgroup of GF(p)* that contains -1 (the e cyclotomic classes, e | (p - 1) / 2, e <=
    WILLIAMSON_MAX_CLASSES; every such sequence is symmetric), with a free sign at 0: 2^(e+1)
    sequences, whose autocorrelation is constant on the same classes, so a solution is two
    pairs whose e-vectors of integer autocorrelations add to 0 (an exact sort-and-match, no
    floating point: the same four sequences on every machine). For p = 43 it finds one with e =
    7 classes of 6 (Williamson himself gave order 43 in 1944). Measured over the odd primes <=
    257 whose order 4 p is not a Paley order: only 43 has a solution of this form (23, 29, 47,
    59, 67, 73, ... do not, each search <= 0.01 s: scripts/williamson_orders.py, its output in
    docs/results/issue15/williamson_orders.txt; 47 and 59 have no Williamson matrices at
    all: Holzmann, Kharaghani and Tayfeh-Rezaie's exhaustive search, 2008)."""
    if not _is_odd_prime(p):
        raise ValueError(f"Williamson sequences are searched for odd primes, got {p}")
    g, half = _primitive_root(p), (p - 1) // 2
    # class counts e | (p - 1) / 2 whose matching key below is exact in int64
    counts = [d for d in range(1, min(half, WILLIAMSON_MAX_CLASSES) + 1)
              if half % d == 0 and (4 * p + 1) ** d < 2**62]  # fmt: skip
    for e in counts:
        classes = [[pow(g, k * e + i, p) for k in range((p - 1) // e)] for i in range(e)]
        signs = 1 - 2 * ((np.arange(2 ** (e + 1))[:, None] >> np.arange(e + 1)) & 1)
        seqs = np.empty((len(signs), p), dtype=np.int64)
        seqs[:, 0] = signs[:, 0]
        for i, cls in enumerate(classes):
            seqs[:, cls] = signs[:, i + 1 : i + 2]
        paf = np.stack([(seqs * np.roll(seqs, -c[0], axis=1)).sum(1) for c in classes], 1)
        i, j = np.triu_indices(len(seqs))
        pair = paf[i] + paf[j]  # in [-2p, 2p]
        base = (4 * p + 1) ** np.arange(e, dtype=np.int64)  # digits of the shifted pair sums
        key, want = (pair + 2 * p) @ base, (2 * p - pair) @ base
        order = np.argsort(key, kind="stable")
        at = np.minimum(np.searchsorted(key[order], want), len(order) - 1)
        hits = np.flatnonzero(key[order][at] == want)
        if len(hits):
            t, u = int(hits[0]), int(order[at[hits[0]]])
            return np.stack([seqs[i[t]], seqs[j[t]], seqs[i[u]], seqs[j[u]]])
    return None


def _circulant(row: np.ndarray) -> np.ndarray:
    return np.stack([np.roll(row, k) for k in range(len(row))])


def williamson(p: int) -> np.ndarray:
    """The Hadamard matrix of order 4 p of Williamson's array from :func:`williamson_sequences`
    (rows [A B C D; -B A -D C; -C D A -B; -D -C B A] of symmetric, commuting circulants)."""
    seq = williamson_sequences(p)
    if seq is None:
        raise ValueError(f"no Williamson sequences of length {p} found here")
    a, b, c, d = (_circulant(s) for s in seq)
    return np.block([[a, b, c, d], [-b, a, -d, c], [-c, d, a, -b], [-d, -c, b, a]])


def _williamson_order(n: int) -> int | None:
    """4 p for the odd part p of n, when it is a prime with Williamson sequences and n / (4 p) is
    a power of two; else None."""
    p = n
    while p % 2 == 0:
        p //= 2
    if p > WILLIAMSON_MAX_P or n % (4 * p) or not _is_odd_prime(p) or 4 * p in small_orders():
        return None  # (a large odd part would make the search, O(2^e p) memory, the cost)
    return 4 * p if williamson_sequences(p) is not None else None


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


CONSTRUCTION = 2  # 1: Paley and Sylvester only (saved rotations before the Williamson order)


def _split(n: int, construction: int = CONSTRUCTION) -> tuple[int, int] | None:
    """(m, 2^j) with n = m * 2^j, m = 1 or the smallest small order that fits (Paley's, and
    Williamson's 4 p from construction 2 on); None if none."""
    if _is_pow2(n):
        return 1, n
    found = None
    for m in sorted(small_orders()):
        if m > n:
            break
        if n % m == 0 and _is_pow2(n // m):
            found = (m, n // m)
            break
    w = _williamson_order(n) if construction >= 2 else None
    if w is not None and (found is None or w < found[0]):
        found = (w, n // w)
    return found


def factor(n: int, construction: int = CONSTRUCTION) -> tuple[int, int]:
    """(m, 2^j) with n = m * 2^j and m = 1, a Paley order or a Williamson order 4 p (the
    smallest such m: the fast part is as long as possible). ``construction=1`` gives the
    factorisation of rotations saved before the Williamson orders (Paley only: 11008 = 344 x
    32). A clear error when n has no such factorisation."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"a Hadamard size must be a positive integer, got {n!r}")
    found = _split(n, construction)
    if found is not None:
        return found
    near = [s for s in range(max(1, n - 64), n + 65) if s != n and _split(s) is not None]
    nearest = min(near, key=lambda s: (abs(s - n), s)) if near else None
    raise ValueError(
        f"no Hadamard matrix of size {n} here (n = m * 2^j with m 1, a Paley or a Williamson "
        f"order); the nearest supported size is {nearest}; rotation kind 'random' (a dense "
        f"random orthogonal matrix) takes any width"
    )


def supported(n: int) -> bool:
    """Whether :func:`factor` has a factorisation of n."""
    return isinstance(n, int) and n >= 1 and _split(n) is not None


@functools.cache
def _small(m: int) -> np.ndarray:
    if m == 1:
        return np.ones((1, 1), dtype=np.int64)
    return paley(small_orders()[m]) if m in small_orders() else williamson(m // 4)


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
