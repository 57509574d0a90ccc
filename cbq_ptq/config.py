"""Frozen configuration of a quantization run (METHOD.md), validated at construction.

``QuantSettings`` says what the quantized model is (bit widths, groups, activation quantizer);
``parse_setting("w4a8")`` / ``"w2a16g64"`` builds one from the names papers use. The method's
switches (CFP, windows, LoRA-Rounding, training) live in ``CBQConfig`` so that RTN (no
training), block-wise reconstruction (K = 1, O = 0) and every ablation are the same pipeline
with other values.
"""

from __future__ import annotations

import dataclasses
import re

WEIGHT_BITS = (2, 3, 4, 6, 8)
ACT_BITS = (4, 6, 8, 16)  # 16: activations not quantized
ACT_QUANTIZERS = ("per_token", "crossquant")


@dataclasses.dataclass(frozen=True)
class QuantSettings:
    """w_bits: weight bits; group_size: None (one scale per output row) or the group length
    along the input dimension; a_bits: activation bits (16 = not quantized);
    act_quantizer: 'per_token' or 'crossquant'; crossquant_alpha: CrossQuant's exponent;
    symmetric_weights: signed symmetric codes instead of asymmetric with a zero point."""

    w_bits: int = 4
    group_size: int | None = None
    a_bits: int = 16
    act_quantizer: str = "per_token"
    crossquant_alpha: float = 0.15
    symmetric_weights: bool = False
    ragged_groups: bool = False

    def __post_init__(self) -> None:
        if self.w_bits not in WEIGHT_BITS:
            raise ValueError(f"w_bits must be one of {WEIGHT_BITS}, got {self.w_bits!r}")
        if self.a_bits not in ACT_BITS:
            raise ValueError(f"a_bits must be one of {ACT_BITS}, got {self.a_bits!r}")
        if self.group_size is not None and (
            isinstance(self.group_size, bool)
            or not isinstance(self.group_size, int)
            or self.group_size < 1
        ):
            raise ValueError(f"group_size must be None or a positive int, got {self.group_size!r}")
        if self.act_quantizer not in ACT_QUANTIZERS:
            raise ValueError(
                f"act_quantizer must be one of {ACT_QUANTIZERS}, got {self.act_quantizer!r}"
            )
        if self.group_size is not None and self.group_size % 16:
            raise ValueError(f"group_size must be a multiple of 16, got {self.group_size}")
        if not 0.0 < self.crossquant_alpha <= 1.0:
            raise ValueError(f"crossquant_alpha must be in (0, 1], got {self.crossquant_alpha}")

    @property
    def name(self) -> str:
        """The setting's usual name, e.g. 'W4A8', 'W2A16g64'."""
        g = f"g{self.group_size}" if self.group_size else ""
        return f"W{self.w_bits}A{self.a_bits}{g}"

    def check_layer(self, name: str, in_features: int) -> None:
        """A group size must divide the layer's input width (clear error otherwise)."""
        if self.group_size is not None and in_features % self.group_size:
            raise ValueError(
                f"group_size {self.group_size} does not divide in_features {in_features} of "
                f"layer {name} (ragged_groups=True allows a shorter last group)"
            )


_SETTING = re.compile(r"^w(\d+)a(\d+)(?:g(\d+))?$")


def parse_setting(text: str, **kwargs) -> QuantSettings:
    """'W4A16', 'w3a16g64', 'W4A8', 'W2A16g128' -> QuantSettings (keyword arguments override)."""
    match = _SETTING.match(text.strip().lower())
    if not match:
        raise ValueError(f"setting must look like W4A16, W3A16g64 or W4A8, got {text!r}")
    w, a, g = match.groups()
    return QuantSettings(w_bits=int(w), a_bits=int(a), group_size=int(g) if g else None, **kwargs)


@dataclasses.dataclass(frozen=True)
class CBQConfig:
    """The method's switches and training schedule (METHOD.md sections 2-4).

    window / overlap: K blocks per window, O shared with the next (K = 1, O = 0: block-wise
    reconstruction); epochs = 0: no training (RTN, or RTN after CFP)."""

    settings: QuantSettings = dataclasses.field(default_factory=QuantSettings)
    cfp: bool = True
    cfp_activations: bool | None = None  # None: only when activations are quantized
    cfp_weights: bool = False  # measured harmful at W4A16 on stories260K (DECISIONS.md)
    cfp_quantiles: tuple[float, float] = (0.25, 0.75)
    cfp_lambda: float = 1.5
    cfp_lambda2: float = 1.0
    cfp_beta: float = 0.7
    window: int = 2
    overlap: int = 1
    lora_rounding: bool = True
    lora_rank: int = 8
    lora_init: str = "rtn"
    learn_clipping: bool = True
    epochs: int = 2
    batch_size: int = 4
    lr: float = 5e-3
    lr_lora: float = 1e-2
    kl_weight: float = 1.0
    fp_weight: float = 1.0
    round_reg: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1 block, got {self.window}")
        if not 0 <= self.overlap < self.window:
            raise ValueError(
                f"overlap must be in [0, window) = [0, {self.window}), got {self.overlap}"
            )
        lo, hi = self.cfp_quantiles
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"cfp_quantiles must satisfy 0 <= lo < hi <= 1, got {lo, hi}")
        if self.lora_init not in ("rtn", "svd", "zero"):
            raise ValueError(f"lora_init must be 'rtn', 'svd' or 'zero', got {self.lora_init!r}")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")
        for field in ("epochs", "batch_size"):
            value = getattr(self, field)
            if value < (0 if field == "epochs" else 1):
                raise ValueError(f"{field} must be non-negative (batch_size >= 1), got {value}")


def window_schedule(num_blocks: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """Windows [start, end) of METHOD.md section 3: K consecutive blocks, starting every K - O
    blocks; the last window ends at the last block (it may be shorter only when the model has
    fewer than K blocks)."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if window < 1 or not 0 <= overlap < window:
        raise ValueError(f"need window >= 1 and 0 <= overlap < window, got {window}, {overlap}")
    step = window - overlap
    windows = []
    start = 0
    while True:
        end = min(start + window, num_blocks)
        windows.append((start, end))
        if end == num_blocks:
            return windows
        start += step
