"""The build itself: CBQ_SKIP_CUDA=1 gives a CPU-only module that still works."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_skip_cuda_builds_cpu_only_module(tmp_path):
    env = {**os.environ, "CBQ_SKIP_CUDA": "1"}
    subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
         "--build-temp", str(tmp_path / "tmp")],
        cwd=ROOT, env=env, check=True, capture_output=True,
    )  # fmt: skip
    (module,) = (tmp_path / "lib" / "cbq_kernels").glob("_C*.so")
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('cbq_kernels._C', sys.argv[1])\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(m.has_cuda(), hasattr(m, 'pack_cuda'), m.format_version())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(module)], capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "False", "1"]
