"""cbq_kernels: Triton and CUDA kernels for CBQ quantization (calibration and inference).

Importing this package needs neither the compiled extension ``cbq_kernels._C`` nor a GPU;
an op that needs the extension raises :class:`ExtensionNotBuiltError` when called.
"""

from cbq_kernels.formats import FORMAT_VERSION
from cbq_kernels.packing import (
    ExtensionNotBuiltError,
    dequantize,
    dequantize_ref,
    pack,
    pack_ref,
    unpack,
    unpack_ref,
)

__all__ = [
    "FORMAT_VERSION",
    "ExtensionNotBuiltError",
    "dequantize",
    "dequantize_ref",
    "pack",
    "pack_ref",
    "unpack",
    "unpack_ref",
]
__version__ = "0.1.0"
