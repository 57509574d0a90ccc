"""Every bad input a new user met (shared/docs/FIRST_CONTACT.md, issue 12) gives one clear
line: usage errors exit 2 before any model is loaded, runtime failures exit 1, never a
traceback. One row per input, so that the list cannot regress."""

import copy
import json
import shutil

import pytest
import torch

import cbq_ptq.models as models
from cbq_ptq.cli import main
from cbq_ptq.config import CBQConfig, parse_setting
from cbq_ptq.models import SHARED_MODELS
from tests.conftest import need_shared

Q = ["quantize", "--model", "stories260K", "--corpus", "tinystories", "--device", "cpu",
     "--n-calib", "2", "--calib-len", "32", "--eval-windows", "1", "--also", ""]  # fmt: skip


def run(argv, capsys, tmp_path=None, no_load=True, monkeypatch=None):
    """main(argv) -> (exit status, stderr); with no_load the model must not be loaded."""
    if no_load and monkeypatch is not None:
        def refuse(*_a, **_k):
            raise AssertionError("the model was loaded before the argument was checked")

        monkeypatch.setattr(models, "load_model", refuse)
    rc = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("cbq ")]
    assert len(lines) <= 1, err  # one line says what is wrong
    return rc, lines[0] if lines else ""


@pytest.fixture(autouse=True)
def _shared():
    need_shared(SHARED_MODELS / "stories260K" / "config.json")


USAGE = [  # (extra argv, message): exit 2, before the model is loaded
    (["--model", "/path/that/does/not/exist"], "argument --model: /path/that/does/not/exist "
                                               "does not exist"),
    (["--eval-windows", "-5"], "argument --eval-windows: must be >= 1, got -5"),
    (["--eval-windows", "0"], "argument --eval-windows: must be >= 1, got 0"),
    (["--n-calib", "0"], "argument --n-calib: must be >= 1, got 0"),
    (["--calib-len", "0"], "argument --calib-len: must be >= 2, got 0"),
    (["--seq-len", "0"], "argument --seq-len: must be >= 2, got 0"),
    (["--epochs", "-1"], "argument --epochs: must be >= 0, got -1"),
    (["--steps", "-3"], "argument --steps: must be >= 0, got -3"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--window", "0"], "argument --window: must be >= 1, got 0"),
    (["--overlap", "5"], "argument --overlap: must be smaller than --window (2), got 5"),
    (["--lora-rank", "0"], "argument --lora-rank: must be >= 1, got 0"),
    (["--lr", "0"], "argument --lr: must be > 0, got 0.0"),
    (["--lr-lora", "-1"], "argument --lr-lora: must be > 0, got -1.0"),
    (["--act-clip", "1.2"], "argument --act-clip: must be in (0, 1], got 1.2"),
    (["--n-calib", "abc"], "argument --n-calib: expected an integer, got 'abc'"),
    (["--crossquant-alpha", "2"], "argument --crossquant-alpha: must be in (0, 1], got 2.0"),
    (["--setting", "W5A3"], "argument --setting: w_bits must be one of"),
    (["--setting", "foo"], "argument --setting: setting must look like W4A16"),
    (["--setting", "W4A16g100"], "group_size must be a multiple of 16"),
    (["--setting", "W4A16g48"], "group_size 48 does not divide in_features"),
    (["--corpus", "nosuchcorpus"], "argument --corpus: corpus 'nosuchcorpus' is neither a file"),
    (["--also", "nosuchcorpus"], "argument --also: corpus 'nosuchcorpus' is neither a file"),
    (["--calib", "nosuchcorpus"], "argument --calib: corpus 'nosuchcorpus' is neither a file"),
    (["--device", "tpu"], "argument --device: expected cpu, cuda or cuda:N, got 'tpu'"),
    (["--method", "awq"], "argument --method: invalid choice: 'awq'"),
    (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["--rotate", "givens"], "argument --rotate: invalid choice: 'givens'"),
]


@pytest.mark.parametrize(("extra", "message"), USAGE, ids=[" ".join(e) for e, _ in USAGE])
def test_usage_errors_are_one_line_and_early(extra, message, capsys, tmp_path, monkeypatch):
    rc, err = run([*Q, "--out", str(tmp_path / "o"), *extra], capsys, tmp_path,
                  monkeypatch=monkeypatch)  # fmt: skip
    assert rc == 2, err
    assert message in err
    assert not (tmp_path / "o").exists()  # nothing written before the arguments are good


def test_cuda_without_a_gpu(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, err = run([*Q, "--device", "cuda", "--out", str(tmp_path)], capsys,
                  monkeypatch=monkeypatch)  # fmt: skip
    assert rc == 2 and "cuda requested but no CUDA GPU is available" in err


def test_rotate_hadamard_on_a_width_without_a_construction(capsys, tmp_path, monkeypatch):
    # stories260K's FFN 172 has one (Williamson's 4 x 43); a copy of its folder whose config
    # says 188 = 4 x 47 does not
    src = models.resolve("stories260K")
    shutil.copytree(src, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 188}))
    rc, err = run([*Q, "--model", str(tmp_path / "m"), "--rotate", "hadamard", "--out",
                   str(tmp_path / "o")], capsys, monkeypatch=monkeypatch)  # fmt: skip
    assert rc == 2 and "argument --rotate: " in err
    assert "FFN width: no Hadamard matrix of size 188" in err


def test_model_folder_without_config(capsys, tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    rc, err = run([*Q, "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")], capsys,
                  monkeypatch=monkeypatch)  # fmt: skip
    assert rc == 2 and "is not a model folder (no config.json in it)" in err


@pytest.mark.parametrize("where", ["file", "under_file", "unwritable"])
def test_out_that_cannot_be_written(where, capsys, tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    out = {"file": tmp_path / "f", "under_file": tmp_path / "f" / "sub",
           "unwritable": "/proc/cbq-out"}[where]  # fmt: skip
    rc, err = run([*Q, "--out", str(out)], capsys, monkeypatch=monkeypatch)
    assert rc == 2 and "argument --out" in err


def test_binary_corpus_file(capsys, tmp_path, monkeypatch):
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)))
    rc, err = run([*Q, "--corpus", str(tmp_path / "bin.txt"), "--out", str(tmp_path / "o")],
                  capsys, monkeypatch=monkeypatch)  # fmt: skip
    assert rc == 2 and "is not UTF-8 text" in err and "bin.txt" in err


def test_empty_corpus_file(capsys, tmp_path, monkeypatch):
    (tmp_path / "empty.txt").write_text("")
    rc, err = run([*Q, "--corpus", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o")],
                  capsys, monkeypatch=monkeypatch)  # fmt: skip
    assert rc == 2 and "is empty" in err


def test_hub_ids_and_local_paths():
    """'name' and 'org/name' are hub ids (checked when loaded); anything that looks like a
    path must exist."""
    from cbq_ptq.cli import UsageError, _check_model

    _check_model("HuggingFaceTB/SmolLM2-135M", "argument --model")
    _check_model("gpt2", "argument --model")
    for name in ("./nope", "a/b/c", "a//b", "~/nope"):
        with pytest.raises(UsageError, match="does not exist"):
            _check_model(name, "argument --model")


def test_eval_of_a_missing_folder(capsys, monkeypatch):
    rc, err = run(["eval", "/path/that/does/not/exist", "--device", "cpu"], capsys,
                  monkeypatch=monkeypatch)  # fmt: skip
    assert rc == 2 and "argument model: /path/that/does/not/exist does not exist" in err


# ------------------------------------------------------------------ saved models, corrupted


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small saved model (stories260K, W4A16, round-to-nearest)."""
    from cbq_ptq.data import calibration_windows
    from cbq_ptq.io import save
    from cbq_ptq.models import load_model
    from cbq_ptq.pipeline import quantize

    need_shared(SHARED_MODELS / "stories260K" / "config.json")
    model, tok = load_model("stories260K")
    ids = calibration_windows(torch.arange(3, 500), 2, 32)
    config = CBQConfig(settings=parse_setting("W4A16g32", ragged_groups=True), epochs=0,
                       cfp=False, lora_rounding=False, window=1, overlap=0)  # fmt: skip
    model, _ = quantize(model, config, ids, progress=False)
    path = tmp_path_factory.mktemp("saved") / "model"
    save(model, path, tok, base_model="stories260K", corpus="tinystories")
    return path


def corrupted(saved, tmp_path, how):
    dst = tmp_path / "m"
    shutil.copytree(saved, dst)
    meta_path = dst / "quant_config.json"
    meta = json.loads(meta_path.read_text())
    weights = dst / "model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "header":
        weights.write_bytes(b"\x00" * 16)
    elif how == "deleted":
        weights.unlink()
    elif how == "bits":
        layer = next(iter(meta["layers"]))
        meta["layers"][layer]["bits"] = 2
    elif how == "group":
        layer = next(iter(meta["layers"]))
        meta["layers"][layer]["group_size"] = 16
    elif how == "shape":
        layer = next(iter(meta["layers"]))
        meta["layers"][layer]["in_features"] += 8
    elif how == "json":
        meta_path.write_text("{not json")
        return dst
    elif how == "format_version":
        meta["format_version"] = 99
    elif how == "pack_format_version":
        meta["pack_format_version"] = 2
    elif how == "settings":
        meta["settings"]["w_bits"] = 5
    if how not in ("truncated", "header", "deleted"):
        meta_path.write_text(json.dumps(meta))
    return dst


FILES = [
    ("truncated", 1, "sha256 differs from the one recorded"),
    ("header", 1, "sha256 differs from the one recorded"),
    ("deleted", 1, "model.safetensors not found"),
    ("bits", 1, "packed has shape"),
    ("group", 1, "scales has shape"),
    ("shape", 1, "packed has shape"),
    ("json", 1, "quant_config.json: not valid JSON"),
    ("format_version", 1, "this cbq_ptq reads 'cbq.quantized' version 1"),
    ("pack_format_version", 1, "pack_format_version 2"),
    ("settings", 1, "settings: w_bits must be one of"),
]


@pytest.mark.parametrize(("how", "code", "message"), FILES, ids=[f[0] for f in FILES])
def test_a_damaged_saved_model_is_named(how, code, message, saved, tmp_path, capsys):
    path = corrupted(saved, tmp_path, how)
    rc, err = run(["eval", str(path), "--device", "cpu", "--eval-windows", "1", "--also", ""],
                  capsys, no_load=False)  # fmt: skip
    assert rc == code, err
    assert message in err


def test_the_saved_model_itself_evaluates_on_its_corpus(saved, capsys):
    """The intact folder loads (sha256 and shapes agree) and `cbq eval` uses the corpus it
    was reported on (tinystories here), not wikitext2."""
    rc = main(["eval", str(saved), "--device", "cpu", "--eval-windows", "1", "--also", ""])
    out = capsys.readouterr().out
    assert rc == 0 and "on tinystories" in out


def test_resume_with_another_setting_names_restart(tmp_path, capsys):
    base = [*Q, "--out", str(tmp_path / "o"), "--steps", "1"]
    from cbq_ptq.checkpoint import save as save_ckpt  # noqa: F401  (the module exists)

    ckpt = tmp_path / "o" / "checkpoint"
    ckpt.mkdir(parents=True)
    torch.save({"fingerprint": "another run"}, ckpt / "state.pt")
    rc, err = run([*base, "--setting", "W4A16"], capsys, no_load=False)
    assert rc == 1 and "written for another model, configuration" in err
    assert "--restart" in err


# ------------------------------------------------------------------ the Python API


@pytest.fixture(scope="module")
def tiny():
    from cbq_ptq.models import load_model

    return load_model("stories260K")[0]


API = [  # (calib_ids, config, exception, message)
    (torch.rand(2, 16), None, TypeError, "calib_ids must hold integer token ids"),
    (torch.arange(16), None, ValueError, "calib_ids must be (windows >= 1, tokens >= 2)"),
    (torch.zeros(0, 16, dtype=torch.long), None, ValueError, "got shape (0, 16)"),
    (torch.full((1, 16), 10_000), None, ValueError, "token ids in [0, 512)"),
    (torch.full((1, 16), -1), None, ValueError, "token ids in [0, 512)"),
    ([[1, 2, 3]], None, TypeError, "calib_ids must be a tensor of token ids"),
    (torch.ones(1, 16, dtype=torch.long), {"epochs": 0}, TypeError,
     "config must be a cbq_ptq.CBQConfig, got dict"),
]  # fmt: skip


@pytest.mark.parametrize(("ids", "config", "exc", "message"), API,
                         ids=[m for *_, m in API])  # fmt: skip
def test_api_bad_calibration_and_config(tiny, ids, config, exc, message):
    from cbq_ptq.pipeline import quantize

    cfg = CBQConfig(settings=parse_setting("W4A16"), epochs=0) if config is None else config
    with pytest.raises(exc, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):  # fmt: skip
        quantize(copy.deepcopy(tiny), cfg, ids, progress=False)


def test_api_evaluation_window_count():
    from cbq_ptq.data import eval_windows

    with pytest.raises(ValueError, match="max_windows must be None"):
        eval_windows(torch.arange(100), 10, max_windows=0)
    with pytest.raises(ValueError, match="need num >= 1 windows"):
        from cbq_ptq.data import calibration_windows

        calibration_windows(torch.arange(100), 0, 10)


def test_config_errors_name_one_field():
    with pytest.raises(ValueError, match=r"^epochs must be >= 0, got -1$"):
        CBQConfig(epochs=-1)
    with pytest.raises(ValueError, match=r"^batch_size must be >= 1, got 0$"):
        CBQConfig(batch_size=0)
    with pytest.raises(ValueError, match="round_mode must be one of"):
        CBQConfig(round_mode="hard")


def test_tokenizing_a_whole_corpus_does_not_warn():
    """The corpus is tokenized in one call and cut into windows afterwards: transformers'
    "Token indices sequence length is longer than ..." warning is not emitted (the same call
    without verbose=False emits it: the check can fail). Records are taken from transformers'
    logger itself (its handler's stream depends on which test ran first)."""
    import logging

    from transformers.utils import logging as hf_logging

    from cbq_ptq.data import tokenize
    from cbq_ptq.models import load_model

    _, tok = load_model("stories260K")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = hf_logging.get_logger("transformers")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        tok.deprecation_warnings.clear()
        ids = tokenize(tok, "Once upon a time. " * 400)
        assert ids.numel() > tok.model_max_length
        assert not any("longer than the specified maximum" in r.getMessage() for r in records)
        tok.deprecation_warnings.clear()
        tok("Once upon a time. " * 400, add_special_tokens=False)
        assert any("longer than the specified maximum" in r.getMessage() for r in records)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
