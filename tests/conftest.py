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


def need_shared(path):
    """A file or folder under ../shared that a test reads: skip when it is missing, except
    under CI (CI=true), where a missing input must fail the run."""
    if path.exists():
        return path
    message = f"{path} is missing (../shared beside the checkout)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)
