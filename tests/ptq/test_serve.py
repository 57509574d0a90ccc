"""The saved model run by the inference kernels (cbq_ptq.serve): same logits as the
fake-quantized model (CPU: Triton interpreter, fp32 compute)."""

import copy

import pytest
import torch

from cbq_ptq.config import CBQConfig, parse_setting
from cbq_ptq.data import calibration_windows
from cbq_ptq.models import SHARED_MODELS, load_model
from cbq_ptq.pipeline import quantize
from cbq_ptq.serve import kernel_table, use_kernels
from tests.conftest import need_shared, random_llama


@pytest.fixture(scope="module")
def stories():
    need_shared(SHARED_MODELS / "stories260K" / "config.json")
    return load_model("stories260K")


def ids(n=2, t=32):
    tokens = torch.randint(3, 512, (4096,), generator=torch.Generator().manual_seed(0))
    return calibration_windows(tokens, n, t, seed=1)


@pytest.mark.parametrize(
    ("setting", "atol"),
    [("W4A16", 1e-3), ("W3A16g32", 1e-3), ("W4A4", 1e-3),
     ("W4A8", 0.25)],  # int8 codes may differ by one level at rounding boundaries
)  # fmt: skip
@pytest.mark.slow
def test_kernels_reproduce_the_fake_quantized_logits(stories, setting, atol, tmp_path):
    from cbq_ptq.io import load, save

    model, tok = stories
    x = ids()
    config = CBQConfig(settings=parse_setting(setting, ragged_groups=True), epochs=0,
                       lora_rounding=False)  # fmt: skip
    q, _ = quantize(copy.deepcopy(model), config, x, progress=False)
    save(q, tmp_path / "q", tok)
    served = load(tmp_path / "q")
    with torch.no_grad():
        want = served(x).logits
    table = use_kernels(served, torch.float32)
    assert len(table) == 35 and all(v.endswith("kernel") for v in table.values()), table
    with torch.no_grad():
        got = served(x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95
    direct = load(tmp_path / "q", kernels=torch.float32)  # straight from the packed words
    assert kernel_table(direct) == table
    with torch.no_grad():
        assert torch.equal(direct(x).logits, got)


@pytest.mark.parametrize(("setting", "atol"), [("W4A8", 0.25), ("W4A4", 1e-3)])  # as above
def test_crossquant_layers_reproduce_the_fake_quantized_logits(stories, setting, atol,
                                                               tmp_path):  # fmt: skip
    """CrossQuant quantizes x / f per token (f = c^(1 - alpha) per input channel): the integer
    product of those codes with the weight's codes misses f (2d9c58b: the GPTQ W4A8
    CrossQuant SmolLM2 model read perplexity 4.8e9 through the H200 kernels against ~24
    fake-quantized). The kernel layer now dequantizes them (q s f) into the weight-only GEMM:
    the fake-quantized model's logits, on the served path that the GPU runs too (a code may
    still flip where a layer's fp32 sums differ, as with per-token activations above)."""
    from cbq_ptq.io import load, save

    model, tok = stories
    x = ids()
    settings = parse_setting(setting, act_quantizer="crossquant", crossquant_alpha=0.15,
                             ragged_groups=True)  # fmt: skip
    config = CBQConfig(settings=settings, epochs=0, lora_rounding=False)
    q, _ = quantize(copy.deepcopy(model), config, x, progress=False)
    save(q, tmp_path / "q", tok)
    served = load(tmp_path / "q")
    assert any(getattr(m, "channel_factor", None) is not None for m in served.modules())
    with torch.no_grad():
        want = served(x).logits
    table = use_kernels(served, torch.float32)
    assert all("CrossQuant" in v for v in table.values()), table
    with torch.no_grad():
        got = served(x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95


def test_layers_the_kernels_do_not_take_stay_fake_quantized(stories):
    model, _ = stories
    config = CBQConfig(settings=parse_setting("W6A6"), epochs=0, lora_rounding=False, cfp=False)
    q, _ = quantize(copy.deepcopy(model), config, ids(), progress=False)
    table = use_kernels(q, torch.float32)
    assert all("6-bit weights" in v for v in table.values())


def test_round_to_nearest_kernels_equal_the_pipelines_rtn(stories):
    from cbq_ptq.serve import KernelLinear, rtn_kernels

    model, _ = stories
    settings = parse_setting("W4A16", ragged_groups=True)
    config = CBQConfig(settings=settings, epochs=0, lora_rounding=False, cfp=False)
    x = ids()
    q, _ = quantize(copy.deepcopy(model), config, x, progress=False)
    with torch.no_grad():
        want = q(x).logits
    fast = copy.deepcopy(model)
    assert rtn_kernels(fast, settings, torch.float32) == 35
    assert sum(isinstance(m, KernelLinear) for m in fast.modules()) == 35
    assert not any(isinstance(m, torch.nn.Linear) and ".layers." in n
                   for n, m in fast.named_modules())  # fmt: skip
    with torch.no_grad():
        got = fast(x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)


@pytest.mark.parametrize("setting", ["W4A16g128", "W4A8"])
def test_packed_weights_are_static_inputs_for_cuda_graphs(setting):
    # a PreparedWeight is a plain attribute, not a buffer: unmarked, torch.compile's CUDA
    # graphs copy every packed weight into graph memory on each replay (cbq_kernels.gemm.
    # mark_static); the decode layout's tensors (where the extension builds it) are marked too
    from dataclasses import fields

    from cbq_ptq.serve import KernelLinear

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(256, 96, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 256, generator=g))
    layer = KernelLinear.round_to_nearest("l", lin, parse_setting(setting), torch.float32)
    w = layer.weight
    tensors = [getattr(w, f.name) for f in fields(w)
               if isinstance(getattr(w, f.name), torch.Tensor)]  # fmt: skip
    if w.decode is not None:
        tensors += [getattr(w.decode, f.name) for f in fields(w.decode)
                    if isinstance(getattr(w.decode, f.name), torch.Tensor)]  # fmt: skip
    assert len(tensors) >= 3 and layer.bias is not None
    for t in [*tensors, layer.bias]:
        assert getattr(t, "_dynamo_static_input_type", None) == "unguarded"
    unmarked = torch.zeros(3)
    assert getattr(unmarked, "_dynamo_static_input_type", None) is None


@pytest.mark.parametrize("setting", ["W4A16g32", "W4A8", "W4A4"])
def test_fused_projections_compute_the_same_model(setting):
    """fuse_projections: each block's q / k / v and gate / up kernels run as one GEMM (the
    shared input quantized once); logits equal the unfused model's (the same integer codes,
    fp32 sums over the same K), one group registered once, and layers whose activation
    quantizers differ are left alone."""
    from cbq_ptq.serve import FusedMember, KernelLinear, fuse_projections, rtn_kernels

    model = random_llama()
    rtn_kernels(model, parse_setting(setting), torch.float32)
    fused = copy.deepcopy(model)
    a_bits = parse_setting(setting).a_bits
    if a_bits < 16:  # block 1's k_proj clips its activations differently: not fused
        fused.model.layers[1].self_attn.k_proj.act_kwargs["clip_ratio"] = 0.9
        model.model.layers[1].self_attn.k_proj.act_kwargs["clip_ratio"] = 0.9
    assert fuse_projections(fused) == (4 if a_bits == 16 else 3)
    attn = fused.model.layers[0].self_attn
    assert all(isinstance(getattr(attn, n), FusedMember) for n in ("q_proj", "k_proj", "v_proj"))
    assert attn.k_proj.group is attn.q_proj.group
    assert attn.q_proj.group.fused.weight.n == 64 + 32 + 32
    kernels = [n for n, m in fused.named_modules() if isinstance(m, KernelLinear)]
    assert len(kernels) == (2 * 4 if a_bits == 16 else 2 * 4 + 2)  # q/k/v, o, gate/up, down
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(ids).logits, fused(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _GemmaStyleNorm(torch.nn.Module):  # (1 + weight): not the formula act_quant fuses
    def __init__(self, weight, eps):
        super().__init__()
        self.weight, self.variance_epsilon = torch.nn.Parameter(weight), eps

    def forward(self, x):
        xf = x.float()
        rms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return xf * rms * (1.0 + self.weight)


@pytest.mark.parametrize("setting", ["W4A8", "W4A4", "W4A16"])
def test_fused_norms_compute_the_same_model(setting):
    """fuse_norms: after fuse_projections, each block's attention / MLP RMSNorm moves into
    the activation quantizer of the fused q / k / v (gate / up) GEMM and the norm module
    passes its input on; the logits are the unfused model's up to codes that move by one
    level at a rounding boundary (the fused RMSNorm's sums run in another order); weight-only
    groups (no quantizer), groups whose quantizer differs, and norms of another formula stay."""
    from cbq_ptq.serve import FoldedNorm, fuse_norms, fuse_projections, rtn_kernels

    model = random_llama()
    g = torch.Generator().manual_seed(3)
    for layer in model.model.layers:  # norms that are not the identity (init: ones)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.data = torch.rand(norm.weight.shape, generator=g) + 0.5
    rtn_kernels(model, parse_setting(setting), torch.float32)
    fuse_projections(model)
    ref = copy.deepcopy(model)
    a_bits = parse_setting(setting).a_bits
    layer1 = model.model.layers[1]
    # block 1: the MLP norm has Gemma's formula (stays); its attention group keeps its norm
    # when its quantizer carries CrossQuant factors
    layer1.post_attention_layernorm = _GemmaStyleNorm(torch.zeros(64), 1e-6)
    ref.model.layers[1].post_attention_layernorm = _GemmaStyleNorm(torch.zeros(64), 1e-6)
    assert fuse_norms(copy.deepcopy(model)) == (0 if a_bits == 16 else 3)
    if a_bits < 16:
        for m in (model, ref):
            fused1 = m.model.layers[1].self_attn.q_proj.group.fused
            fused1.act_kwargs.update(channel_factor=torch.ones(64), alpha=1.0)
    moved = fuse_norms(model)
    assert moved == (0 if a_bits == 16 else 2)
    if a_bits == 16:
        return
    layer0 = model.model.layers[0]
    assert isinstance(layer0.input_layernorm, FoldedNorm)
    assert isinstance(layer0.post_attention_layernorm, FoldedNorm)
    assert not isinstance(layer1.input_layernorm, FoldedNorm)
    assert not isinstance(layer1.post_attention_layernorm, FoldedNorm)
    kwargs = layer0.self_attn.q_proj.group.fused.act_kwargs
    norm0 = ref.model.layers[0].input_layernorm
    assert torch.equal(kwargs["norm_weight"], norm0.weight.float())
    assert kwargs["norm_eps"] == norm0.variance_epsilon
    dropped = copy.deepcopy(ref)  # block 0's norms gone, its quantizers not taking them
    for name in ("input_layernorm", "post_attention_layernorm"):
        setattr(dropped.model.layers[0], name, FoldedNorm(name))
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want, got, wrong = ref(ids).logits, model(ids).logits, dropped(ids).logits
    # measured: 1.5e-7 (W4A8) / 1.2e-7 (W4A4) here, no code moved, against 0.56 / 0.57 for
    # the dropped norms (logits span ~+-0.86); a code that moves by one level stays far below
    # 1e-2
    torch.testing.assert_close(got, want, rtol=0, atol=1e-2)
    assert float((wrong - want).abs().max()) > 0.1
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("setting", ["W4A8", "W4A4", "W4A16"])
def test_fused_swiglu_computes_the_same_model(setting):
    """fuse_swiglu: after fuse_projections, each MLP becomes the fused gate | up GEMM and a
    down projection whose activation quantizer computes silu(gate) * up; the logits are the
    unfused model's up to codes that move by one level at a rounding boundary (the product is
    not rounded first); an MLP whose down projection has CrossQuant factors, or whose gate /
    up are not fused, or whose activation is not SiLU, stays; weight-only models have no
    quantizer to take it."""
    from cbq_ptq.serve import SwiGLUMLP, fuse_projections, fuse_swiglu, rtn_kernels

    model = random_llama()
    rtn_kernels(model, parse_setting(setting), torch.float32)
    fuse_projections(model)
    ref = copy.deepcopy(model)
    if parse_setting(setting).a_bits == 16:
        assert fuse_swiglu(model) == 0
        return
    probe = copy.deepcopy(model)  # block 1: a GELU MLP stays
    probe.model.layers[1].mlp.act_fn = torch.nn.GELU()
    assert fuse_swiglu(probe) == 1 and not isinstance(probe.model.layers[1].mlp, SwiGLUMLP)
    probe = copy.deepcopy(model)  # block 1: CrossQuant factors on down_proj: stays
    probe.model.layers[1].mlp.down_proj.act_kwargs.update(channel_factor=torch.ones(128),
                                                          alpha=1.0)  # fmt: skip
    assert fuse_swiglu(probe) == 1
    assert fuse_swiglu(model) == 2
    mlp0 = model.model.layers[0].mlp
    assert isinstance(mlp0, SwiGLUMLP) and mlp0.down_proj.act_kwargs.get("glu") is True
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids).logits
    # measured: 6.0e-8 (W4A8) / 5.2e-8 (W4A4), no code moved; the MLPs of this random model
    # move the logits little (halves swapped below: 0.024 / 0.080), so the bound is 1e-3
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    # the test can fail: quantizing silu(up) * gate (halves swapped) moves the logits
    swapped = copy.deepcopy(model)
    for layer in swapped.model.layers:
        fused = layer.mlp.gate_up
        n = fused.weight.n // 2
        perm = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
        fused.forward = (lambda f, p: lambda x: type(f).forward(f, x)[..., p])(fused, perm)
    with torch.no_grad():
        wrong = swapped(ids).logits
    assert float((wrong - want).abs().max()) > 1e-2


def test_a_policy_reaches_every_kernel_layer_and_the_fused_ones():
    """serve.set_policy: every KernelLinear runs its GEMM under the given GemmPolicy (what
    bench_generate's CBQ_GEN_POLICY measures end to end), fused groups made afterwards keep
    it, the logits are the default dispatch's on the CPU, and a non-policy is a clear error."""
    from cbq_kernels.gemm import GemmPolicy
    from cbq_ptq.serve import KernelLinear, fuse_projections, rtn_kernels, set_policy

    model = random_llama()
    rtn_kernels(model, parse_setting("W4A8"), torch.float32)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).logits
    policy = GemmPolicy(decode_pdl=True, decode_mtiles=2)
    assert set_policy(model, policy) == 2 * 7
    fuse_projections(model)
    kernels = [m for m in model.modules() if isinstance(m, KernelLinear)]
    assert kernels and all(m.policy is policy for m in kernels)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="policy must be a GemmPolicy or None, got dict"):
        set_policy(model, {"decode_pdl": True})
    # the RMSNorm kernels take its prologue_pdl (a plain launch off a Hopper GPU: same logits)
    from cbq_ptq.serve import KernelRMSNorm, fuse_rms_norms

    fuse_rms_norms(model)
    pdl = GemmPolicy(prologue_pdl=True)
    set_policy(model, pdl)
    norms = [m for m in model.modules() if isinstance(m, KernelRMSNorm)]
    assert len(norms) == 2 * 2 + 1 and all(m.policy is pdl for m in norms)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shared", [False, True])
def test_shared_activation_ratios_make_a_cbq_model_fusable(stories, shared):
    """act_clip_shared: q / k / v (and gate / up) learn one activation clipping ratio, trained
    once per step, so the served model fuses every group; learned apart they differ and stay
    unfused (the ratios move from 1.0 at a larger act_clip slope: start 0.8)."""
    from cbq_ptq.qlinear import QLinear
    from cbq_ptq.serve import fuse_projections

    model, _ = stories
    config = CBQConfig(settings=parse_setting("W4A8"), steps=6, lora_rounding=False,
                       act_clip=0.8, act_clip_shared=shared, holdout=0.0, lr=0.05)  # fmt: skip
    q, _ = quantize(copy.deepcopy(model), config, ids(4), progress=False)
    ratios = {n: float(m.act_ratio) for n, m in q.named_modules() if isinstance(m, QLinear)}
    qkv = [ratios[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv"]
    gate_up = [ratios[f"model.layers.0.mlp.{p}_proj"] for p in ("gate", "up")]
    assert (len(set(qkv)) == 1 and len(set(gate_up)) == 1) == shared, (qkv, gate_up)
    assert all(r != 0.8 for r in qkv + gate_up)  # learned
    use_kernels(q, torch.float32)
    assert fuse_projections(q) == (2 * len(q.model.layers) if shared else 0)


def test_rms_norm_kernels_replace_the_norms_no_quantizer_took():
    """fuse_rms_norms: every RMSNorm of a bf16 model (2 per block + the final one) runs in
    cbq_kernels.rmsnorm (Triton's interpreter here) with the same parameters (state dict keys
    and values unchanged); the logits agree with eager's to bf16 rounding; a second call finds
    nothing left; norms folded into a quantizer (FoldedNorm) stay folded."""
    from cbq_ptq.serve import (
        KernelRMSNorm,
        fuse_norms,
        fuse_projections,
        fuse_rms_norms,
        rtn_kernels,
    )

    model = random_llama(dtype=torch.bfloat16)
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(7))
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(ids).logits.float()
    assert fuse_rms_norms(model) == 2 * 2 + 1
    assert fuse_rms_norms(model) == 0
    assert isinstance(model.model.norm, KernelRMSNorm)
    state = model.state_dict()
    assert state.keys() == keys.keys() and all(torch.equal(state[k], v) for k, v in keys.items())
    with torch.no_grad():
        got = model(ids).logits.float()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9

    q = random_llama()
    rtn_kernels(q, parse_setting("W4A8"), torch.float32)
    fuse_projections(q)
    assert fuse_norms(q) == 2 * len(q.model.layers)
    assert fuse_rms_norms(q) == 1  # only the final norm is left


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rope_changes_no_number(dtype):
    """fuse_rope: the attention layers' RoPE runs in cbq_kernels.rope (Triton's interpreter
    here), and the logits are the eager model's bit for bit (the kernel rounds as the eager
    formula does); unfuse_rope restores the modeling module's function; the patched function
    sends what the kernel does not take to the original."""
    from transformers.models.llama import modeling_llama

    from cbq_kernels import rope as rope_mod
    from cbq_ptq.serve import fuse_rope, unfuse_rope

    model = random_llama(dtype=dtype)
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(6))
    original = modeling_llama.apply_rotary_pos_emb
    with torch.no_grad():
        want = model(ids).logits
    calls = []
    op = rope_mod._rope_op
    try:
        assert fuse_rope(model) == 2
        assert fuse_rope(model) == 2  # idempotent: the original is kept once
        assert modeling_llama.apply_rotary_pos_emb._cbq_original is original
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(rope_mod, "_rope_op", lambda *a: calls.append(1) or op(*a))
            with torch.no_grad():
                got = model(ids).logits
        assert len(calls) == 2  # one launch per attention layer
        assert torch.equal(got, want)
        q = torch.zeros(1, 3, 2, 8)  # (batch, seq, heads, head_dim): unsqueeze_dim = 2
        out = modeling_llama.apply_rotary_pos_emb(q, q, torch.ones(1, 3, 8), torch.zeros(1, 3, 8),
                                                  unsqueeze_dim=2)  # fmt: skip
        assert out[0].shape == (1, 3, 2, 8)  # the original ran, not the kernel's check
    finally:
        unfuse_rope(model)
    assert modeling_llama.apply_rotary_pos_emb is original


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_two_level_model_saves_loads_and_serves(tmp_path, monkeypatch, method):
    """settings.two_level (round-to-nearest, or GPTQ on the two-level grid): every layer
    hardened to the two-level format
    (scales s1 times integer steps 1..16, s1 in the artefact as NAME.channel_scales), loaded
    straight into kernel layers that keep the format (prepare_weight's channel_scales: the
    per-channel int8 product at prefill, 64 rows here), whose logits are the fake-quantized
    model's (int8 activation codes may flip at rounding boundaries, as for W4A8 above); a
    trained configuration is refused."""
    from safetensors.torch import load_file

    from cbq_ptq.config import QuantSettings
    from cbq_ptq.io import load, save
    from cbq_ptq.serve import KernelLinear

    settings = QuantSettings(w_bits=4, a_bits=8, group_size=64, two_level=True)
    assert settings.name == "W4A8g64-2l"
    with pytest.raises(ValueError, match="round-to-nearest"):
        CBQConfig(settings=settings, epochs=1)
    model = random_llama(hidden=128, inter=256)
    x = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(3))
    w_down = model.get_submodule("model.layers.0.mlp.down_proj").weight.detach().clone()
    if method == "gptq":
        config = CBQConfig(settings=settings, method="gptq", cfp=False, window=1, overlap=0)
    else:
        config = CBQConfig(settings=settings, epochs=0, lora_rounding=False, cfp=False)
    q, _ = quantize(model, config, x, progress=False)
    if method == "gptq":  # GPTQ's codes, not round-to-nearest's
        from cbq_kernels.quant_math import quantize_weight_two_level

        layer = q.get_submodule("model.layers.0.mlp.down_proj")
        assert not torch.equal(layer.codes, quantize_weight_two_level(w_down, 64)[0])
    save(q, tmp_path / "q")
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"
    s1, scales = tensors[f"{name}.channel_scales"], tensors[f"{name}.scales"]
    assert s1.shape == (128,) and scales.shape == (128, 4)
    steps = scales / s1[:, None]
    assert torch.allclose(steps, steps.round(), rtol=0, atol=1e-4)
    assert float(steps.min()) >= 1 and float(steps.max()) <= 16
    served = load(tmp_path / "q")
    with torch.no_grad():
        want = served(x).logits
    direct = load(tmp_path / "q", kernels=torch.float32)
    layers = [m for m in direct.modules() if isinstance(m, KernelLinear)]
    assert len(layers) == 14 and all(m.weight.steps is not None for m in layers)
    if method == "gptq":  # prepare_weight accepted GPTQ's codes as two-level (s2 (q - z) in
        return  # int8, checked on the codes); the forward below is the format's, as for rtn
    from cbq_kernels import gemm_triton

    expanded, expand = [], gemm_triton.expand_weight
    monkeypatch.setattr(gemm_triton, "expand_weight",
                        lambda w, *a, **kw: expanded.append(kw.get("steps")) or expand(w, *a, **kw))
    with torch.no_grad():
        got = direct(x).logits
    assert expanded == [True] * 14  # each layer's int8 s2 (q - z), M = 64
    torch.testing.assert_close(got, want, rtol=0, atol=0.25)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95
