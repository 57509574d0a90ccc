"""cbq_ptq configuration, window schedule and text windows (pure functions)."""

import pytest
import torch

from cbq_ptq.config import CBQConfig, QuantSettings, parse_setting, window_schedule
from cbq_ptq.data import calibration_windows, eval_windows, load_text


@pytest.mark.parametrize(
    ("text", "w", "a", "g"),
    [("W4A16", 4, 16, None), ("w3a16g64", 3, 16, 64), ("W2A16g128", 2, 16, 128),
     ("W4A8", 4, 8, None), ("w4a4", 4, 4, None), ("W6A6", 6, 6, None), ("W8A8", 8, 8, None)],
)  # fmt: skip
def test_parse_setting(text, w, a, g):
    s = parse_setting(text)
    assert (s.w_bits, s.a_bits, s.group_size) == (w, a, g)
    assert parse_setting(s.name) == s


def test_bad_settings():
    with pytest.raises(ValueError, match="w_bits"):
        QuantSettings(w_bits=5)
    with pytest.raises(ValueError, match="w_bits"):
        parse_setting("W1A16")
    with pytest.raises(ValueError, match="a_bits"):
        QuantSettings(a_bits=3)
    with pytest.raises(ValueError, match="group_size"):
        QuantSettings(group_size=0)
    with pytest.raises(ValueError, match="act_quantizer"):
        QuantSettings(act_quantizer="minmax")
    with pytest.raises(ValueError, match="setting must look like"):
        parse_setting("int4")
    with pytest.raises(ValueError, match=r"does not divide in_features 172 of layer mlp\.down"):
        QuantSettings(group_size=64).check_layer("mlp.down", 172)
    with pytest.raises(ValueError, match="overlap"):
        CBQConfig(window=2, overlap=2)
    with pytest.raises(ValueError, match="window"):
        CBQConfig(window=0, overlap=0)
    with pytest.raises(dataclasses_frozen_error()):
        QuantSettings().w_bits = 3  # type: ignore[misc]


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


@pytest.mark.parametrize(
    ("blocks", "k", "o", "want"),
    [(5, 2, 1, [(0, 2), (1, 3), (2, 4), (3, 5)]),
     (5, 1, 0, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]),
     (6, 3, 1, [(0, 3), (2, 5), (4, 6)]),
     (1, 2, 1, [(0, 1)]),
     (4, 2, 0, [(0, 2), (2, 4)])],
)  # fmt: skip
def test_window_schedule(blocks, k, o, want):
    windows = window_schedule(blocks, k, o)
    assert windows == want
    assert windows[-1][1] == blocks  # the last window ends at the last block
    covered = sorted({b for s, e in windows for b in range(s, e)})
    assert covered == list(range(blocks))


def test_eval_windows_drop_the_partial_window_and_prepend_bos():
    ids = torch.arange(10)
    assert eval_windows(ids, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert eval_windows(ids, 4, bos_id=99).tolist() == [[99, 0, 1, 2], [99, 3, 4, 5],
                                                         [99, 6, 7, 8]]  # fmt: skip
    assert eval_windows(ids, 4, max_windows=1).shape == (1, 4)
    with pytest.raises(ValueError, match="fewer than one window"):
        eval_windows(ids, 16)


def test_calibration_windows_are_seeded_slices():
    ids = torch.arange(1000)
    a = calibration_windows(ids, 8, 32, seed=3)
    b = calibration_windows(ids, 8, 32, seed=3)
    c = calibration_windows(ids, 8, 32, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (8, 32)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 31, dtype=a.dtype))  # consecutive
    with pytest.raises(ValueError, match="need more than"):
        calibration_windows(ids[:10], 1, 32)


def test_missing_corpus_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="neither a file nor one of"):
        load_text("no-such-corpus")
    monkeypatch.setattr("cbq_ptq.data.SHARED_DATA", tmp_path)
    monkeypatch.delenv("CBQ_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match=r"ptb-valid\.txt not found"):
        load_text("ptb", "calib")
    (tmp_path / "mine.txt").write_text("hello")
    assert load_text(str(tmp_path / "mine.txt")) == "hello"
    monkeypatch.setenv("CBQ_DATA_DIR", str(tmp_path))
    text = "from the env dir\n" * 20 + "held out\n"
    (tmp_path / "ptb-valid.txt").write_text(text)
    calib, held = load_text("ptb", "calib"), load_text("ptb", "heldout")
    assert calib + held == text and calib.startswith("from the env dir\n")
    assert held.endswith("held out\n") and 0.05 < len(held) / len(text) <= 0.15


def test_the_recipes_activation_quantizer():
    from cbq_ptq.config import default_act_quantizer

    got = [default_act_quantizer(a, "cuda") for a in (4, 6, 8, 16)]
    assert got == ["crossquant"] * 3 + ["per_token"]
    assert {default_act_quantizer(a, "cpu") for a in (4, 6, 8, 16)} == {"per_token"}
    # a rotated model quantizes its activations per token on every device
    assert {default_act_quantizer(a, "cuda", rotated=True) for a in (4, 8)} == {"per_token"}
