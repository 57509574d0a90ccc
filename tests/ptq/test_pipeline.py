"""QLinear, the window loss and the reconstruction pipeline (CPU, stories260K)."""

import copy
import math

import pytest
import torch

from cbq_kernels.fake_quant import fake_quant_ref
from cbq_ptq.config import CBQConfig, parse_setting
from cbq_ptq.data import calibration_windows
from cbq_ptq.models import SHARED_MODELS, blocks, load_model
from cbq_ptq.pipeline import quantize
from cbq_ptq.qlinear import QLinear, quantized
from cbq_ptq.reconstruct import distance
from cbq_ptq.streams import capture_inputs
from tests.conftest import need_shared


def linear(n=24, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.1)
    return lin


@pytest.mark.parametrize("setting", ["W4A16", "W3A16g32", "W2A16g32"])
def test_lora_rounding_starts_at_round_to_nearest(setting):
    """The hardened codes at initialisation are RTN's codes (with the initial clipping)."""
    s = parse_setting(setting)
    lin = linear()
    q = QLinear(lin, s, lora=True, learn_clipping=True)
    scales, zeros = q.quant_params()
    gs = q.gs or q.in_features
    gid = torch.arange(q.in_features) // gs
    rtn = torch.round(q.w / scales[:, gid] + zeros[:, gid]).clamp(0, (1 << s.w_bits) - 1)
    q.harden()
    assert torch.equal(q.codes.float(), rtn)


def test_rtn_qlinear_matches_fake_quant_and_hardening_is_consistent():
    s = parse_setting("W4A8g32")
    lin = linear(seed=1)
    q = QLinear(lin, s, lora=False, learn_clipping=False, train=False)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    w_hat = fake_quant_ref(lin.weight.detach(), 4, 32)
    x_hat = fake_quant_ref(x, 8, None, torch.ones(1), None, True)
    want = torch.nn.functional.linear(x_hat, w_hat, lin.bias)
    torch.testing.assert_close(q(x), want)
    before = q(x)
    q.harden()
    torch.testing.assert_close(q(x), before, rtol=1e-5, atol=1e-6)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 15


def test_learned_parameters_receive_gradients():
    q = QLinear(linear(seed=3), parse_setting("W4A8"), lora=True, learn_clipping=True)
    with quantized([q], rounding="soft"):
        q(torch.randn(4, 64)).pow(2).sum().backward()
    for kind, params in q.learned().items():
        for p in params:
            assert p.grad is not None and torch.isfinite(p.grad).all(), kind
    assert any(float(p.grad.abs().max()) > 0 for p in q.learned()["lora"])


@pytest.mark.parametrize("loss", ["mse", "rel"])
def test_distance_is_zero_on_equal_inputs_and_positive_otherwise(loss):
    a = torch.randn(2, 3, 8)
    assert float(distance(a, a, loss, 1.0)) == pytest.approx(0.0, abs=1e-7)
    b = a + 0.1 * torch.randn(2, 3, 8)
    assert float(distance(b, a, loss, 1.0)) > float(distance(b, a, loss, 0.0)) > 0


def test_relative_distance_weighs_every_token_alike():
    """'rel' divides each token's squared error by the target token's mean square: a token
    1000x larger with the same relative error counts the same, where MSE lets it decide."""
    target = torch.ones(1, 2, 8)
    target[0, 0] *= 1000.0
    pred = target * 1.1
    rel = distance(pred, target, "rel")
    assert float(rel) == pytest.approx(0.01, rel=1e-5)
    only_small = distance(pred[:, 1:], target[:, 1:], "rel")
    assert float(rel) == pytest.approx(float(only_small), rel=1e-5)
    assert float(distance(pred, target, "mse")) > 1e3 * float(distance(pred[:, 1:], target[:, 1:],
                                                                      "mse"))  # fmt: skip


def test_group_size_that_does_not_divide_is_a_clear_error():
    with pytest.raises(ValueError, match="does not divide in_features 64"):
        QLinear(linear(), parse_setting("W4A16g48"), name="mlp.down_proj")


@pytest.fixture(scope="module")
def stories():
    need_shared(SHARED_MODELS / "stories260K" / "config.json")
    return load_model("stories260K")


def calib(tok_vocab, n=8, t=64):
    ids = torch.randint(3, tok_vocab, (4096,), generator=torch.Generator().manual_seed(0))
    return calibration_windows(ids, n, t, seed=1)


def test_capture_inputs_feed_the_first_block(stories):
    model, _ = stories
    ids = calib(model.config.vocab_size, n=3)
    x, kwargs = capture_inputs(model, ids)
    assert x.shape == (3, 64, model.config.hidden_size)
    assert torch.allclose(x, model.model.embed_tokens(ids))
    out = blocks(model)[0](x, **kwargs)
    assert (out[0] if isinstance(out, tuple) else out).shape == x.shape


@pytest.mark.parametrize(
    "config",
    [CBQConfig(settings=parse_setting("W4A8", ragged_groups=True), epochs=1, batch_size=4),
     CBQConfig(settings=parse_setting("W3A16g32", ragged_groups=True), epochs=1, batch_size=4,
               lora_rounding=False),  # the recipe: GPTQ codes kept, steps trained
     CBQConfig(settings=parse_setting("W2A16g32", ragged_groups=True), epochs=0, cfp=False,
               lora_rounding=False, window=1, overlap=0)],
    ids=["cbq_w4a8", "codes_w3a16g32", "rtn_w2a16g32"],
)  # fmt: skip
def test_quantize_end_to_end(stories, config, tmp_path):
    model, _ = stories
    model = copy.deepcopy(model)
    ids = calib(model.config.vocab_size)
    log_path = tmp_path / "log.jsonl"
    model, log = quantize(model, config, ids, log_path=log_path, progress=False)
    n_windows = 4 if config.window == 2 else 5
    assert len(log) == n_windows and len(log_path.read_text().splitlines()) == n_windows
    qls = [m for m in model.modules() if isinstance(m, QLinear)]
    assert len(qls) == 5 * 7 and all(q.codes is not None for q in qls)
    with torch.no_grad():
        logits = model(ids[:2]).logits
    assert torch.isfinite(logits).all()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:2, 1:].flatten())
    assert math.isfinite(float(nll))
    if config.epochs:  # never worse than the start, and the soft / hard losses are logged
        assert all(e["loss_after"] <= e["loss_before"] for e in log)
        assert all(e["hard_end"] > 0 and e["soft_end"] > 0 for e in log)


def test_non_finite_loss_stops_the_window_with_a_clear_error(stories):
    model, _ = stories
    model = copy.deepcopy(model)
    with torch.no_grad():
        blocks(model)[1].mlp.up_proj.weight[0, 0] = float("nan")
    config = CBQConfig(settings=parse_setting("W4A16"), epochs=1, cfp=False, window=1, overlap=0)
    with pytest.raises(FloatingPointError, match=r"window 2/5 \(blocks 1-1\)"):
        quantize(model, config, calib(model.config.vocab_size), progress=False)


@pytest.mark.parametrize("setting", ["W4A8", "W3A16g32"])
def test_save_then_load_reproduces_the_logits(stories, setting, tmp_path):
    from cbq_ptq.io import load, save

    model, tok = stories
    model = copy.deepcopy(model)
    ids = calib(model.config.vocab_size, n=4)
    config = CBQConfig(settings=parse_setting(setting, ragged_groups=True), epochs=1)
    model, _ = quantize(model, config, ids, progress=False)
    save(model, tmp_path / "q", tok)
    again = load(tmp_path / "q")
    with torch.no_grad():
        want = model(ids).logits
        got = again(ids).logits
    assert torch.equal(got, want)
    assert (tmp_path / "q" / "quant_config.json").is_file()


def test_load_rejects_a_folder_that_is_not_a_quantized_model(tmp_path):
    from cbq_ptq.io import load

    with pytest.raises(FileNotFoundError, match=r"not a folder written by cbq_ptq\.save"):
        load(tmp_path)


class _Interrupt(Exception):
    pass


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_model(stories, tmp_path, monkeypatch):
    """Killed during window 3 of 4, then resumed from the checkpoint: the same logits, bit for
    bit, as an uninterrupted run; the log file lists each window once."""
    import cbq_ptq.pipeline as pipeline

    model, _ = stories
    ids = calib(model.config.vocab_size, n=4)
    config = CBQConfig(settings=parse_setting("W4A8", ragged_groups=True), epochs=1)
    whole, _ = quantize(copy.deepcopy(model), config, ids, progress=False)
    with torch.no_grad():
        want = whole(ids).logits

    real_train = pipeline.train_window
    calls = []

    def train_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise _Interrupt
        return real_train(*args, **kwargs)

    ckpt, log_path = tmp_path / "ckpt", tmp_path / "log.jsonl"
    monkeypatch.setattr(pipeline, "train_window", train_then_die)
    with pytest.raises(_Interrupt):
        quantize(copy.deepcopy(model), config, ids, log_path=log_path, progress=False,
                 checkpoint_dir=ckpt)  # fmt: skip
    monkeypatch.setattr(pipeline, "train_window", real_train)
    assert len(log_path.read_text().splitlines()) == 2
    resumed, log = quantize(copy.deepcopy(model), config, ids, log_path=log_path,
                            progress=False, checkpoint_dir=ckpt)  # fmt: skip
    assert [e["window"] for e in log] == [0, 1, 2, 3]
    assert len(log_path.read_text().splitlines()) == 4
    with torch.no_grad():
        assert torch.equal(resumed(ids).logits, want)


def test_resume_refuses_a_checkpoint_of_another_configuration(stories, tmp_path):
    model, _ = stories
    ids = calib(model.config.vocab_size, n=2, t=32)
    config = CBQConfig(settings=parse_setting("W4A16"), epochs=0, cfp=False, lora_rounding=False)
    quantize(copy.deepcopy(model), config, ids, progress=False, checkpoint_dir=tmp_path)
    other = CBQConfig(settings=parse_setting("W3A16"), epochs=0, cfp=False, lora_rounding=False)
    with pytest.raises(ValueError, match="written for another model, configuration"):
        quantize(copy.deepcopy(model), other, ids, progress=False, checkpoint_dir=tmp_path)


def test_act_codes_count_the_quantization_kernel():
    """4-bit per-token: s = 10 / 7, so 0.1 rounds to 0 (in the kernel) and 0 is not counted;
    CrossQuant with a small channel maximum for that channel keeps it out of the kernel."""
    q = QLinear(linear(n=3, k=4), parse_setting("W4A4"), lora=False, train=False)
    x = torch.tensor([[10.0, 0.1, 0.0, -10.0]])
    codes = q.act_codes(x)
    assert codes.tolist() == [[7.0, 0.0, 0.0, -7.0]]
    cross = QLinear(linear(n=3, k=4), parse_setting("W4A4", act_quantizer="crossquant",
                                                     crossquant_alpha=0.5), lora=False,
                    train=False)  # fmt: skip
    cross.channel_factor = torch.tensor([10.0, 0.1, 1.0, 10.0]).pow(0.5)
    assert cross.act_codes(x)[0, 1] != 0
    assert QLinear(linear(), parse_setting("W4A16"), lora=False, train=False).act_codes(x) is None


def test_kernel_proportions_of_a_quantized_model(stories):
    from cbq_ptq.evaluate import kernel_proportions

    model, tok = stories
    need_shared(SHARED_MODELS.parent / "data" / "tinystories-valid-prefix.txt")
    ids = calib(model.config.vocab_size, n=2)
    config = CBQConfig(settings=parse_setting("W4A4", ragged_groups=True), epochs=0,
                       lora_rounding=False)  # fmt: skip
    q, _ = quantize(copy.deepcopy(model), config, ids, progress=False)
    props = kernel_proportions(q, tok, "tinystories", 512, bos=True, max_windows=1)
    assert len(props) == 35 and all(0.0 <= v <= 1.0 for v in props.values())
    assert max(props.values()) > 0.01  # 4-bit per-token activations do zero some elements


def test_load_builds_the_model_on_the_meta_device(stories, tmp_path, monkeypatch):
    """No random initialisation of a full-precision model at load: every weight of the loaded
    model comes from the file (a Linear initialised at load would fail the check below)."""
    from cbq_ptq.io import load, save

    model, tok = stories
    config = CBQConfig(settings=parse_setting("W4A16"), epochs=0, lora_rounding=False, cfp=False)
    q, _ = quantize(copy.deepcopy(model), config, calib(model.config.vocab_size, n=2),
                    progress=False)  # fmt: skip
    save(q, tmp_path / "q", tok)
    calls = []
    real = torch.nn.init.kaiming_uniform_

    def spy(*a, **k):
        calls.append((a[0] if a else k["tensor"]).device.type)
        return real(*a, **k)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", spy)
    loaded = load(tmp_path / "q")
    assert calls and set(calls) == {"meta"}  # initialisers ran on meta tensors only
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
