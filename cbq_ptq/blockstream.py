"""Block-streamed weights (issue 17): quantize a model larger than the GPU.

:func:`load_streamed` builds the model on the meta device and puts on the device only what is
not a decoder block (embeddings, final norm, LM head, the rotary tables). The pipeline asks
the model's :class:`BlockSource` for a block's weights when the block's first window starts
(read from the memory-mapped safetensors shards, so the host holds no copy beyond the page
cache) and, once the block is finalized, the :class:`cbq_ptq.io.ShardWriter` writes it to the
output artefact and the block goes back to the meta device. Peak GPU memory: the blocks of
one window, the two streams and the unquantized ends of the model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cbq_ptq.models import blocks


class BlockSource:
    """Tensors of a Hugging Face folder's safetensors shards, by parameter name, read on
    demand (``safe_open`` maps the files; nothing is read before it is asked for)."""

    def __init__(self, folder: str | Path, dtype: torch.dtype, device: torch.device) -> None:
        from safetensors import safe_open

        from cbq_ptq.io import safetensors_files

        self.folder, self.dtype, self.device = Path(folder), dtype, torch.device(device)
        self.where: dict[str, object] = {}
        self._handles = []
        for file in safetensors_files(self.folder):
            f = safe_open(str(file), framework="pt")
            self._handles.append(f)
            for key in f.keys():
                self.where[key] = f

    def tensor(self, key: str) -> torch.Tensor:
        if key not in self.where:
            raise KeyError(f"{self.folder}: no tensor {key}")
        t = self.where[key].get_tensor(key)
        return t.to(self.device, self.dtype if t.is_floating_point() else t.dtype)

    def materialize(self, module: torch.nn.Module, prefix: str) -> None:
        """Every meta parameter / buffer of ``module`` (named ``prefix.*`` in the files) from
        the shards, on the device."""
        for name, p in list(module.named_parameters(recurse=True)):
            if p.is_meta:
                _set(module, name, torch.nn.Parameter(self.tensor(f"{prefix}{name}"),
                                                      requires_grad=False))  # fmt: skip
        for name, b in list(module.named_buffers(recurse=True)):
            if b is not None and b.is_meta and f"{prefix}{name}" in self.where:
                _set(module, name, self.tensor(f"{prefix}{name}"))


def _set(module: torch.nn.Module, name: str, value) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, leaf, value)


def block_prefix(model, j: int) -> str:
    """The parameter-name prefix of decoder block j ('model.layers.3.')."""
    layers = blocks(model)
    for name, m in model.named_modules():
        if m is layers:
            return f"{name}.{j}."
    raise ValueError("the model's decoder blocks are not a submodule")  # pragma: no cover


def load_streamed(name: str, dtype: torch.dtype = torch.bfloat16, device: str = "cuda"):
    """(model, tokenizer) with the decoder blocks left on the meta device and a
    :class:`BlockSource` as ``model._cbq_stream`` (the pipeline materializes each block for
    its windows). Tied embeddings are tied again."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from cbq_ptq.io import _materialize_buffers
    from cbq_ptq.models import arch_spec, resolve

    path = resolve(name)
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    arch_spec(model)
    source = BlockSource(path, dtype, torch.device(device))
    layers = blocks(model)
    block_ids = {id(m) for b in layers for m in b.modules()}
    for mname, module in model.named_modules():
        if id(module) in block_ids:
            continue
        for pname, p in list(module.named_parameters(recurse=False)):
            key = f"{mname}.{pname}" if mname else pname
            if p.is_meta and key in source.where:
                _set(module, pname, torch.nn.Parameter(source.tensor(key), requires_grad=False))
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    # rotary tables are computed, not stored: rebuilt on the device (io.load does the same)
    saved = list(layers)
    for j in range(len(layers)):
        layers[j] = torch.nn.Identity()  # out of _materialize_buffers' way
    try:
        with torch.device(device):
            _materialize_buffers(model, config)
    finally:
        for j, b in enumerate(saved):
            layers[j] = b
    model._cbq_stream = source
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):  # a folder of weights alone (e.g. a random model to measure)
        tokenizer = None
    return model, tokenizer
