"""A linear layer being quantized (METHOD.md sections 1, 4, 6).

``QLinear`` wraps an ``nn.Linear`` during reconstruction. It keeps the full-precision weight
(after CFP folding, for the targets) and the weight the quantizer sees (after CFP truncation),
and learns: the clipping logits of the weight quantizer per row/group, the LoRA-Rounding
factors A, B, and the activation clipping logit. Modes:

* ``fp``: the full-precision layer (targets of the window's loss);
* ``quant``: fake-quantized weight (LoRA-Rounding or round-to-nearest with STE) and
  activations, differentiable in the learned parameters;
* after :meth:`harden`: integer codes, scales and zero points are final; the layer computes
  with the dequantized weight ``s (q - z)`` and still fake-quantizes its input activations.

On CUDA tensors the fused Triton kernels of cbq_kernels run; on the CPU their plain PyTorch
references (same arithmetic; the Triton interpreter would be far slower).
"""

from __future__ import annotations

import math

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
    lora_round_params,
    lora_round_ref,
)
from cbq_ptq.config import QuantSettings

CLIP_INIT_LOGIT = 4.0  # sigmoid(4) = 0.982: OmniQuant's start for learnable clipping (our choice)


class QLinear(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear, settings: QuantSettings, *, name: str = "",
                 lora: bool = True, lora_rank: int = 8, learn_clipping: bool = True,
                 train: bool = True, truncated: Tensor | None = None,
                 lora_init: str = "rtn") -> None:  # fmt: skip
        super().__init__()
        n, k = linear.weight.shape
        gs = settings.group_size
        if gs is not None and gs >= k:
            gs = None  # one group spans the row: per channel
        if gs is not None and k % gs and not settings.ragged_groups:
            settings.check_layer(name, k)
        if lora and gs is not None and gs % 16:
            raise ValueError(f"LoRA-Rounding needs group_size a multiple of 16, got {gs} ({name})")
        if lora and settings.symmetric_weights:
            raise ValueError("LoRA-Rounding is implemented for asymmetric weights (zero points)")
        self.name, self.settings, self.gs = name, settings, gs
        self.in_features, self.out_features = k, n
        w_fp = linear.weight.detach().float()
        dev = w_fp.device  # everything is built where the weight is (then moved with .to)
        self.register_buffer("w_fp", w_fp.clone())
        # the weight the quantizer sees: the truncated copy, or the same tensor as w_fp
        self.register_buffer("w", truncated.float().clone() if truncated is not None else self.w_fp)
        bias = linear.bias.detach().float().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)
        groups = groups_per_row(k, gs)
        self.clip_max = self.clip_min = None
        if learn_clipping and train:
            self.clip_max = torch.nn.Parameter(torch.full((n, groups), CLIP_INIT_LOGIT, device=dev))
            if not settings.symmetric_weights:
                self.clip_min = torch.nn.Parameter(
                    torch.full((n, groups), CLIP_INIT_LOGIT, device=dev)
                )
        self.lora_a = self.lora_b = None
        self.register_buffer("w_round", None)  # the weight LoRA-Rounding rounds (see below)
        if lora and train:
            s, _ = lora_round_params(self.w, settings.w_bits, gs, self.clip_max, self.clip_min)
            s = s.detach()
            if lora_init == "rtn":
                # Our choice (measured, DECISIONS.md): round W - s/2, so that floor + 1 is
                # round-to-nearest. V = AB starts at a constant c > 0 (rank 1), h(c) = 0.95:
                # the hardened codes start exactly at RTN and training may move a code one
                # step down. (A truncated SVD of the RTN logits cannot express RTN at rank r:
                # on stories260K its hardened start was 2.4x worse than RTN.)
                gid = torch.arange(k, device=dev) // (gs or k)
                self.w_round = self.w - 0.5 * s[:, gid]
                c = math.log(0.875 / 0.125)  # sigmoid(c) * 1.2 - 0.1 = 0.95
                g = torch.Generator().manual_seed(n * 7919 + k)
                a = torch.randn(n, lora_rank, generator=g) * 0.01
                b = torch.zeros(lora_rank, k)
                a[:, 0], b[0, :] = math.sqrt(c), math.sqrt(c)
                a, b = a.to(dev), b.to(dev)
            else:
                a, b = lora_round_init(self.w, s, gs, lora_rank, zero=lora_init == "zero")
            self.lora_a, self.lora_b = torch.nn.Parameter(a), torch.nn.Parameter(b)
        self.act_logit = None
        if settings.a_bits < 16 and train and learn_clipping:
            self.act_logit = torch.nn.Parameter(torch.tensor([CLIP_INIT_LOGIT], device=dev))
        self.register_buffer("act_ratio", torch.ones(1, device=dev))  # fixed ratio after hardening
        self.register_buffer("channel_factor", None)  # CrossQuant c^(1 - alpha), (K,)
        self.mode = "quant"
        self.beta = 2.0  # LoRA-Rounding regulariser exponent (annealed by the trainer)
        self.hard = False  # evaluate with the rounding hardening would fix (no gradient)
        self.register_buffer("codes", None)  # (N, K) uint8 after hardening
        self.register_buffer("scales", None)
        self.register_buffer("zeros", None)
        self.last_reg = torch.zeros(())

    # ------------------------------------------------------------------ weight quantizer

    def quant_params(self) -> tuple[Tensor, Tensor]:
        """(scales, zeros) (N, G) of the asymmetric weight quantizer with the current clipping."""
        return lora_round_params(self.w, self.settings.w_bits, self.gs, self.clip_max,
                                 self.clip_min)  # fmt: skip

    def weight_hat(self) -> tuple[Tensor, Tensor]:
        """(fake-quantized weight, rounding regulariser)."""
        if self.codes is not None:
            return self.dequantized(), torch.zeros((), device=self.w.device)
        bits, cuda = self.settings.w_bits, self.w.is_cuda
        if self.lora_a is not None and self.hard:
            with torch.no_grad():
                s, z = self.quant_params()
                fn_h = harden if cuda else harden_ref
                q = fn_h(self._w_lora(), self.lora_a, self.lora_b, s, z, bits, self.gs).float()
                gid = self._gid()
                return (q - z[:, gid]) * s[:, gid], torch.zeros((), device=self.w.device)
        if self.lora_a is not None:
            s, z = self.quant_params()
            fn = lora_round if cuda else lora_round_ref
            return fn(self._w_lora(), self.lora_a, self.lora_b, s, z, bits, self.gs, self.beta)
        fmax = torch.sigmoid(self.clip_max) if self.clip_max is not None else None
        fmin = torch.sigmoid(self.clip_min) if self.clip_min is not None else None
        fn = fake_quant if cuda else fake_quant_ref
        w_hat = fn(self.w, bits, self.gs, fmax, fmin, self.settings.symmetric_weights)
        return w_hat, torch.zeros((), device=self.w.device)

    def _w_lora(self) -> Tensor:
        return self.w_round if self.w_round is not None else self.w

    def _gid(self) -> Tensor:
        """The group of every input column (0 everywhere per channel)."""
        return torch.arange(self.in_features, device=self.w.device) // (self.gs or self.in_features)

    def dequantized(self) -> Tensor:
        gid = self._gid()
        return (self.codes.float() - self.zeros[:, gid]) * self.scales[:, gid]

    @torch.no_grad()
    def harden(self) -> None:
        """Fix the integer codes (rounding h = 1[AB >= 0], or round-to-nearest), scales, zero
        points and the activation clipping ratio; drop the learned parameters."""
        bits = self.settings.w_bits
        s, z = self.quant_params() if not self.settings.symmetric_weights else (None, None)
        if self.lora_a is not None:
            fn = harden if self.w.is_cuda else harden_ref
            codes = fn(self._w_lora(), self.lora_a, self.lora_b, s, z, bits, self.gs)
        else:
            w_hat = self.weight_hat()[0]
            if self.settings.symmetric_weights:  # codes offset by 2^(b-1)
                s, z = _symmetric_params(self.w, bits, self.gs, self.clip_max)
            gid = self._gid()
            codes = torch.round(w_hat / s[:, gid] + z[:, gid]).clamp(0, (1 << bits) - 1)
        self.codes = codes.to(torch.uint8)
        self.scales, self.zeros = s.float().detach(), z.float().detach()
        if self.act_logit is not None:
            self.act_ratio = torch.sigmoid(self.act_logit.detach()).reshape(1)
        self.clip_max = self.clip_min = self.lora_a = self.lora_b = self.act_logit = None
        self.w_round = None

    # ------------------------------------------------------------------ activations

    def act_hat(self, x: Tensor) -> Tensor:
        bits = self.settings.a_bits
        if bits >= 16:
            return x
        ratio = torch.sigmoid(self.act_logit) if self.act_logit is not None else self.act_ratio
        if self.settings.act_quantizer == "crossquant" and self.channel_factor is not None:
            return crossquant_fake(x, bits, self.channel_factor, self.settings.crossquant_alpha,
                                   ratio)  # fmt: skip
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
        ratio = torch.sigmoid(self.act_logit) if self.act_logit is not None else self.act_ratio
        qmax = (1 << (bits - 1)) - 1
        xf = x.reshape(-1, x.shape[-1]).float()
        if self.settings.act_quantizer == "crossquant" and self.channel_factor is not None:
            s = _crossquant_scale(xf, bits, self.channel_factor, self.settings.crossquant_alpha,
                                  ratio)  # fmt: skip
        else:
            s = (ratio * xf.abs().amax(-1, keepdim=True) / qmax).clamp_min(1e-8)
        return torch.round(xf / s).clamp(-qmax - 1, qmax)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "fp":
            return F.linear(x, self.w_fp.to(x.dtype), _cast(self.bias, x.dtype))
        w_hat, reg = self.weight_hat()
        self.last_reg = reg
        return F.linear(self.act_hat(x), w_hat.to(x.dtype), _cast(self.bias, x.dtype))

    def learned(self) -> dict[str, list[torch.nn.Parameter]]:
        """The trainable parameters by kind (clipping, lora, act)."""
        groups: dict[str, list[torch.nn.Parameter]] = {"clip": [], "lora": [], "act": []}
        for p in (self.clip_max, self.clip_min):
            if p is not None:
                groups["clip"].append(p)
        for p in (self.lora_a, self.lora_b):
            if p is not None:
                groups["lora"].append(p)
        if self.act_logit is not None:
            groups["act"].append(self.act_logit)
        return groups


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t.to(dtype) if t is not None else None


def _symmetric_params(w, bits, gs, clip_max_logit):
    from cbq_kernels.fake_quant import _params

    fmax = torch.sigmoid(clip_max_logit) if clip_max_logit is not None else None
    _, _, _, s, _, _, _ = _params(w.float(), gs, bits, True, fmax, None)
    return s, torch.full_like(s, float(1 << (bits - 1)))


def crossquant_fake(x: Tensor, bits: int, channel_factor: Tensor, alpha: float,
                    ratio: Tensor) -> Tensor:  # fmt: skip
    """CrossQuant fake quantization (METHOD.md section 6): ``s_tk = ratio * r_t^alpha *
    c_k^(1-alpha) / qmax`` with r_t the token's max |x|, ``channel_factor`` = c^(1-alpha);
    round straight-through."""
    qmax = (1 << (bits - 1)) - 1
    xf = x.float()
    s = _crossquant_scale(xf, bits, channel_factor, alpha, ratio)
    u = xf / s
    q = (u + (torch.round(u) - u).detach()).clamp(-qmax - 1, qmax)
    return (q * s).to(x.dtype)


def _crossquant_scale(xf: Tensor, bits: int, channel_factor: Tensor, alpha: float,
                      ratio: Tensor) -> Tensor:  # fmt: skip
    """CrossQuant's per-element step ``ratio * r_t^alpha * c_k^(1-alpha) / qmax`` (fp32)."""
    r = xf.abs().amax(-1, keepdim=True).clamp_min(1e-8)
    return ratio * r.pow(alpha) * channel_factor.float() / ((1 << (bits - 1)) - 1)
