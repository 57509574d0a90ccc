"""Orthogonal rotations of a Llama-like model (issue 15), an identity of the full-precision
model that spreads activation outliers over all channels before quantization (QuaRot's
construction; written here from the algebra below).

Offline, folded into the weights (:func:`rotate_model`):

* RMSNorm scales first: a norm's weight w multiplies the columns of the linears it feeds
  (q/k/v, gate/up, the LM head) and becomes 1, so the norm is x / rms(x), which commutes with
  any orthogonal R (rms(x R) = rms(x));
* R1 on the residual stream (hidden size): embedding E -> E R1; every linear that reads the
  stream (q, k, v, gate, up, LM head) W -> W R1 (y = x W^T = (x R1)(W R1)^T); every linear
  that writes it (o, down) W -> R1^T W, bias b -> b R1. Tied embeddings are untied (the LM
  head carries the final norm's scale, the embedding does not);
* R2 per attention head between v_proj and o_proj (head_dim): v rows of each kv head
  W_v[h] -> R2^T W_v[h], o columns of each query head W_o[:, h] -> W_o[:, h] R2: attention
  mixes value vectors over positions only, so the rotation passes through it (GQA: the same
  R2 for every head).

Online (a forward pre-hook, :class:`OnlineRotation`): R4 on the down_proj input (intermediate
size): x -> x R4 before the layer and W_down -> W_down R4, since act(gate) * up cannot carry a
rotation folded into gate / up. The hook is what the layer's activation quantizer and every
statistics hook registered later see (CFP maxima, GPTQ Hessians, the kernel proportion), and
it follows the layer through QLinear, KernelLinear, saving and loading
(:func:`attach`, :func:`reattach`); a KernelLinear takes a Hadamard rotation into its GEMM
call instead (one kernel with the activation quantizer: cbq_kernels.hadamard_quant).

Every R is a randomised Hadamard matrix diag(signs) H / sqrt(n) (cbq_kernels.hadamard) with
signs from ``seed`` (R1), ``seed + 1`` (R2), ``seed + 2`` (R4), or with ``kind='random'`` a
random orthogonal matrix (QR of a Gaussian; any width, R4 then a dense product).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from cbq_kernels import hadamard
from cbq_ptq.models import arch_spec, blocks

KINDS = ("hadamard", "random")


@dataclasses.dataclass(frozen=True)
class RotationInfo:
    """What was applied (stored in a saved model's quant_config.json)."""

    kind: str
    seed: int
    online_down: bool = True  # R4 on every down_proj input
    # cbq_kernels.hadamard.CONSTRUCTION when it was applied (1: Paley only, what a saved model
    # without the field used; 2: also Williamson's 172, which changed 11008 = 344 x 32 into
    # 172 x 64): the online R4 is rebuilt at load and must be the matrix the weights expect
    construction: int = hadamard.CONSTRUCTION

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> RotationInfo:
        if not isinstance(d, dict) or d.get("kind") not in KINDS:
            raise ValueError(f"rotation must be an object with kind in {KINDS}, got {d!r:.80}")
        return cls(kind=d["kind"], seed=int(d["seed"]), online_down=bool(d.get("online_down", 1)),
                   construction=int(d.get("construction", 1)))  # fmt: skip


def rotation_matrix(kind: str, n: int, seed: int, dtype=torch.float64) -> Tensor:
    """The n x n orthogonal matrix of a rotation kind and seed."""
    if kind == "hadamard":
        return hadamard.matrix(n, hadamard.random_signs(n, seed), dtype)
    if kind == "random":
        g = torch.Generator().manual_seed(seed)
        q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        return (q * torch.sign(torch.diagonal(r))[None, :]).to(dtype)
    raise ValueError(f"rotation kind must be one of {KINDS}, got {kind!r}")


class OnlineRotation(torch.nn.Module):
    """x -> x R over the last dimension, applied to a layer's input by a forward pre-hook.
    Holds no tensors (nothing in state_dicts): R is rebuilt from (kind, n, seed) and cached
    per device and dtype; the Hadamard kind never forms R (fast transform)."""

    def __init__(self, kind: str, n: int, seed: int) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"rotation kind must be one of {KINDS}, got {kind!r}")
        if kind == "hadamard":
            hadamard.factor(n)  # a clear error now for an unsupported width
        self.kind, self.n, self.seed = kind, n, seed
        self._cache: dict = {}

    def extra_repr(self) -> str:
        return f"kind={self.kind}, n={self.n}, seed={self.seed}"

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.n:
            raise ValueError(f"online rotation of width {self.n} got an input of width "
                             f"{x.shape[-1]}")  # fmt: skip
        key = (x.device, x.dtype)
        if self.kind == "hadamard":
            if key not in self._cache:
                self._cache[key] = hadamard.random_signs(self.n, self.seed).to(x.device)
            return hadamard.apply(x, self._cache[key])
        if key not in self._cache:
            self._cache[key] = rotation_matrix("random", self.n, self.seed, torch.float32).to(
                x.device
            )
        return (x.float() @ self._cache[key]).to(x.dtype)


def _rotate_input(module: torch.nn.Module, args: tuple):
    """The pre-hook (a module-level function: modules holding it stay picklable)."""
    return (module.input_rotation(args[0]), *args[1:])


def attach(module: torch.nn.Module, rot: OnlineRotation) -> None:
    """Rotate ``module``'s input online with ``rot`` (a forward pre-hook registered now, before
    any statistics hook, so those see the rotated input). Idempotent."""
    if of(module) is not None:
        return
    module.input_rotation = rot
    if rot.kind == "hadamard" and hasattr(module, "fuse_rotation"):  # KernelLinear
        module.fuse_rotation(hadamard.random_signs(rot.n, rot.seed))
        return
    module._cbq_rotation_hook = module.register_forward_pre_hook(_rotate_input)


def of(module: torch.nn.Module) -> OnlineRotation | None:
    """The online rotation of a module's input, if any."""
    rot = getattr(module, "input_rotation", None)
    return rot if isinstance(rot, OnlineRotation) else None


def carry(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Give ``dst`` (a replacement of ``src``: QLinear, KernelLinear) the same online
    rotation."""
    rot = of(src)
    if rot is not None:
        attach(dst, OnlineRotation(rot.kind, rot.n, rot.seed))


@torch.no_grad()
def _mul_cols(linear: torch.nn.Module, r: Tensor) -> None:  # W -> W R
    w = linear.weight
    w.copy_((w.double() @ r).to(w.dtype))


@torch.no_grad()
def _fold_norm(norm: torch.nn.Module, linears: list[torch.nn.Module]) -> None:
    g = norm.weight.detach().double()
    for lin in linears:
        lin.weight.copy_((lin.weight.double() * g[None, :]).to(lin.weight.dtype))
    norm.weight.fill_(1.0)
    if getattr(norm, "bias", None) is not None:
        raise ValueError("rotations need RMSNorm without bias (the bias does not rotate)")


def is_rotated(model) -> bool:
    return getattr(model, "_cbq_rotation", None) is not None


@torch.no_grad()
def rotate_model(model, kind: str = "hadamard", seed: int = 0,
                 online_down: bool = True) -> RotationInfo:  # fmt: skip
    """Rotate a full-precision Llama-like model in place (module docstring); returns what was
    applied (also kept as ``model._cbq_rotation``). The model computes the same function in
    exact arithmetic."""
    if is_rotated(model):
        raise ValueError("the model is already rotated")
    if kind not in KINDS:
        raise ValueError(f"rotation kind must be one of {KINDS}, got {kind!r}")
    spec = arch_spec(model)
    cfg = model.config
    hidden = cfg.hidden_size
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // n_heads
    layers = blocks(model)
    inter = layers[0].get_submodule(spec.down).weight.shape[1]
    if kind == "hadamard":  # every width checked before anything changes
        for n in (hidden, head_dim, *((inter,) if online_down else ())):
            hadamard.factor(n)
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError("rotations need a model with an LM head (get_output_embeddings)")
    if head.weight is embed.weight or getattr(cfg, "tie_word_embeddings", False):
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        cfg.tie_word_embeddings = False  # the saved model keeps both matrices
    final_norm = model.model.norm
    _fold_norm(final_norm, [head])
    for block in layers:
        _fold_norm(block.get_submodule(spec.attn_norm), [block.get_submodule(n) for n in spec.qkv])
        _fold_norm(block.get_submodule(spec.mlp_norm),
                   [block.get_submodule(n) for n in spec.gate_up])  # fmt: skip
    dev = embed.weight.device  # the matrices are built on the CPU (seeded), used where the model is
    r1 = rotation_matrix(kind, hidden, seed).to(dev)
    r2 = rotation_matrix(kind, head_dim, seed + 1).to(dev)
    embed.weight.copy_((embed.weight.double() @ r1).to(embed.weight.dtype))
    _mul_cols(head, r1)
    for block in layers:
        for name in (*spec.qkv, *spec.gate_up):
            _mul_cols(block.get_submodule(name), r1)
        for name in (spec.o, spec.down):  # writers: W -> R1^T W, b -> b R1
            lin = block.get_submodule(name)
            lin.weight.copy_((r1.t() @ lin.weight.double()).to(lin.weight.dtype))
            if lin.bias is not None:
                lin.bias.copy_((lin.bias.double() @ r1).to(lin.bias.dtype))
        v, o = block.get_submodule(spec.v), block.get_submodule(spec.o)
        wv = v.weight.double().view(n_kv, head_dim, -1)  # rows of each kv head
        v.weight.copy_(torch.einsum("dk,hdi->hki", r2, wv).reshape(v.weight.shape)
                       .to(v.weight.dtype))  # R2^T W_v[h]  # fmt: skip
        if v.bias is not None:
            v.bias.copy_((v.bias.double().view(n_kv, head_dim) @ r2).reshape(-1)
                         .to(v.bias.dtype))  # fmt: skip
        wo = o.weight.double().view(o.weight.shape[0], n_heads, head_dim)
        o.weight.copy_((wo @ r2).reshape(o.weight.shape).to(o.weight.dtype))
        if online_down:
            down = block.get_submodule(spec.down)
            rot = OnlineRotation(kind, inter, seed + 2)
            _mul_cols(down, rotation_matrix(kind, inter, seed + 2).to(dev))
            attach(down, rot)
    info = RotationInfo(kind, seed, online_down)
    model._cbq_rotation = info
    return info


def _factors_text(n: int, construction: int = hadamard.CONSTRUCTION) -> str:
    """'H_m x H_p' of a width under a construction ('no Hadamard matrix' where it has none)."""
    try:
        m, p = hadamard.factor(n, construction)
    except ValueError:
        return "no Hadamard matrix"
    return f"H_{m} x H_{p}"


def reattach(model, info: RotationInfo) -> None:
    """After loading a rotated model: the online rotations its weights expect (the folded
    ones are in the weights already)."""
    model._cbq_rotation = info
    if not info.online_down:
        return
    spec = arch_spec(model)
    n = model.config.intermediate_size
    if info.kind == "hadamard" and info.construction != hadamard.CONSTRUCTION:
        was, now = _factors_text(n, info.construction), _factors_text(n)
        if was != now:
            raise ValueError(
                f"this model's online rotation of width {n} was built as {was} (Hadamard "
                f"construction {info.construction}); this cbq builds {now} (construction "
                f"{hadamard.CONSTRUCTION}): quantize the model again"
            )
    for block in blocks(model):
        attach(block.get_submodule(spec.down), OnlineRotation(info.kind, n, info.seed + 2))
