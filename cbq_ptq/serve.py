"""Run a quantized model with the inference kernels of cbq_kernels (METHOD.md section 5).

:func:`use_kernels` replaces every hardened :class:`QLinear` whose format the GEMMs take by a
:class:`KernelLinear`: the codes packed once into the prepared layout, then per call
``cbq_kernels.gemm.linear``: per-token (or CrossQuant) activation quantization with the
learned clipping ratio and the W4A8 / W4A4 integer GEMM, or the weight-only W4A16 / W3A16 /
W2A16 GEMM. Layers the kernels do not take (W6/W8 weights, 6-bit activations, 2-bit weights
with quantized activations, groups that are not a multiple of 32) stay fake-quantized; the
returned table says which layer runs what and why.

The kernels compute in bf16/fp16 (the activations are cast to ``compute_dtype``), so logits
match the fake-quantized fp32 model up to that rounding (tests bound it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from cbq_kernels.gemm import linear as gemm_linear
from cbq_kernels.gemm import prepare_weight
from cbq_kernels.packing import pack_ref
from cbq_ptq.qlinear import QLinear


class KernelLinear(torch.nn.Module):
    def __init__(self, q: QLinear, compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        s = q.settings
        if q.codes is None:
            raise ValueError(f"layer {q.name}: not hardened (call QLinear.harden first)")
        if s.w_bits not in (2, 3, 4):
            raise ValueError(f"{s.w_bits}-bit weights: the GEMMs take 2, 3 or 4 bits")
        if s.a_bits not in (4, 8, 16):
            raise ValueError(f"{s.a_bits}-bit activations: the GEMMs take 4, 8 or 16 bits")
        if s.a_bits < 16 and s.w_bits == 2:
            raise ValueError("2-bit weights run weight-only (the integer GEMMs take 3 or 4 bits)")
        self.name, self.in_features, self.out_features = q.name, q.in_features, q.out_features
        packed = pack_ref(q.codes, s.w_bits).contiguous()
        self.weight = prepare_weight(packed, s.w_bits, q.in_features, q.scales.float(),
                                     q.zeros.float(), q.gs)  # fmt: skip
        self.act_bits = s.a_bits if s.a_bits < 16 else None
        self.compute_dtype = compute_dtype
        self.bias = q.bias.to(compute_dtype) if q.bias is not None else None
        self.act_kwargs: dict = {}
        if self.act_bits is not None:
            self.act_kwargs["clip_ratio"] = float(q.act_ratio)
            if s.act_quantizer == "crossquant" and q.channel_factor is not None:
                self.act_kwargs["channel_factor"] = q.channel_factor.float()
                self.act_kwargs["alpha"] = s.crossquant_alpha
        self.kind = f"W{s.w_bits}A{s.a_bits}"

    def forward(self, x: Tensor) -> Tensor:
        y = gemm_linear(x.to(self.compute_dtype).contiguous(), self.weight, self.act_bits,
                        self.bias, **self.act_kwargs)  # fmt: skip
        return y.to(x.dtype)


def use_kernels(model, compute_dtype: torch.dtype = torch.bfloat16) -> dict[str, str]:
    """Replace the hardened QLinears the kernels take by :class:`KernelLinear` (in place);
    returns {layer: 'W4A8 kernel' or 'fake-quantized: <reason>'}."""
    table: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, QLinear):
            continue
        try:
            k = KernelLinear(module, compute_dtype)
        except ValueError as exc:
            table[name] = f"fake-quantized: {exc}"
            continue
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, k)
        table[name] = f"{k.kind} kernel"
    return table
