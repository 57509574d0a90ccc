import os

import pytest
import torch

# Without a GPU, Triton kernels run through Triton's interpreter on CPU tensors. It must be
# switched on before any module defining a kernel is imported (triton.jit reads it then).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def random_llama(hidden=64, inter=128, heads=4, kv_heads=2, vocab=300, device="cpu",
                 dtype=torch.float32):
    """A 2-block Llama with random weights (seeded), for tests of serving and generation."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, num_hidden_layers=2, vocab_size=vocab,
                         max_position_embeddings=512)  # fmt: skip
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype).eval()


def need_shared(path):
    """A file or folder under ../shared that a test reads: skip when it is missing, except
    under CI (CI=true), where a missing input must fail the run."""
    if path.exists():
        return path
    message = f"{path} is missing (../shared beside the checkout)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)
