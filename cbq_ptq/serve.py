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

from cbq_kernels.gemm import GemmPolicy, PreparedWeight, mark_static, prepare_weight
from cbq_kernels.gemm import linear as gemm_linear
from cbq_kernels.gemm_weight import concat_weights
from cbq_kernels.packing import pack_ref
from cbq_kernels.quant_math import quantize_weight, quantize_weight_two_level
from cbq_kernels.rmsnorm import rms_norm, rms_norm_ref, rms_norm_takes
from cbq_ptq import rotation
from cbq_ptq.config import QuantSettings
from cbq_ptq.qlinear import QLinear


def kind_error(settings: QuantSettings, group_size: int | None = None) -> str | None:
    """Why the GEMMs do not take a layer (it stays fake-quantized), or None."""
    if settings.w_bits not in (2, 3, 4):
        return f"{settings.w_bits}-bit weights: the GEMMs take 2, 3 or 4 bits"
    if settings.a_bits not in (4, 8, 16):
        return f"{settings.a_bits}-bit activations: the GEMMs take 4, 8 or 16 bits"
    if settings.a_bits < 16 and settings.w_bits == 2:
        return "2-bit weights run weight-only (the integer GEMMs take 3 or 4 bits)"
    if group_size is not None and group_size % 32:
        return f"groups of {group_size}: the GEMMs take multiples of 32"
    return None


def _check_kind(settings: QuantSettings) -> None:
    reason = kind_error(settings)
    if reason is not None:
        raise ValueError(reason)


class KernelLinear(torch.nn.Module):
    """A linear layer run by the inference GEMMs: the packed weight
    (:class:`cbq_kernels.gemm.PreparedWeight`) is its only copy of the weight."""

    def __init__(self, name: str, weight: PreparedWeight, settings: QuantSettings,
                 bias: Tensor | None = None, act_kwargs: dict | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16) -> None:  # fmt: skip
        super().__init__()
        _check_kind(settings)
        self.name, self.weight, self.settings = name, weight, settings
        self.out_features, self.in_features = weight.n, weight.k
        self.act_bits = settings.a_bits if settings.a_bits < 16 else None
        self.compute_dtype = compute_dtype
        self.bias = bias.to(compute_dtype) if bias is not None else None
        self.act_kwargs = dict(act_kwargs or {})
        self.kind = f"W{settings.w_bits}A{settings.a_bits}"
        self.policy = None  # the GEMMs' dispatch (cbq_kernels.gemm.GemmPolicy; None: default)
        # static for CUDA graphs (cbq_kernels.gemm.mark_static): not copied on every replay
        # (prepare_weight marked the weight's own tensors)
        mark_static(self.bias, *self.act_kwargs.values())

    @classmethod
    def from_codes(cls, name: str, codes: Tensor, scales: Tensor, zeros: Tensor,
                   settings: QuantSettings, group_size: int | None, bias: Tensor | None = None,
                   act_kwargs: dict | None = None, compute_dtype: torch.dtype = torch.bfloat16,
                   channel_scales: Tensor | None = None):  # fmt: skip
        """From unsigned codes (N, K), scales and zero points (N, G) (and a two-level
        weight's channel scales s1)."""
        _check_kind(settings)
        packed = pack_ref(codes, settings.w_bits).contiguous()
        return cls.from_packed(name, packed, settings.w_bits, codes.shape[1], scales, zeros,
                               settings, group_size, bias, act_kwargs, compute_dtype,
                               channel_scales)  # fmt: skip

    @classmethod
    def from_packed(cls, name: str, packed: Tensor, bits: int, k: int, scales: Tensor,
                    zeros: Tensor, settings: QuantSettings, group_size: int | None,
                    bias: Tensor | None = None, act_kwargs: dict | None = None,
                    compute_dtype: torch.dtype = torch.bfloat16,
                    channel_scales: Tensor | None = None):  # fmt: skip
        """From the canonical packed words (N, ceil(K / C)) int32 of ``bits``-bit codes, as a
        saved model holds them (``channel_scales``: a two-level weight's s1, for
        prepare_weight)."""
        if settings.two_level and channel_scales is None:
            raise ValueError(f"layer {name}: a two-level setting ({settings.name}) needs the "
                             f"weight's channel_scales")  # fmt: skip
        weight = prepare_weight(packed, bits, k, scales.float(), zeros.float(), group_size,
                                channel_scales=channel_scales)  # fmt: skip
        return cls(name, weight, settings, bias, act_kwargs, compute_dtype)

    @classmethod
    def from_qlinear(cls, q: QLinear, compute_dtype: torch.dtype = torch.bfloat16):
        """The kernel layer of a hardened QLinear (its learned activation clipping and
        CrossQuant factors included)."""
        s = q.settings
        if q.codes is None:
            raise ValueError(f"layer {q.name}: not hardened (call QLinear.harden first)")
        _check_kind(s)
        act_kwargs = activation_kwargs(s, q.act_ratio, q.channel_factor)
        return cls.from_codes(q.name, q.codes, q.scales, q.zeros, s, q.gs, q.bias, act_kwargs,
                              compute_dtype, q.channel_scales)  # fmt: skip

    @classmethod
    def round_to_nearest(cls, name: str, linear: torch.nn.Linear, settings: QuantSettings,
                         compute_dtype: torch.dtype = torch.bfloat16):  # fmt: skip
        """RTN of an nn.Linear's weight (:func:`cbq_kernels.quant_math.quantize_weight`),
        per-token activations: for speed measurements, where the values do not matter
        (:func:`cbq_kernels.quant_math.quantize_weight_two_level` for a two-level setting)."""
        _check_kind(settings)
        s1 = None
        if settings.two_level:
            codes, s1, s2, zeros = quantize_weight_two_level(linear.weight, settings.group_size)
            scales = s1[:, None] * s2.float()
        else:
            codes, scales, zeros = quantize_weight(linear.weight, settings.w_bits,
                                                   settings.group_size)  # fmt: skip
        return cls.from_codes(name, codes, scales, zeros.float(), settings, settings.group_size,
                              linear.bias, None, compute_dtype, s1)  # fmt: skip

    def fuse_rotation(self, signs: Tensor) -> None:
        """Take an online Hadamard rotation of the input into the GEMM call (with plain
        per-token activations: one kernel with the quantizer) instead of a pre-hook."""
        self.act_kwargs["rotation_signs"] = signs.to(self.weight.device)

    @property
    def plain_per_token(self) -> bool:
        """Whether the activations are quantized per token with nothing but a clipping ratio
        (no CrossQuant factors, rotation, fused norm or SwiGLU yet): the quantizer that
        :func:`fuse_norms` and :func:`fuse_swiglu` can extend."""
        return self.act_bits is not None and set(self.act_kwargs) <= {"clip_ratio"}

    def fuse_norm(self, weight: Tensor, eps: float) -> None:
        """Take the RMSNorm of the input (``x / sqrt(mean(x^2) + eps) * weight``) into the
        activation quantizer (:func:`fuse_norms`)."""
        self.act_kwargs["norm_weight"] = weight.to(self.weight.device)
        self.act_kwargs["norm_eps"] = eps
        mark_static(self.act_kwargs["norm_weight"])

    def fuse_glu(self) -> None:
        """Take the SwiGLU in front of this layer into its activation quantizer: the input is
        then a fused gate | up output (..., 2K) and ``silu(gate) * up`` is quantized
        (:func:`fuse_swiglu`)."""
        self.act_kwargs["glu"] = True

    def forward(self, x: Tensor) -> Tensor:
        y = gemm_linear(x.to(self.compute_dtype).contiguous(), self.weight, self.act_bits,
                        self.bias, policy=self.policy, **self.act_kwargs)  # fmt: skip
        return y.to(x.dtype)


class _FusedGroup(torch.nn.Module):
    """Layers that read the same input (a block's q / k / v, or gate and up) run as one GEMM
    on their concatenated weights (:func:`cbq_kernels.gemm_weight.concat_weights`): the first
    member called computes the whole output, each member returns its columns. The output is
    kept only until every member has taken its part (a prefill's activations are large)."""

    def __init__(self, parts: list[KernelLinear]) -> None:
        super().__init__()
        first = parts[0]
        biases = [p.bias for p in parts]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else torch.zeros(p.out_features,
                              dtype=first.compute_dtype, device=p.weight.device)
                              for b, p in zip(biases, parts, strict=True)])  # fmt: skip
        self.fused = KernelLinear("+".join(p.name for p in parts),
                                  concat_weights([p.weight for p in parts]), first.settings,
                                  bias, first.act_kwargs, first.compute_dtype)  # fmt: skip
        self.fused.policy = first.policy
        self.splits = [p.out_features for p in parts]
        self._input: Tensor | None = None
        self._outputs: tuple[Tensor, ...] = ()
        self._taken: set[int] = set()

    def output(self, x: Tensor, index: int) -> Tensor:
        if self._input is not x or index in self._taken:
            self._outputs = self.fused(x).split(self.splits, dim=-1)
            self._input, self._taken = x, set()
        out = self._outputs[index]
        self._taken.add(index)
        if len(self._taken) == len(self.splits):
            self._input, self._outputs, self._taken = None, (), set()
        return out


class FusedMember(torch.nn.Module):
    """One layer of a :class:`_FusedGroup` in its old place (``q_proj``, ``up_proj``...)."""

    def __init__(self, group: _FusedGroup, index: int, name: str) -> None:
        super().__init__()
        self.index, self.name = index, name
        self.in_features = group.fused.in_features
        self.out_features = group.splits[index]
        # the group is shared: registered under the first member only (one copy in
        # named_modules and state_dict), held as a plain attribute by the others
        if index == 0:
            self.group = group
        else:
            object.__setattr__(self, "group", group)

    def forward(self, x: Tensor) -> Tensor:
        return self.group.output(x, self.index)


def _fusable(parts: list) -> bool:
    """KernelLinears of one kind whose activation quantizers agree (the input is quantized
    once for all of them) and that carry no online rotation or forward hook."""
    if not all(isinstance(p, KernelLinear) for p in parts):
        return False
    first = parts[0]
    for p in parts:
        if (p.kind, p.compute_dtype, p.act_bits) != (first.kind, first.compute_dtype,
                                                     first.act_bits):  # fmt: skip
            return False
        if p._forward_pre_hooks or p._forward_hooks or "rotation_signs" in p.act_kwargs:
            return False
        if p.act_kwargs.keys() != first.act_kwargs.keys():
            return False
        for key, value in p.act_kwargs.items():
            other = first.act_kwargs[key]
            same = (torch.equal(value, other) if isinstance(value, Tensor)
                    and isinstance(other, Tensor) else value == other)  # fmt: skip
            if not same:
                return False
    return True


def set_policy(model: torch.nn.Module, policy: GemmPolicy | None) -> int:
    """Run every kernel layer's GEMM of ``model`` under ``policy`` (None: the default
    dispatch, cbq_kernels.gemm.DEFAULT_POLICY); returns how many layers took it. Layers fused
    later by :func:`fuse_projections` keep it. RMSNorm kernels (:func:`fuse_rms_norms`, run
    first) take its ``prologue_pdl``."""
    if policy is not None and not isinstance(policy, GemmPolicy):
        raise TypeError(f"policy must be a GemmPolicy or None, got {type(policy).__name__}")
    count = 0
    for m in model.modules():
        if isinstance(m, KernelLinear):
            m.policy = policy
            count += 1
        elif isinstance(m, KernelRMSNorm):
            m.policy = policy
    return count


def fuse_projections(model: torch.nn.Module) -> int:
    """Run each block's q / k / v kernel layers as one GEMM, and gate / up as another, where
    they are fusable (:func:`_fusable`: same kind, the same activation quantizer, no online
    rotation); returns how many groups were fused. The model computes the same function (the
    activations of a group are quantized once, with the quantizer they share)."""
    from cbq_ptq.models import arch_spec, blocks

    spec = arch_spec(model)
    fused = 0
    for block in blocks(model):
        for names in (spec.qkv, spec.gate_up):
            parts = [block.get_submodule(n) for n in names]
            if not _fusable(parts):
                continue
            try:
                group = _FusedGroup(parts)
            except ValueError:  # weights whose layouts cannot be concatenated
                continue
            for i, name in enumerate(names):
                replace_module(block, name, FusedMember(group, i, parts[i].name))
            fused += 1
    return fused


def _group_of(block: torch.nn.Module, names) -> _FusedGroup | None:
    """The fused group whose members are exactly the layers ``names`` of ``block``, in that
    order (:func:`fuse_projections` made it), or None."""
    members = [block.get_submodule(n) for n in names]
    if not all(isinstance(m, FusedMember) for m in members):
        return None
    group = members[0].group
    if any(m.group is not group for m in members) or len(group.splits) != len(names):
        return None
    if [m.index for m in members] != list(range(len(names))):
        return None
    return group


class FoldedNorm(torch.nn.Module):
    """A block's RMSNorm whose work moved into the activation quantizer of the one fused GEMM
    that reads its output (:func:`fuse_norms`): it passes its input on unchanged."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return x


def _rms_norm_params(norm: torch.nn.Module) -> tuple[Tensor, float] | None:
    """(weight, eps) of a module that computes ``x / sqrt(mean(x^2) + eps) * weight`` over the
    last dimension, checked on a probe (a norm with another formula, such as Gemma's
    ``(1 + weight)`` or a LayerNorm's mean subtraction, gives None)."""
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(weight, Tensor) or weight.dim() != 1 or not isinstance(eps, float):
        return None
    if getattr(norm, "bias", None) is not None or norm._forward_hooks or norm._forward_pre_hooks:
        return None
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, weight.shape[0], generator=g) * 3).to(weight.device, weight.dtype)
    with torch.no_grad():
        got = norm(x).float()
        want = rms_norm_ref(x.float(), weight.float(), eps)  # the formula, in fp32
    if not torch.allclose(got, want, rtol=2e-2, atol=1e-3):  # bf16 norms round once or twice
        return None
    return weight.detach().float().contiguous(), eps


def fuse_norms(model: torch.nn.Module) -> int:
    """Move each block's RMSNorm in front of a fused q / k / v (gate / up) group with
    quantized activations into that group's activation quantizer (``act_quant``'s fused
    RMSNorm: one kernel reads the residual stream, normalises, quantizes), the norm module
    becoming a :class:`FoldedNorm`; returns how many norms moved. Run after
    :func:`fuse_projections`: only a norm whose whole output feeds one fused GEMM moves (in
    the Llama-style blocks of cbq_ptq.models the attention norm feeds q / k / v alone and the
    MLP norm gate / up alone), with plain per-token activations (no CrossQuant factors, no
    online rotation). The quantizer then normalises in fp32 without rounding the normed
    values to the compute dtype first, so codes at a rounding boundary may move by one level
    against the unfused model (as the kernel's own RMSNorm contract says). Why: an eager
    step runs a Hugging Face RMSNorm as ~8 small kernels (cast, square, mean, add, rsqrt,
    multiply, cast, scale), 2 norms per block."""
    from cbq_ptq.models import arch_spec, blocks

    spec = arch_spec(model)
    moved = 0
    for block in blocks(model):
        for norm_name, names in ((spec.attn_norm, spec.qkv), (spec.mlp_norm, spec.gate_up)):
            group = _group_of(block, names)
            if group is None or not group.fused.plain_per_token:
                continue
            fused = group.fused
            norm = block.get_submodule(norm_name)
            params = _rms_norm_params(norm)
            if params is None:
                continue
            fused.fuse_norm(*params)
            replace_module(block, norm_name, FoldedNorm(norm_name))
            moved += 1
    return moved


class KernelRMSNorm(torch.nn.Module):
    """An RMSNorm that no activation quantizer took (a weight-only model's norms, the final
    norm) run by one kernel (:func:`cbq_kernels.rmsnorm.rms_norm`) instead of eager's eight
    (:func:`fuse_rms_norms`); calls the kernel does not take run the eager formula."""

    def __init__(self, name: str, weight: Tensor, eps: float) -> None:
        super().__init__()
        self.name, self.variance_epsilon = name, eps
        # a parameter as the norm's was: the same state dict, and model.to(dtype) casts it
        self.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
        self.policy = None  # GemmPolicy.prologue_pdl decides its launch (set_policy)

    def forward(self, x: Tensor) -> Tensor:
        if rms_norm_takes(x, self.weight, self.variance_epsilon):
            pdl = self.policy is not None and self.policy.prologue_pdl
            return rms_norm(x, self.weight, self.variance_epsilon, pdl)
        return rms_norm_ref(x, self.weight, self.variance_epsilon)


def fuse_rms_norms(model: torch.nn.Module) -> int:
    """Replace every RMSNorm of ``model`` that computes transformers' Llama formula (probed,
    as :func:`fuse_norms` does) and is still a module of its own (not a :class:`FoldedNorm`)
    by a :class:`KernelRMSNorm`; returns how many. Run after :func:`fuse_norms`. Not
    quantization: a bf16 model gains the same (bench_generate applies it to every setting,
    bf16 included). Outputs may move by up to two units in the dtype's last place against
    eager's (the sum of squares in another order; cbq_kernels.rmsnorm says why, tests bound
    it). Why: an eager RMSNorm is eight kernels, two per block, and a weight-only model keeps
    all of them (its norms have no activation quantizer to move into): ~510 launches in a
    7B-shaped decode step."""
    norms = [(name, m) for name, m in model.named_modules()
             if type(m).__name__.endswith("RMSNorm") and not isinstance(m, KernelRMSNorm)
             and not m._forward_hooks and not m._forward_pre_hooks]  # fmt: skip
    count = 0
    for name, norm in norms:
        params = _rms_norm_params(norm)  # probes the norm once
        if params is not None:
            replace_module(model, name, KernelRMSNorm(name, norm.weight, params[1]))
            count += 1
    return count


class SwiGLUMLP(torch.nn.Module):
    """A Llama-style MLP, ``down(silu(gate(x)) * up(x))``, as two kernels' work: the fused gate
    | up GEMM, then the down projection whose activation quantizer computes ``silu(gate) *
    up`` from that output (:func:`fuse_swiglu`)."""

    def __init__(self, group: _FusedGroup, down: KernelLinear) -> None:
        super().__init__()
        self.gate_up, self.down_proj = group.fused, down

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.gate_up(x))


_SWIGLU_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP")  # down(act(gate(x)) * up(x)) in transformers


def _is_silu(act) -> bool:
    """Whether ``act`` computes ``x * sigmoid(x)`` (checked on a probe)."""
    if not callable(act):
        return False
    x = torch.linspace(-6, 6, 49)
    try:
        with torch.no_grad():
            y = act(x)
    except Exception:  # an activation that does not take a CPU fp32 tensor is not ours to judge
        return False
    return isinstance(y, Tensor) and torch.allclose(y, x * torch.sigmoid(x), atol=1e-6)


def fuse_swiglu(model: torch.nn.Module) -> int:
    """Replace each block's MLP by a :class:`SwiGLUMLP` where the SwiGLU can move into the down
    projection's activation quantizer (``act_quant(..., glu=True)``: one kernel reads the gate
    | up output, computes ``silu(gate) * up`` in fp32 and quantizes it); returns how many MLPs
    changed. Run after :func:`fuse_projections`: only an MLP of a known Llama-style class
    (``_SWIGLU_MLPS``) whose gate / up run as one fused group, whose activation is SiLU
    (probed) and whose down projection quantizes its activations per token without CrossQuant
    factors, an online rotation or hooks. As with :func:`fuse_norms`, the product is not
    rounded to the compute dtype before quantizing, so a code at a rounding boundary may move
    by one level against the unfused model. Why: the eager step runs SiLU and the product as
    two elementwise kernels per block (bbe9d36 H200 profile, W4A8 7B decode: silu 57 us and
    the bf16 product among ~230 us of binary kernels per step)."""
    from cbq_ptq.models import arch_spec, blocks

    spec = arch_spec(model)
    changed = 0
    for block in blocks(model):
        mlp_name = spec.gate_up[0].rpartition(".")[0]
        if not mlp_name or spec.down.rpartition(".")[0] != mlp_name:
            continue
        mlp = block.get_submodule(mlp_name)
        if type(mlp).__name__ not in _SWIGLU_MLPS or mlp._forward_hooks or mlp._forward_pre_hooks:
            continue
        group = _group_of(block, spec.gate_up)
        if group is None or len(group.splits) != 2 or group.splits[0] != group.splits[1]:
            continue
        down = block.get_submodule(spec.down)
        if (not isinstance(down, KernelLinear) or not down.plain_per_token
                or down._forward_hooks or down._forward_pre_hooks
                or rotation.of(down) is not None or down.in_features != group.splits[0]):
            continue  # fmt: skip
        if not _is_silu(getattr(mlp, "act_fn", None)):
            continue
        down.fuse_glu()
        replace_module(block, mlp_name, SwiGLUMLP(group, down))
        changed += 1
    return changed


def _attention_modules(model: torch.nn.Module) -> list:
    """Per block, the Python module that defines the block's attention class (where
    transformers' Llama-style attention looks up ``apply_rotary_pos_emb``), or None."""
    import sys

    from cbq_ptq.models import arch_spec, blocks

    attn_name = arch_spec(model).qkv[0].rpartition(".")[0]
    if not attn_name:
        return []
    return [sys.modules.get(type(block.get_submodule(attn_name)).__module__)
            for block in blocks(model)]  # fmt: skip


def fuse_rope(model: torch.nn.Module) -> int:
    """Route the rotary embedding of the model's attention layers through one kernel per layer
    (:func:`cbq_kernels.rope.rope`, equal bit for bit to transformers' eager formula, so no
    number of the model changes); returns how many attention layers now use it. transformers'
    Llama-style attention calls its modeling module's ``apply_rotary_pos_emb``, so that
    function is replaced in the module (once; for calls the kernel does not take, such as
    another ``unsqueeze_dim``, the original runs): **every model of that architecture in the
    process** takes the kernel, which is what a benchmark comparing bf16 with the quantized
    model wants (both get it). Why: the eager RoPE is ~10 elementwise kernels per layer, 0.35-
    0.45 ms of a 7B-shaped decode step (bbe9d36 H200 profile)."""
    from cbq_kernels.rope import rope, rope_takes

    count = 0
    for module in _attention_modules(model):
        original = getattr(module, "apply_rotary_pos_emb", None)
        if not callable(original):
            continue
        if not getattr(original, "_cbq_rope", False):

            def fused(q, k, cos, sin, unsqueeze_dim=1, _original=original):
                if unsqueeze_dim == 1 and rope_takes(q, k, cos, sin):
                    return rope(q, k, cos, sin)
                return _original(q, k, cos, sin, unsqueeze_dim)

            fused._cbq_rope = True
            fused._cbq_original = original
            module.apply_rotary_pos_emb = fused
        count += 1
    return count


def unfuse_rope(model: torch.nn.Module) -> None:
    """Undo :func:`fuse_rope` for the architecture of ``model`` (the modeling module's own
    ``apply_rotary_pos_emb`` again)."""
    for module in set(_attention_modules(model)):
        fn = getattr(module, "apply_rotary_pos_emb", None)
        if getattr(fn, "_cbq_rope", False):
            module.apply_rotary_pos_emb = fn._cbq_original


def activation_kwargs(settings: QuantSettings, act_ratio: Tensor,
                      channel_factor: Tensor | None) -> dict:  # fmt: skip
    """The activation quantizer's arguments of :func:`cbq_kernels.gemm.linear` for a layer:
    its learned clipping ratio and, for CrossQuant, its channel factors."""
    if settings.a_bits >= 16:
        return {}
    kwargs: dict = {"clip_ratio": float(act_ratio)}
    if settings.act_quantizer == "crossquant" and channel_factor is not None:
        kwargs["channel_factor"] = channel_factor.float()
        kwargs["alpha"] = settings.crossquant_alpha
    return kwargs


def _label(layer: KernelLinear) -> str:
    if "channel_factor" in layer.act_kwargs:  # cbq_kernels.gemm.linear: no integer product
        return f"{layer.kind} kernel (CrossQuant: dequantized activations, weight-only GEMM)"
    return f"{layer.kind} kernel"


def kernel_table(model: torch.nn.Module) -> dict[str, str]:
    """{layer: 'W4A8 kernel' or 'fake-quantized: <reason>'} of a model's quantized layers."""
    table = {}
    # a fused group's own KernelLinear is listed through its members, under their names
    inner = {id(g.fused) for g in model.modules() if isinstance(g, _FusedGroup)}
    for name, m in model.named_modules():
        if isinstance(m, KernelLinear) and id(m) not in inner:
            table[name] = _label(m)
        elif isinstance(m, FusedMember):  # one GEMM with its block's siblings
            table[name] = _label(m.group.fused)
        elif isinstance(m, QLinear):
            reason = kind_error(m.settings, m.gs) or "not converted"
            table[name] = f"fake-quantized: {reason}"
    return table


def replace_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` of ``model`` (the old module is dropped; an online
    rotation of its input moves to the new one: cbq_ptq.rotation)."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    rotation.carry(getattr(parent, leaf), module)
    setattr(parent, leaf, module)


def rtn_kernels(model: torch.nn.Module, settings: QuantSettings,
                compute_dtype: torch.dtype = torch.bfloat16) -> int:  # fmt: skip
    """Replace every nn.Linear of the decoder blocks (not the LM head) by a round-to-nearest
    :class:`KernelLinear`, one at a time (the full-precision weight is freed as it goes);
    returns how many were replaced."""
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}"]  # fmt: skip
    for name in names:
        replace_module(model, name, KernelLinear.round_to_nearest(
            name, model.get_submodule(name), settings, compute_dtype))  # fmt: skip
    return len(names)


def use_kernels(model, compute_dtype: torch.dtype = torch.bfloat16) -> dict[str, str]:
    """Replace the hardened QLinears the kernels take by :class:`KernelLinear` (in place);
    returns {layer: 'W4A8 kernel' or 'fake-quantized: <reason>'}."""
    table: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, QLinear):
            continue
        try:
            k = KernelLinear.from_qlinear(module, compute_dtype)
        except ValueError as exc:
            table[name] = f"fake-quantized: {exc}"
            continue
        replace_module(model, name, k)
        table[name] = _label(k)
    return table
