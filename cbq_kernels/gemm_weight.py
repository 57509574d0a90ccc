"""The prepared form of a quantized linear weight (:func:`prepare_weight`, one check at load
time) that every GEMM of :mod:`cbq_kernels.gemm` reads: the canonical words, the CUDA decode
kernel's layout (:mod:`cbq_kernels.gemm_decode`), or both; and :func:`mark_static`, which
keeps torch.compile's CUDA graphs from copying it on every replay."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from cbq_kernels import formats, gemm_decode
from cbq_kernels._validate import FLOAT_DTYPES, check_tensor, describe

__all__ = ["PreparedWeight", "concat_weights", "mark_static", "prepare_weight"]


@dataclasses.dataclass(frozen=True)
class PreparedWeight:
    """A quantized linear weight in the form the GEMM kernels read (see prepare_weight): the
    canonical words, the decode layout, or both.

    words: (ceil(K / C), N) int32, the canonical packed words transposed: word row kw holds
    codes kw*C .. kw*C + C - 1 of every output channel, N contiguous (C codes per word); None
    when the decode layout is the only one.
    scales: (N, G) fp32. zeros: (N, G) int32 (with a decode layout: transposed views of its
    (G, N_pad) tensors, one copy). bits: 2, 3 or 4. k: in_features.
    group_size: None (per channel) or the group length along K.
    channel_scales, steps: a weight in the two-level grouped format (prepare_weight's
    ``channel_scales``): s1 (N,) fp32 and the integer group steps s2 = scales / s1 (N, G)
    fp32, laid out as scales; None otherwise."""

    words: Tensor | None
    scales: Tensor
    zeros: Tensor
    bits: int
    k: int
    group_size: int | None
    decode: gemm_decode.DecodeWeight | None = None  # the CUDA decode kernel's layout
    channel_scales: Tensor | None = None
    steps: Tensor | None = None

    def __post_init__(self) -> None:
        if self.words is None and self.decode is None:
            raise ValueError("a PreparedWeight needs the canonical words or the decode layout")
        if (self.channel_scales is None) != (self.steps is None):
            raise ValueError("a two-level PreparedWeight needs both channel_scales and steps")

    @property
    def packed(self) -> Tensor:
        """(N, ceil(K / C)) int32, the canonical storage format (a transposed view; rebuilt
        from the decode layout when that is the only one)."""
        if self.words is None:
            from cbq_kernels.packing import pack_ref

            assert self.decode is not None
            codes = gemm_decode.unpack_codes(self.decode)
            return pack_ref(codes, self.bits)
        return self.words.t()

    @property
    def n(self) -> int:
        return self.scales.shape[0]

    @property
    def device(self) -> torch.device:
        return self.scales.device

    @property
    def nbytes(self) -> int:
        """Bytes this weight holds on its device (every layout it keeps; scales and zero
        points counted once: with a decode layout they are views of its tensors)."""
        held = [self.words] if self.words is not None else []
        d = self.decode
        if d is not None:
            held += [d.words, d.scales, d.zeros, d.counters]
            if self.steps is not None:
                held.append(_decode_steps(self))
        else:
            held += [self.scales, self.zeros]
            if self.steps is not None:
                held.append(self.steps)
        if self.channel_scales is not None:
            held.append(self.channel_scales)
        return sum(t.numel() * t.element_size() for t in held)

    @property
    def groups(self) -> int:
        return self.scales.shape[1]

    @property
    def container_bits(self) -> int:
        return formats.container_bits(self.bits)

    @property
    def kernel_group(self) -> int:
        """The group length the kernels use: group_size, or K when one group spans a row."""
        return self.group_size if self.group_size is not None and self.groups > 1 else self.k

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> Tensor:
        """(N, K) ``(q - z) * s`` in ``dtype`` (fp32 arithmetic, one rounding)."""
        from cbq_kernels.packing import dequantize

        # with a decode layout the scales and zero points are transposed views of its tensors
        return dequantize(self.packed.contiguous(), self.bits, self.k, self.scales.contiguous(),
                          self.zeros.float().contiguous(), self.group_size, dtype)  # fmt: skip


def prepare_weight(packed: Tensor, bits: int, k: int, scales: Tensor, zeros: Tensor | None = None,
                   group_size: int | None = None, layout: str = "auto",
                   channel_scales: Tensor | None = None) -> PreparedWeight:  # fmt: skip
    """Check a packed weight once and convert its parameters for the GEMM kernels.

    Args:
        packed: (N, ceil(K / C)) int32 in the canonical format (``cbq_kernels.pack``).
        bits: 2, 3 or 4 (3 in 4-bit containers). The integer kernels take 3 and 4.
        k: in_features K.
        scales: (N, G) float, G = 1 per channel or ceil(K / group_size).
        zeros: (N, G) integer-valued zero points in [0, 2**bits - 1]; None means 2**(bits-1).
        group_size: None (per channel) or a multiple of 32 (one group per K tile).
        layout: which copies of the weight to keep. ``"canonical"``: the transposed words
            the Triton kernels read. ``"decode"``: the CUDA decode kernel's layout
            (:mod:`cbq_kernels.gemm_decode`) alone: M <= 16 runs that kernel, M up to
            ``policy.small_m`` runs it on 16-row slices, larger M expand it (int8, fp8 or
            the dequantized weight) before the GEMM; one copy of the weight, what a served
            model holds. ``"both"``: both (benchmarks and tests that compare the kernels on
            one weight). ``"auto"``: ``"decode"`` when the extension has the kernel for this
            device and the groups fit its chunks (gemm_decode.layout_error), else
            ``"canonical"``.
        channel_scales: (N,) s1 of a weight in the two-level grouped format
            (:func:`cbq_kernels.quant_math.quantize_weight_two_level`: scales = s1 s2 with
            integer steps s2 in 1..16, ``|s2 (q - z)| <= 127``; checked here). The integer
            GEMMs then expand it at prefill M to the int8 values s2 (q - z) and run the
            per-channel int8 product scaled by s1 (no float rescale per group in the K loop;
            ``debug`` sums are of s2 (q - z) there); decode and the weight-only GEMM read the
            scales as for any grouped weight. 4-bit codes, groups along K that tile it.
    """
    if layout not in ("auto", "canonical", "decode", "both"):
        raise ValueError(f"layout must be 'auto', 'canonical', 'decode' or 'both', got "
                         f"{layout!r}")  # fmt: skip
    bits = formats.check_bits(bits)
    if bits == 8:
        raise ValueError("bits=8 weights are not supported by the GEMM kernels (2, 3 or 4)")
    check_tensor(packed, "packed", (torch.int32,), 2, "N, words")
    n = packed.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if packed.shape[1] != formats.packed_words(k, bits):
        raise ValueError(
            f"packed must have {formats.packed_words(k, bits)} words per row for K={k} at "
            f"{bits} bits, got {describe(packed)}"
        )
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be None or a positive int, got {group_size!r}")
        if group_size % 32:
            raise ValueError(
                f"group_size must be a multiple of 32 for the GEMM kernels (one group per K "
                f"tile), got {group_size}"
            )
    groups = formats.groups_per_row(k, group_size)
    if not isinstance(scales, Tensor) or scales.dtype not in FLOAT_DTYPES:
        raise TypeError(f"scales must be a float tensor, got {scales!r:.60}")
    if tuple(scales.shape) != (n, groups):
        raise ValueError(f"scales must have shape (N, G) = {(n, groups)}, got {describe(scales)}")
    if scales.device != packed.device:
        raise ValueError(f"scales is on {scales.device} but packed is on {packed.device}")
    qmax = (1 << bits) - 1
    if zeros is None:
        z = torch.full((n, groups), formats.default_zero_point(bits), dtype=torch.int32,
                       device=packed.device)  # fmt: skip
    else:
        if not isinstance(zeros, Tensor) or tuple(zeros.shape) != (n, groups):
            raise ValueError(f"zeros must have shape (N, G) = {(n, groups)}, got {zeros!r:.80}")
        if zeros.device != packed.device:
            raise ValueError(f"zeros is on {zeros.device} but packed is on {packed.device}")
        zf = zeros.float()
        if zeros.numel() and (
            bool((zf != torch.round(zf)).any()) or float(zf.min()) < 0 or float(zf.max()) > qmax
        ):
            raise ValueError(f"zeros must be integers in [0, {qmax}] for {bits}-bit codes")
        z = zf.to(torch.int32)
    codes = steps = s1 = None
    if channel_scales is not None:
        steps, codes = _two_level_steps(packed, bits, k, scales, z, group_size, channel_scales)
        s1 = channel_scales.float().contiguous()
    layout_err = gemm_decode.layout_error(bits, k, group_size)
    if layout == "auto":
        use = gemm_decode.available(packed.device) and layout_err is None
        layout = "decode" if use else "canonical"
    words, dw = None, None
    if layout != "decode":
        words = packed.t().contiguous()  # the kernels' layout: N contiguous (coalesced loads)
    if layout != "canonical":
        if layout_err:
            raise ValueError(layout_err)
        from cbq_kernels.packing import unpack_ref

        codes = unpack_ref(packed, bits, k) if codes is None else codes
        dw = gemm_decode.prepare_decode(codes, scales, z, bits, group_size)
        s, z = dw.scales[:, :n].t(), dw.zeros[:, :n].t()  # views: one copy of each
        if steps is not None:  # laid out as the scales: (G, N_pad), a view
            padded = torch.zeros_like(dw.scales)
            padded[:, :n] = steps.t()
            steps = padded[:, :n].t()
    else:
        s, z = scales.float().contiguous(), z.contiguous()
    w = PreparedWeight(words, s, z, bits, k, group_size, dw, s1, steps)
    mark_static(w)
    return w


def _decode_steps(w: PreparedWeight) -> Tensor:
    """The (G, N_pad) tensor whose transposed view is a decode-layout weight's steps (the
    scales' layout: prepare_weight made them so)."""
    d = w.decode
    assert d is not None and w.steps is not None
    return w.steps.t().as_strided(d.scales.shape, d.scales.stride())


def _two_level_steps(packed: Tensor, bits: int, k: int, scales: Tensor, z: Tensor,
                     group_size: int | None,
                     channel_scales: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
    """prepare_weight's check of a two-level weight: (steps s2 (N, G) fp32, codes (N, K))."""
    from cbq_kernels.packing import unpack_ref

    n = packed.shape[0]
    if bits != 4 or group_size is None or k % group_size or k == group_size:
        raise ValueError(f"channel_scales (the two-level format) needs 4-bit codes in groups "
                         f"that tile K, got bits={bits}, group_size={group_size}, "
                         f"K={k}")  # fmt: skip
    if not isinstance(channel_scales, Tensor):
        raise TypeError(f"channel_scales must be a float tensor, got {channel_scales!r:.60}")
    if (channel_scales.dtype not in FLOAT_DTYPES or tuple(channel_scales.shape) != (n,)
            or channel_scales.device != packed.device):  # fmt: skip
        raise ValueError(f"channel_scales must be a float tensor ({n},) on {packed.device}, "
                         f"got {describe(channel_scales)}")  # fmt: skip
    s1 = channel_scales.float()
    if not bool(torch.isfinite(s1).all()) or bool((s1 <= 0).any()):
        raise ValueError("channel_scales must be finite and positive")
    ratio = scales.float() / s1[:, None]
    steps = torch.round(ratio)
    # scales hold fp32(s1 s2): s2 back within a few ulps
    if steps.numel() and (float(steps.min()) < 1 or float(steps.max()) > 16
                          or bool(((ratio - steps).abs() > 1e-5 * steps).any())):  # fmt: skip
        raise ValueError("scales must be channel_scales times integer steps in 1..16 (the "
                         "two-level format: quant_math.quantize_weight_two_level)")  # fmt: skip
    codes = unpack_ref(packed, bits, k)
    g = codes.view(n, k // group_size, group_size)
    reach = torch.maximum(g.amax(-1).int() - z, z - g.amin(-1).int())
    if bool((steps * reach > 127).any()):
        raise ValueError("two-level weight: s2 (q - z) leaves int8 (|s2 (q - z)| must be <= 127)")
    return steps, codes


def mark_static(*objs) -> None:
    """Mark the tensors of prepared weights (and any other tensors given) as static inputs of
    compiled graphs: a PreparedWeight is a plain attribute of its layer, not a parameter or a
    buffer, so torch.compile's CUDA graphs ("reduce-overhead", what transformers' generate
    uses with a static cache) would otherwise copy every packed weight into the graph's own
    memory on every replay: 7.27 GiB per decode step for a Llama-2-7B-shaped W4A16 model
    holding both layouts (1da67a5)."""
    for obj in objs:
        if isinstance(obj, Tensor):
            torch._dynamo.mark_static_address(obj)
        elif isinstance(obj, (PreparedWeight, gemm_decode.DecodeWeight)):
            mark_static(*(getattr(obj, f.name) for f in dataclasses.fields(obj)))


def concat_weights(weights: list[PreparedWeight]) -> PreparedWeight:
    """Several prepared weights of the same input (a block's q / k / v projections, or gate
    and up) as one, their output channels one after another: one GEMM reads them all (fewer
    launches, and one activation quantization of the shared input instead of one per layer).
    They must agree in bits, K, group size, device and kept layouts; with the decode layout
    every weight but the last must fill its 64-column n-tiles (no padding in the middle)."""
    if not weights:
        raise ValueError("concat_weights needs at least one weight")
    first = weights[0]
    for w in weights:
        if not isinstance(w, PreparedWeight):
            raise TypeError(f"concat_weights takes PreparedWeights, got {type(w).__name__}")
        same = (w.bits, w.k, w.group_size, w.groups, w.device, w.words is None,
                w.decode is None, w.steps is None)  # fmt: skip
        if same != (first.bits, first.k, first.group_size, first.groups, first.device,
                    first.words is None, first.decode is None, first.steps is None):  # fmt: skip
            raise ValueError("concat_weights: the weights differ in bits, K, groups, device, "
                             "kept layouts or two-level format")  # fmt: skip
    if len(weights) == 1:
        return first
    words = dw = None
    if first.words is not None:
        words = torch.cat([w.words for w in weights], dim=1)
    if first.decode is not None:
        parts = [w.decode for w in weights]
        if any(d.n != d.n_pad for d in parts[:-1]):
            raise ValueError(f"concat_weights: with the decode layout every weight but the last "
                             f"needs N a multiple of {gemm_decode.TILE_N}, got "
                             f"{[d.n for d in parts]}")  # fmt: skip
        ws = torch.cat([d.scales for d in parts], dim=1)
        wz = torch.cat([d.zeros for d in parts], dim=1)
        wd = torch.cat([d.words for d in parts], dim=0)
        counters = torch.zeros(wd.shape[0], dtype=torch.int32, device=wd.device)  # one per n-tile
        dw = gemm_decode.DecodeWeight(wd, ws, wz, counters, parts[0].bits,
                                      sum(d.n for d in parts), first.k, parts[0].group_size)
        s, z = dw.scales[:, : dw.n].t(), dw.zeros[:, : dw.n].t()
        if first.steps is not None:  # (G, N_pad) tensors, as the scales
            steps = torch.cat([_decode_steps(w) for w in weights], dim=1)
            steps = steps[:, : dw.n].t()
    else:
        s = torch.cat([w.scales for w in weights], dim=0)
        z = torch.cat([w.zeros for w in weights], dim=0)
        if first.steps is not None:
            steps = torch.cat([w.steps for w in weights], dim=0)
    s1 = None
    if first.steps is not None:
        s1 = torch.cat([w.channel_scales for w in weights])
    else:
        steps = None
    out = PreparedWeight(words, s, z, first.bits, first.k, first.group_size, dw, s1, steps)
    mark_static(out)
    return out
