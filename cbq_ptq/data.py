"""Calibration and evaluation text: corpus names resolved to files, token windows.

A corpus is a file path or a name. Names resolve, in order, from the directory in the
environment variable ``CBQ_DATA_DIR``, then ``../shared/data`` beside the project, then the
Hugging Face ``datasets`` package when it is installed; otherwise a clear error.

| name | evaluation file | calibration file |
|---|---|---|
| wikitext2 | wikitext2-raw-test.txt | wikitext2-tok-valid.txt |
| ptb | ptb-test.txt | ptb-valid.txt |
| tinystories | tinystories-valid-prefix.txt | tinystories-valid-prefix.txt |

(TinyStories has one file here: the evaluation windows are the first ones of the file and the
calibration windows are drawn from the second half of its first nine tenths, see
:func:`calibration_data`.)

Split 'heldout': the last tenth of a calibration text (cut at a line break), from which no
calibration window is drawn (split 'calib' is the first nine tenths). Hyperparameters are
chosen on its perplexity (and PTB's), never on the test text (docs/DECISIONS.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

CORPORA = {
    "wikitext2": ("wikitext2-raw-test.txt", "wikitext2-tok-valid.txt"),
    "ptb": ("ptb-test.txt", "ptb-valid.txt"),
    "tinystories": ("tinystories-valid-prefix.txt", "tinystories-valid-prefix.txt"),
}
SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
HELDOUT_FRACTION = 0.1  # of a calibration text, never drawn from
_HF = {  # (path, config, split, column) for datasets.load_dataset
    "wikitext2": (("wikitext", "wikitext-2-raw-v1", "test", "text"),
                  ("wikitext", "wikitext-2-raw-v1", "validation", "text")),
    "ptb": (("ptb_text_only", "penn_treebank", "test", "sentence"),
            ("ptb_text_only", "penn_treebank", "validation", "sentence")),
}  # fmt: skip


def data_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("CBQ_DATA_DIR"):
        dirs.append(Path(os.environ["CBQ_DATA_DIR"]))
    dirs.append(SHARED_DATA)
    return dirs


def load_text(corpus: str | os.PathLike, split: str = "eval") -> str:
    """The text of a corpus name ('wikitext2', 'ptb', 'tinystories') for split 'eval',
    'calib' or 'heldout' (module docstring), or of a file path."""
    if split not in ("eval", "calib", "heldout"):
        raise ValueError(f"split must be 'eval', 'calib' or 'heldout', got {split!r}")
    if split != "eval":
        return _split_heldout(_load(corpus, "calib"), split)
    return _load(corpus, "eval" if split == "eval" else "calib")


def _split_heldout(text: str, split: str) -> str:
    """The first nine tenths ('calib') or the last tenth ('heldout') of a text, cut at the
    line break nearest to the boundary."""
    cut = int(len(text) * (1 - HELDOUT_FRACTION))
    nl = text.rfind("\n", 0, cut)
    cut = nl + 1 if nl > 0 else cut
    return text[:cut] if split == "calib" else text[cut:]


def _load(corpus: str | os.PathLike, split: str) -> str:
    name = str(corpus)
    if name not in CORPORA:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(
                f"corpus {name!r} is neither a file nor one of {sorted(CORPORA)}"
            )
        return _read(path)
    filename = CORPORA[name][0 if split == "eval" else 1]
    for d in data_dirs():
        if (d / filename).is_file():
            return _read(d / filename)
    if name in _HF:
        try:
            import datasets  # type: ignore[import-not-found]
        except ImportError:
            pass
        else:
            path, config, hf_split, column = _HF[name][0 if split == "eval" else 1]
            rows = datasets.load_dataset(path, config, split=hf_split)[column]
            return "\n\n".join(rows)
    raise FileNotFoundError(
        f"corpus {name!r} ({split}): {filename} not found in {[str(d) for d in data_dirs()]} "
        f"(set CBQ_DATA_DIR) and the `datasets` package cannot provide it"
    )


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"corpus file {path} is not UTF-8 text ({exc.reason} at byte "
                         f"{exc.start})") from None  # fmt: skip


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text in one call, no special tokens: (num_tokens,) int64. (verbose=False:
    the tokenizer would warn that the text is longer than the model's context; it is cut
    into windows afterwards.)"""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt", verbose=False).input_ids
    return ids[0]


def eval_windows(ids: torch.Tensor, seq_len: int, bos_id: int | None = None,
                 max_windows: int | None = None) -> torch.Tensor:  # fmt: skip
    """Consecutive non-overlapping windows (num, seq_len), last partial window dropped
    (shared/README.md). With ``bos_id``, each window is BOS + seq_len - 1 text tokens (the
    stories260K reference protocol)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be None (all) or >= 1, got {max_windows}")
    body = seq_len - 1 if bos_id is not None else seq_len
    num = ids.numel() // body
    if max_windows is not None:
        num = min(num, max_windows)
    if num == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    windows = ids[: num * body].view(num, body)
    if bos_id is not None:
        windows = torch.cat([torch.full((num, 1), bos_id, dtype=ids.dtype), windows], dim=1)
    return windows


def calibration_windows(ids: torch.Tensor, num: int, seq_len: int, seed: int = 0,
                        start: int = 0) -> torch.Tensor:  # fmt: skip
    """``num`` random windows (num, seq_len) of consecutive tokens from ids[start:], seeded
    (the same seed gives the same windows)."""
    if num < 1 or seq_len < 2:
        raise ValueError(f"need num >= 1 windows of seq_len >= 2 tokens, got {num} x {seq_len}")
    ids = ids[start:]
    if ids.numel() <= seq_len:
        raise ValueError(f"calibration text has {ids.numel()} tokens, need more than {seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (num,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def calibration_data(tokenizer, corpus: str, num: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Seeded calibration windows (num, seq_len) from a corpus's calibration text. TinyStories
    has one file, whose start is the evaluation text: its windows come from the second half."""
    ids = tokenize(tokenizer, load_text(corpus, "calib"))
    start = ids.numel() // 2 if str(corpus) == "tinystories" else 0
    return calibration_windows(ids, num, seq_len, seed, start=start)
