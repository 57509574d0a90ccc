"""A linear layer being quantized (METHOD.md sections 1, 4, 6).

``QLinear`` wraps an ``nn.Linear`` during reconstruction. It keeps the full-precision weight
(after CFP folding, for the targets), the weight whose statistics set the quantizer's steps
(after CFP truncation) and the weight that is rounded (the same one, or the one that
reproduces a GPTQ start), and learns: the clipping logits of the weight quantizer per
row/group, the LoRA-Rounding factors A, B and the activation clipping logit.

How it computes is chosen by its caller, explicitly, for a scope (no mode flags to set and
read back):

* :func:`full_precision` (the window's targets): the full-precision layer;
* :func:`quantized` (training and evaluation steps): the weight is quantized once on entry,
  with soft or hard rounding and the regulariser exponent given there, the activations are
  fake-quantized; the scope yields the window's rounding regulariser;
* outside both: the current state with hard rounding (what hardening would fix), or, after
  :meth:`QLinear.harden`, the integer codes, scales and zero points.

The arithmetic is cbq_kernels': :mod:`cbq_kernels.quant_math` (steps, codes), the fused
fake-quantization and LoRA-Rounding kernels on CUDA tensors and their PyTorch references on
the CPU (same formulas; Triton's interpreter would be far slower).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from cbq_kernels.fake_quant import fake_quant, fake_quant_ref
from cbq_kernels.formats import groups_per_row
from cbq_kernels.lora_round import (
    harden,
    harden_ref,
    lora_round,
    lora_round_init,
    lora_round_ref,
    start_logits,
)
from cbq_kernels.quant_math import (
    dequantize_weight,
    quantize_act,
    quantize_weight,
    quantize_weight_two_level,
    reciprocal,
    segment_index,
    weight_params,
)
from cbq_kernels.quant_math import fake_quant_act as fake_quant_act_math
from cbq_ptq.config import LORA_BASES, QuantSettings

# Learnable clipping factors are f = min(1, sigmoid(logit) / sigmoid(CLIP_MAX_LOGIT)): logit 5
# is exactly f = 1 (min-max, METHOD.md's start; also where a searched factor of 1 or the
# activations' ratio start, so that a start is the quantizer it was computed with), smaller
# logits any f < 1, with sigmoid's slope at 5 (0.0066) still moving it. (OmniQuant starts
# its logits at 4, sigmoid = 0.982: measured here, that start clipped 1.8% off every
# token's largest activation and off every group that the search had left unclipped.)
CLIP_MAX_LOGIT = 5.0
_SIG_MAX = 1 / (1 + math.exp(-CLIP_MAX_LOGIT))


def clip_logit(factor: Tensor) -> Tensor:
    """The logit of a clipping factor in (0, 1] (inverse of :func:`clip_factor`)."""
    return torch.logit(factor.float().clamp(1e-4, 1.0) * _SIG_MAX)


def clip_factor(logit: Tensor | None) -> Tensor | None:
    """The clipping factor of a logit, in (0, 1] (None stays None: no clipping)."""
    if logit is None:
        return None
    return (torch.sigmoid(logit) * (1 / _SIG_MAX)).clamp(max=1.0)


class QLinear(torch.nn.Module):
    _direct_fixed = True  # fixed codes on the CPU without the LoRA-Rounding op (weight_hat)

    def __init__(self, linear: torch.nn.Linear, settings: QuantSettings, *, name: str = "",
                 train: bool = True, lora: bool = True, lora_rank: int = 8,
                 learn_clipping: bool = True, truncated: Tensor | None = None,
                 lora_init: str = "nearest", lora_margin: float = 2.0,
                 act_clip: float = 1.0, lora_base: str = "start") -> None:  # fmt: skip
        super().__init__()
        n, k = linear.weight.shape
        gs = settings.group_size
        if gs is not None and gs >= k:
            gs = None  # one group spans the row: per channel
        if gs is not None and k % gs and not settings.ragged_groups:
            settings.check_layer(name, k)
        lora = lora and train
        if lora and gs is not None and gs % 16:
            raise ValueError(f"LoRA-Rounding needs group_size a multiple of 16, got {gs} ({name})")
        if lora and settings.symmetric_weights:
            raise ValueError("LoRA-Rounding is implemented for asymmetric weights (zero points)")
        self.name, self.settings, self.gs = name, settings, gs
        self.in_features, self.out_features = k, n
        self.lora_rank, self.lora_init, self.lora_margin = lora_rank, lora_init, lora_margin
        if lora_base not in LORA_BASES:
            raise ValueError(f"lora_base must be one of {LORA_BASES}, got {lora_base!r}")
        self.lora_base = lora_base
        w_fp = linear.weight.detach().float()
        dev = w_fp.device  # everything is built where the weight is (then moved with .to)
        self.register_buffer("w_fp", w_fp.clone())
        # the weight whose statistics set the steps: the truncated copy, or w_fp itself
        self.register_buffer("w", truncated.float().clone() if truncated is not None else self.w_fp)
        bias = linear.bias.detach().float().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)
        groups = groups_per_row(k, gs)
        self.learn_clipping = learn_clipping and train
        self.register_buffer("clip_max", None)
        self.register_buffer("clip_min", None)
        if self.learn_clipping:  # min-max; a search or a GPTQ start sets other factors
            self._set_clip(torch.full((n, groups), CLIP_MAX_LOGIT, device=dev))
        # LoRA-Rounding state: the weight that is rounded, the frozen start logits V0 and the
        # low-rank factors (None: round-to-nearest with a straight-through gradient)
        for attr in ("w_round", "w_base", "v0", "lora_a", "lora_b"):
            self.register_buffer(attr, None)
        self.lora = lora
        if lora:
            self._start_lora()
        # the per-token activation clipping ratio: learned from act_clip (a logit; at the
        # default 1.0 the logit is CLIP_MAX_LOGIT = 5, where sigmoid's slope is 0.0066, so a
        # run's ~128 Adam steps of 0.005 move the ratio by < 0.5%), or fixed at act_clip
        if not 0.0 < act_clip <= 1.0:
            raise ValueError(f"act_clip must be in (0, 1], got {act_clip}")
        self.register_buffer("act_logit", None)
        if settings.a_bits < 16 and train and learn_clipping:
            start = clip_logit(torch.tensor([float(act_clip)], device=dev))
            self._put("act_logit", start, learn=True)
        # the fixed ratio (after hardening: the learned one)
        self.register_buffer("act_ratio", torch.full((1,), float(act_clip), device=dev))
        self.register_buffer("channel_factor", None)  # CrossQuant c^(1 - alpha), (K,)
        self.register_buffer("codes", None)  # (N, K) uint8 after hardening
        self.register_buffer("scales", None)
        self.register_buffer("zeros", None)
        # s1 (N,) of a two-level weight (settings.two_level) after hardening: scales = s1 s2
        self.register_buffer("channel_scales", None)
        self._scope: tuple[str, Tensor | None] | None = None  # set by full_precision / quantized

    # ------------------------------------------------------------------ initialisation

    def _put(self, name: str, value: Tensor | None, learn: bool = False) -> None:
        """(Re)register ``name`` as a learned parameter or a fixed buffer (None: absent)."""
        self._parameters.pop(name, None)
        self._buffers.pop(name, None)
        self.__dict__.pop(name, None)
        if value is not None and learn:
            self.register_parameter(name, torch.nn.Parameter(value.detach().clone()))
        else:
            self.register_buffer(name, None if value is None else value.detach().clone())

    def share_act_clip(self, other: QLinear) -> None:
        """Learn one activation clipping ratio with ``other`` (a layer reading the same input):
        its learned logit becomes this layer's too (one parameter, trained once per step)."""
        if (self.act_logit is None) != (other.act_logit is None):
            raise ValueError(f"{self.name} and {other.name}: one learns its activation clipping "
                             "ratio and the other does not")  # fmt: skip
        if other.act_logit is not None:
            self._parameters["act_logit"] = other.act_logit
        self.act_ratio = other.act_ratio.clone()

    def _set_clip(self, logits: Tensor) -> None:
        """Clipping logits: learned parameters, or fixed buffers (a searched or GPTQ start
        that is not trained)."""
        self._put("clip_max", logits, self.learn_clipping)
        self._put("clip_min", None if self.settings.symmetric_weights else logits,
                  self.learn_clipping)  # fmt: skip

    def _start_lora(self, start_codes: Tensor | None = None) -> None:
        """LoRA-Rounding from round-to-nearest (start_codes None) or from given codes (a GPTQ
        solution) with the current clipping; see CBQConfig.lora_init."""
        n, k, r = self.out_features, self.in_features, self.lora_rank
        dev = self.w.device
        with torch.no_grad():
            s, z = self.quant_params()
            gid = self._gid()
            u = self.w * reciprocal(s)[:, gid]
            v0 = None
            if self.lora_init == "nearest":
                if start_codes is None:  # AdaRound's neighbours floor(W/s) and floor + 1
                    w_round = self.w
                    up = torch.round(u) > torch.floor(u)
                else:
                    # round the point half a step from the start towards the weight: floor
                    # is the lower of the start and its neighbour on the weight's side
                    start = start_codes.float() - z[:, gid]
                    side = torch.where(u >= start, 0.5, -0.5)
                    w_round = (start + side) * s[:, gid]
                    up = side < 0
                v0 = start_logits(up, self.lora_margin)
                g = torch.Generator().manual_seed(n * 7919 + k)
                a = torch.zeros(n, r)  # V = V0 at the start, as a LoRA adapter starts at 0
                b = torch.randn(r, k, generator=g) / math.sqrt(k)
            else:
                if start_codes is not None:
                    raise ValueError(f"lora_init={self.lora_init!r} cannot start from GPTQ "
                                     "codes: use lora_init='nearest'")  # fmt: skip
                w_round = self.w
                a, b = lora_round_init(self.w, s, self.gs, r, zero=self.lora_init == "zero")
        self._set_round_point(w_round, s, gid)
        self._put("v0", v0)
        self._put("lora_a", a.to(dev), learn=True)
        self._put("lora_b", b.to(dev), learn=True)

    @torch.no_grad()
    def set_clip_factors(self, factors: Tensor) -> None:
        """Start the clipping at the given factors (N, G) (a search's result); the rounding
        restarts from round-to-nearest with the new steps."""
        self._set_clip(clip_logit(factors.to(self.w.device)))
        if self.lora:
            self._start_lora()

    @torch.no_grad()
    def start_from(self, codes: Tensor, clip_factors: Tensor) -> None:
        """Start from a given solution (GPTQ): its clipping factors (N, G) and codes (N, K),
        which the hardened layer reproduces before any training. With LoRA-Rounding the
        codes are the frozen start V0 of the rounding; without it, the codes are fixed (V0 =
        -3 saturates h at 0, A = B = 0 frozen): with lora_base 'start' the integer base in
        step units, which a learned step only scales; with 'step' floor(w_round / s) of a
        rounded weight half a step above the start, which follows the learned step."""
        self._set_clip(clip_logit(clip_factors.to(self.w.device)))
        if self.lora:
            self._start_lora(codes)
            return
        s, z = self.quant_params()
        gid = self._gid()
        self._set_round_point((codes.float() - z[:, gid] + 0.5) * s[:, gid], s, gid)
        self._put("v0", start_logits(torch.zeros_like(codes, dtype=torch.bool), 3.0))
        dev = self.w.device
        self._put("lora_a", torch.zeros(self.out_features, 1, device=dev))
        self._put("lora_b", torch.zeros(1, self.in_features, device=dev))

    def _set_round_point(self, w_round: Tensor, s: Tensor, gid: Tensor) -> None:
        """Keep the point that is rounded: as a weight (lora_base 'step': its floor follows the
        learned step, so a step change of a few percent moves the floor of the large codes by
        one, a jump no gradient saw) or as the integer floor(w_round / s) at the start
        (lora_base 'start': the rounding's two candidates stay fixed, the step only scales
        them)."""
        if self.lora_base == "step":
            self._put("w_round", w_round)
            self._put("w_base", None)
        else:
            self._put("w_round", None)
            self._put("w_base", torch.floor(w_round * reciprocal(s)[:, gid]))

    def _round_point(self, s: Tensor) -> Tensor:
        """The weight whose floor(. / s) is the rounding's lower candidate, for the step s."""
        if self.w_base is None:
            return self.w_round
        return (self.w_base + 0.5) * s[:, self._gid()]

    # ------------------------------------------------------------------ weight quantizer

    def quant_params(self) -> tuple[Tensor, Tensor]:
        """(scales, zeros) (N, G) of the asymmetric weight quantizer with the current clipping."""
        _, _, _, s, z, _, _ = weight_params(self.w.float(), self.gs, self.settings.w_bits,
                                            False, *self.clip_factors())  # fmt: skip
        return s, z

    def clip_factors(self) -> tuple[Tensor | None, Tensor | None]:
        """(fmax, fmin) (N, G) of the weight quantizer (None: 1, no clipping)."""
        return clip_factor(self.clip_max), clip_factor(self.clip_min)

    def weight_hat(self, rounding: str = "hard", beta: float = 2.0,
                   temperature: float = 1.0) -> tuple[Tensor, Tensor]:  # fmt: skip
        """(quantized weight, rounding regulariser R). ``rounding``: 'hard' (what hardening
        fixes, no gradient), 'soft' (LoRA-Rounding's relaxation h(V / temperature),
        differentiable) or 'ste' (the hard weight in the forward pass, the soft one's
        gradient in the backward pass). Without LoRA-Rounding: round-to-nearest with a
        straight-through gradient in every case. After hardening: the codes' weight, R = 0."""
        zero = torch.zeros((), device=self.w_fp.device if self.codes is None else self.codes.device)
        if self.codes is not None:
            return self.dequantized(), zero
        bits, cuda = self.settings.w_bits, self.w.is_cuda
        if self.lora_a is None:
            fmax, fmin = self.clip_factors()
            fn = fake_quant if cuda else fake_quant_ref
            return fn(self.w, bits, self.gs, fmax, fmin, self.settings.symmetric_weights), zero
        s, z = self.quant_params()
        if rounding == "hard":
            with torch.no_grad():
                fn_h = harden if cuda else harden_ref
                q = fn_h(self._round_point(s), self.lora_a, self.lora_b, s, z, bits, self.gs,
                         v0=self.v0)  # fmt: skip
                return dequantize_weight(q, s, z, self.gs), zero
        a, v0 = self.lora_a, self.v0
        if temperature != 1.0:  # h(V / T): V0 / T and (A / T) B
            a = a / temperature
            v0 = None if v0 is None else (v0.float() / temperature).to(v0.dtype)
        if rounding not in ("soft", "ste"):
            raise ValueError(f"rounding must be 'hard', 'soft' or 'ste', got {rounding!r}")
        if (not cuda and self._direct_fixed and not self.lora and self.w_base is not None
                and temperature <= 1.0):
            # fixed codes (a GPTQ start without LoRA-Rounding: h = 0 exactly, V0 = -3 saturates
            # the rectified sigmoid) on the CPU: the op's value and gradients (step: w_hat / s,
            # zero point: -s where the code is clamped) without its logits, sigmoid and
            # regulariser; through the op a fixed-code layer's weight forward and backward took
            # 65-73% of its matmul's at 4 x 256 tokens (scripts/bench_fixed_codes.py), DECISIONS
            # "Fixed codes on the CPU"
            gid = self._gid()
            zg = z[:, gid]
            q = (self.w_base + zg).clamp(0, (1 << bits) - 1)
            return s[:, gid] * (q - zg), zero
        fn = lora_round if cuda else lora_round_ref
        if self.w_base is None:
            return fn(self.w_round, a, self.lora_b, s, z, bits, self.gs, beta, v0,
                      rounding == "ste")  # fmt: skip
        # a rounded point fixed in step units: w_hat = s (clamp(base + h + z) - z), whose step
        # gradient is w_hat / s for every weight (the op's is LSQ's, floor(u) + h - u inside
        # the code range, for a point fixed as a weight); so the op runs at the detached step
        # and the step enters as the factor s / s_d (1 in value)
        s_d = s.detach()
        w_hat, reg = fn(self._round_point(s_d), a, self.lora_b, s_d, z, bits, self.gs, beta, v0,
                        rounding == "ste")  # fmt: skip
        return w_hat * (s / s_d)[:, self._gid()], reg

    def _gid(self) -> Tensor:
        """The group of every input column (0 everywhere per channel)."""
        return segment_index(self.in_features, self.gs, self.w_fp.device)[0]

    def dequantized(self) -> Tensor:
        return dequantize_weight(self.codes, self.scales, self.zeros, self.gs)

    @torch.no_grad()
    def set_codes(self, codes: Tensor | None, scales: Tensor | None = None,
                  zeros: Tensor | None = None) -> None:  # fmt: skip
        """Give the layer hard codes (N, K) on the grid (scales, zeros) (N, G) ahead of
        :meth:`harden` (which keeps them): from then on it computes with them, whatever the
        rounding asked for. ``None`` takes them back (the trained parameters rule again)."""
        if codes is None:
            self.codes = self.scales = self.zeros = None
            return
        self.codes = codes.to(torch.uint8)
        self.scales, self.zeros = scales.float().detach(), zeros.float().detach()

    @torch.no_grad()
    def harden(self) -> None:
        """Fix the integer codes (LoRA-Rounding's h = 1[V >= 0], or round-to-nearest through
        cbq_kernels.quant_math: the codes training computed with; codes given by
        :meth:`set_codes` are kept), scales, zero points and the activation clipping ratio;
        drop the learned parameters."""
        bits = self.settings.w_bits
        if self.settings.two_level and self.channel_scales is None:
            if self.codes is not None or self.lora_a is not None:
                raise ValueError(f"layer {self.name}: two-level weights are quantized "
                                 f"round-to-nearest (--method rtn), not from GPTQ codes or "
                                 f"LoRA-Rounding")  # fmt: skip
            codes, s1, s2, z = quantize_weight_two_level(self.w, self.gs)
            self.set_codes(codes, s1[:, None] * s2.float(), z.float())
            self.channel_scales = s1
        if self.codes is not None:
            codes, s, z = self.codes, self.scales, self.zeros
        elif self.lora_a is not None:
            s, z = self.quant_params()
            fn = harden if self.w.is_cuda else harden_ref
            codes = fn(self._round_point(s), self.lora_a, self.lora_b, s, z, bits, self.gs,
                       v0=self.v0)  # fmt: skip
        else:
            fmax, fmin = self.clip_factors()
            codes, s, z = quantize_weight(self.w, bits, self.gs, self.settings.symmetric_weights,
                                          fmax, fmin)  # fmt: skip
        self.codes = codes.to(torch.uint8)
        self.scales, self.zeros = s.float().detach(), z.float().detach()
        if self.act_logit is not None:
            self.act_ratio = clip_factor(self.act_logit.detach()).reshape(1)
        for attr in ("clip_max", "clip_min", "lora_a", "lora_b", "act_logit", "w_round", "w_base",
                     "v0"):
            self._put(attr, None)

    def release_full_precision(self) -> None:
        """Drop the full-precision weights once the layer is hardened and the
        full-precision stream has passed it (nothing reads them afterwards)."""
        if self.codes is None:
            raise ValueError(f"layer {self.name}: harden before releasing the fp32 weight")
        self.w_fp = self.w = torch.empty(0, device=self.codes.device)

    # ------------------------------------------------------------------ activations

    def _act_ratio(self) -> Tensor:
        return clip_factor(self.act_logit) if self.act_logit is not None else self.act_ratio

    def act_hat(self, x: Tensor) -> Tensor:
        bits = self.settings.a_bits
        if bits >= 16:
            return x
        ratio = self._act_ratio()
        if self.settings.act_quantizer == "crossquant" and self.channel_factor is not None:
            return fake_quant_act_math(x, bits, ratio.reshape(()), self.channel_factor,
                                       self.settings.crossquant_alpha)  # fmt: skip
        x2 = x.reshape(-1, x.shape[-1])
        fn = fake_quant if x.is_cuda else fake_quant_ref
        return fn(x2.contiguous(), bits, None, ratio.reshape(1), None, True).reshape(x.shape)

    @torch.no_grad()
    def act_codes(self, x: Tensor) -> Tensor | None:
        """The integer codes (T, K) this layer's activation quantizer gives x (None with 16-bit
        activations): for the quantization-kernel proportion (METHOD.md section 6)."""
        bits = self.settings.a_bits
        if bits >= 16:
            return None
        cross = self.settings.act_quantizer == "crossquant" and self.channel_factor is not None
        q, _ = quantize_act(x, bits, self._act_ratio().reshape(()),
                            self.channel_factor if cross else None,
                            self.settings.crossquant_alpha if cross else 1.0)  # fmt: skip
        return q

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor) -> Tensor:
        scope = self._scope
        if scope is not None and scope[0] == "fp":
            return F.linear(x, self.w_fp.to(x.dtype), _cast(self.bias, x.dtype))
        if scope is not None:
            w_hat = scope[1]
        else:
            with torch.no_grad():
                w_hat = self.weight_hat("hard")[0]
        return F.linear(self.act_hat(x), w_hat.to(x.dtype), _cast(self.bias, x.dtype))

    def learned(self) -> dict[str, list[torch.nn.Parameter]]:
        """The trainable parameters by kind (clipping, lora, act)."""
        groups: dict[str, list[torch.nn.Parameter]] = {"clip": [], "lora": [], "act": []}
        for kind, attrs in (("clip", ("clip_max", "clip_min")), ("lora", ("lora_a", "lora_b")),
                            ("act", ("act_logit",))):  # fmt: skip
            for attr in attrs:
                p = getattr(self, attr)
                if isinstance(p, torch.nn.Parameter):
                    groups[kind].append(p)
        return groups


@contextlib.contextmanager
def full_precision(qls: Iterable[QLinear]) -> Iterator[None]:
    """Within the scope the layers compute in full precision (weights and activations)."""
    qls = list(qls)
    for q in qls:
        q._scope = ("fp", None)
    try:
        yield
    finally:
        for q in qls:
            q._scope = None


@contextlib.contextmanager
def quantized(qls: Iterable[QLinear], *, rounding: str = "hard", beta: float = 2.0,
              temperature: float = 1.0) -> Iterator[Tensor]:  # fmt: skip
    """Within the scope every layer computes with its weight quantized once, here, with the
    given rounding ('hard', 'soft' or 'ste', :meth:`QLinear.weight_hat`), regulariser
    exponent and temperature; activations fake-quantized. Yields the summed regulariser
    divided by the number of weights (a mean per weight; 0 without LoRA-Rounding or with
    hard rounding)."""
    qls = list(qls)
    total, count = None, 0
    try:
        for q in qls:
            w_hat, reg = q.weight_hat(rounding, beta, temperature)
            q._scope = ("quant", w_hat)
            total = reg if total is None else total + reg
            count += q.out_features * q.in_features
        yield total / max(count, 1) if total is not None else torch.zeros(())
    finally:
        for q in qls:
            q._scope = None


def qlinears(modules: Iterable[torch.nn.Module]) -> list[QLinear]:
    """Every QLinear inside the given modules, in module order."""
    return [m for mod in modules for m in mod.modules() if isinstance(m, QLinear)]


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t.to(dtype) if t is not None else None

