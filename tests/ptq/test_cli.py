"""The command line on stories260K (a few steps), and its errors."""

import json

import pytest

from cbq_ptq.cli import main
from cbq_ptq.models import SHARED_MODELS
from tests.conftest import need_shared


@pytest.mark.slow
def test_quantize_then_eval(tmp_path, capsys):
    need_shared(SHARED_MODELS / "stories260K" / "config.json")
    out = tmp_path / "run"
    rc = main(["quantize", "--model", "stories260K", "--setting", "W4A8", "--corpus",
               "tinystories", "--n-calib", "4", "--calib-len", "64", "--epochs", "1",
               "--eval-windows", "2", "--out", str(out), "--device", "cpu"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "stories260K float32: perplexity" in printed  # --rotate auto: Hadamard (FFN 172 =
    assert "W4A8 (CBQ + hadamard rotation): perplexity" in printed  # Williamson's 4 x 43)
    assert "on ptb (first 2 windows" in printed and "quantization kernel" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ppl_after"]["tinystories"]["windows"] == 2
    assert summary["ppl_after"]["ptb"]["ppl"] > 1
    kernel = summary["kernel_proportion"]
    assert len(kernel) == 35 and all(0 <= v <= 1 for v in kernel.values())
    assert (out / "windows.jsonl").read_text().count("\n") == 4
    assert not (out / "checkpoint").exists()  # removed once the model is saved
    meta = json.loads((out / "model" / "quant_config.json").read_text())
    assert meta["settings"]["act_quantizer"] == "per_token"  # --act-quantizer auto, CPU recipe
    assert meta["rotation"]["kind"] == "hadamard" and meta["rotation"]["construction"] == 2
    rc = main(["eval", str(out / "model"), "--corpus", "tinystories", "--eval-windows", "2",
               "--device", "cpu", "--also", ""])  # fmt: skip
    assert rc == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    ppl = float(line.split("perplexity ")[1].split()[0])
    assert ppl == pytest.approx(summary["ppl_after"]["tinystories"]["ppl"], abs=6e-4)


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["quantize", "--model", "stories260K", "--setting", "W5A16"], "w_bits must be one of"),
     (["quantize", "--model", "stories260K", "--setting", "W4A16g64", "--corpus",
       "tinystories", "--n-calib", "2", "--calib-len", "32", "--epochs", "0",
       "--eval-windows", "1"], "does not divide in_features 172"),
     (["eval", "stories260K", "--corpus", "no-such-corpus"], "neither a file nor one of"),
     (["quantize", "--model", "stories260K", "--setting", "W4A8g64", "--two-level"],
      "it needs --method rtn or gptq, not cbq"),
     (["quantize", "--model", "stories260K", "--setting", "W4A16g64", "--two-level", "--method",
       "rtn"], "two_level is a format of 4-bit grouped weights with 4- or 8-bit activations")],
)  # fmt: skip
def test_bad_input_is_a_clear_error(argv, message, capsys, tmp_path):
    need_shared(SHARED_MODELS / "stories260K" / "config.json")
    assert main([*argv, "--device", "cpu"] + (["--out", str(tmp_path)] if argv[0] ==
                "quantize" else [])) == 2  # fmt: skip
    assert message in capsys.readouterr().err


def test_symmetric_weights_start_from_round_to_nearest_without_lora():
    """GPTQ starts and LoRA-Rounding need zero points: --symmetric-weights changes the
    recipe's start and rounding instead of failing in the first window."""
    from cbq_ptq.cli import build_config, build_parser
    from cbq_ptq.config import parse_setting

    args = build_parser().parse_args(["quantize", "--setting", "W8A8", "--symmetric-weights"])
    settings = parse_setting("W8A8", symmetric_weights=True)
    config = build_config(args, settings, "cpu")
    assert config.init == "rtn" and not config.lora_rounding
    args = build_parser().parse_args(["quantize", "--setting", "W8A8"])
    config = build_config(args, parse_setting("W8A8"), "cpu")
    assert config.init == "gptq" and not config.lora_rounding  # the recipe keeps GPTQ's codes
    assert config.lr == 5e-3  # the fixed-code recipe's learning rate (config.recipe)
    args = build_parser().parse_args(["quantize", "--setting", "W8A8", "--lora"])
    config = build_config(args, parse_setting("W8A8"), "cpu")
    assert config.init == "gptq" and config.lora_rounding and config.lora_base == "start"
    assert config.lr == 5e-3  # --lora takes back the LoRA recipe's (LORA_RECIPE)
    args = build_parser().parse_args(["quantize", "--setting", "W8A8", "--lora", "--lr", "0.01"])
    assert build_config(args, parse_setting("W8A8"), "cpu").lr == 0.01
    for argv, match in ((["--symmetric-weights", "--lora"], "asymmetric"),
                        (["--method", "gptq", "--lora"], "--method cbq")):  # fmt: skip
        args = build_parser().parse_args(["quantize", "--setting", "W8A8", *argv])
        with pytest.raises(ValueError, match=match):
            build_config(args, parse_setting("W8A8", symmetric_weights="--symmetric-weights"
                                             in argv), "cpu")  # fmt: skip


def test_gptq_target_reaches_the_config_and_needs_a_gptq_start():
    from cbq_ptq.cli import build_config, build_parser
    from cbq_ptq.config import parse_setting

    def config(*argv, symmetric=False):
        args = build_parser().parse_args(["quantize", "--setting", "W4A8", *argv])
        return build_config(args, parse_setting("W4A8", symmetric_weights=symmetric), "cpu")

    assert config().gptq_target == "quantized"
    assert config("--gptq-target", "fp").gptq_target == "fp"
    assert config("--method", "gptq", "--gptq-target", "act").gptq_target == "act"
    for argv, symmetric in ((["--method", "rtn"], False), (["--init", "rtn"], False),
                            (["--symmetric-weights"], True)):  # fmt: skip
        with pytest.raises(ValueError, match="--gptq-target sets what GPTQ fits"):
            config(*argv, "--gptq-target", "fp", symmetric=symmetric)
    from cbq_ptq.cli import UsageError

    with pytest.raises(UsageError, match="invalid choice: 'exact'"):
        config("--gptq-target", "exact")


def test_crossquant_on_a_rotated_model_is_warned_about(tmp_path, capsys):
    """An explicit --act-quantizer crossquant with a rotation runs, with a one-line warning
    (CrossQuant crushed the rotated W4A4 model: 211 against 48, docs/results/issue15)."""
    need_shared(SHARED_MODELS / "stories260K" / "config.json")
    rc = main(["quantize", "--model", "stories260K", "--setting", "W4A8", "--corpus",
               "tinystories", "--n-calib", "2", "--calib-len", "32", "--epochs", "0",
               "--no-lora", "--eval-windows", "1", "--also", "", "--rotate", "random",
               "--act-quantizer", "crossquant", "--out", str(tmp_path / "r"),
               "--device", "cpu"])  # fmt: skip
    assert rc == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(err) == 1 and "CrossQuant on a rotated model" in err[0]


@pytest.mark.parametrize(("setting", "cfp", "act_clip"), [("W4A4", False, 0.8),
                                                          ("W4A8", True, 1.0)])  # fmt: skip
def test_the_rotated_recipe_drops_cfp_at_4_bit_activations(tmp_path, setting, cfp, act_clip):
    """config.rotated_recipe: a rotated CBQ run at 4-bit activations skips the coarse-to-fine
    preprocessing (H200 held-out 40.78 without against 42.23 with), 8-bit keeps it."""
    need_shared(SHARED_MODELS / "stories260K" / "config.json")
    out = tmp_path / setting
    rc = main(["quantize", "--model", "stories260K", "--setting", setting, "--corpus",
               "tinystories", "--n-calib", "2", "--calib-len", "32", "--epochs", "0",
               "--no-lora", "--eval-windows", "1", "--also", "", "--rotate", "random",
               "--out", str(out), "--device", "cpu"])  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cbq_config"]["cfp"] is cfp and summary["cbq_config"]["rotate"] == "random"
    assert summary["cbq_config"]["act_clip"] == act_clip  # 4-bit: clipped from the start


def test_act_clip_reaches_every_layer_and_the_saved_model(tmp_path):
    from safetensors.torch import load_file

    need_shared(SHARED_MODELS / "stories260K" / "config.json")
    out = tmp_path / "run"
    rc = main(["quantize", "--model", "stories260K", "--setting", "W4A4", "--corpus",
               "tinystories", "--n-calib", "2", "--calib-len", "32", "--epochs", "0",
               "--eval-windows", "1", "--also", "", "--rotate", "none", "--act-clip", "0.8",
               "--out", str(out), "--device", "cpu"])  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cbq_config"]["act_clip"] == 0.8
    tensors = {}
    for f in (out / "model").glob("*.safetensors"):
        tensors.update(load_file(f))
    ratios = [float(v) for k, v in tensors.items() if k.endswith(".act_ratio")]
    assert len(ratios) == 35 and all(r == pytest.approx(0.8, abs=1e-6) for r in ratios)
