"""Build driver: setuptools hands the extension cbq_kernels._C to CMake (Ninja generator).

Environment variables:
  CBQ_SKIP_CUDA=1       CPU-only module even when nvcc is found
  CBQ_REQUIRE_CUDA=1    fail when nvcc is not found (CI sets it: a CUDA compile error must fail)
  CBQ_CUDA_ARCHS        CUDA targets, e.g. "90a" or "80;89;90a;90+PTX" (default "80;89;90a")
  CBQ_BUILD_TYPE        CMake build type (default Release)
  CUDACXX / CUDA_HOME   which nvcc to use (default: nvcc on PATH, then /usr/local/cuda)
  CMAKE_BUILD_PARALLEL_LEVEL  parallel compile jobs
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "on", "true", "yes"}


def _find_nvcc() -> str | None:
    if os.environ.get("CUDACXX"):
        return os.environ["CUDACXX"]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('CBQ_BUILD_TYPE', 'Release')}",
            f"-DCBQ_SKIP_CUDA={'ON' if _truthy('CBQ_SKIP_CUDA') else 'OFF'}",
            f"-DCBQ_REQUIRE_CUDA={'ON' if _truthy('CBQ_REQUIRE_CUDA') else 'OFF'}",
        ]
        ninja = shutil.which("ninja")
        if ninja is None:
            try:
                import ninja as ninja_pkg

                ninja = str(Path(ninja_pkg.BIN_DIR) / "ninja")
            except ImportError as err:
                raise RuntimeError(
                    "building cbq_kernels._C needs ninja (pip install ninja)"
                ) from err
        args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        if os.environ.get("CBQ_CUDA_ARCHS"):
            args.append(f"-DCBQ_CUDA_ARCHS={os.environ['CBQ_CUDA_ARCHS']}")
        nvcc = None if _truthy("CBQ_SKIP_CUDA") else _find_nvcc()
        if nvcc:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--verbose"], check=True)
        _smoke_test(Path(self.get_ext_fullpath(ext.name)).resolve())


# Loads the built module in a fresh interpreter and takes an error path. Some toolchains (seen:
# a wrapped GCC 13 that links no libstdc++) build modules whose C++ exceptions crash the
# process; that must fail the build, not the first bad argument a user passes.
_SMOKE = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("cbq_kernels._C", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
try:
    mod.pack_cpu(0, 0, 0, 0, 5)
except ValueError:
    print("cbq_kernels._C smoke test passed, CUDA kernels:", mod.has_cuda())
else:
    raise SystemExit("bad bits were not rejected")
"""


def _smoke_test(module: Path) -> None:
    result = subprocess.run([sys.executable, "-c", _SMOKE, str(module)], check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"the built {module.name} fails its smoke test (exit code {result.returncode}): "
            "a C++ exception raised inside it does not reach Python. The C++ toolchain is "
            "likely broken for extension modules; choose another one with CXX=... "
            "(and CUDAHOSTCXX=...) and rebuild"
        )


setup(ext_modules=[CMakeExtension("cbq_kernels._C")], cmdclass={"build_ext": CMakeBuild})
