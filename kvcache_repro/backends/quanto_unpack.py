"""Opt-in: quanto's ``unpack`` on CUDA through quanto's own Python reference, so the first
CUDA dequantize does not JIT-build the whole ``quanto_cuda`` extension.

Why: optimum-quanto 0.2.7 registers ``quanto::unpack`` for CUDA as
``ext.lib.unpack`` (library/extensions/cuda/__init__.py); the first access to
``ext.lib`` builds, with nvcc, all 8 sources of ``quanto_cuda`` (unpack, AWQ GEMM/GEMV,
Marlin): minutes on a budget of minutes. The KV cache path reaches no other quanto CUDA
op: transformers' ``QuantoQuantizedLayer`` quantizes with ``quantize_weight`` (the
``quanto::quantize_affine`` op has only a "default" Python implementation) and
dequantizes with ``WeightQBitsTensor.dequantize`` -> ``PackedTensor.unpack`` ->
``torch.ops.quanto.unpack``. The AWQ / Marlin / TinyGemm subclasses are chosen by
``WeightQBitsTensor.create`` only for 2-D weights (``len(size) == 2``); K/V tensors are
4-D, so the cache always holds a plain ``WeightQBitsTensor``.

How: the extension object gets a stand-in ``lib`` (``ext._lib``, which ``Extension.lib``
returns without building once it is set) whose ``unpack`` is quanto's own Python
reference implementation (``python_unpack``, the op's "default" kernel in
``optimum/quanto/library/unpack.py``, reproduced here because that module's name is
bound to None by its decorator). Every other attribute raises, so an unexpected use of another kernel fails loudly
instead of silently building. quanto remains the code under test: quantization, packing,
grouping, scales and dequantization are all quanto's; only the bit-unpacking kernel is
its Python version instead of its CUDA one (bitwise equal: tests/test_device_run.py
checks the same mechanism against quanto's C++ kernel on CPU).

Cost: the Python unpack materializes a few uint8 temporaries the size of the packed data
(the CUDA kernel writes the unpacked tensor directly), a small share of the dequantized
fp16 copy made at each step anyway; every affected measurement carries ``NOTE``.

Enable with ``KVQ_QUANTO_PY_UNPACK=1`` (``./kvq device-run`` sets it unless
``--quanto-cuda-kernel``).
"""
from __future__ import annotations

import os

ENV = "KVQ_QUANTO_PY_UNPACK"
NOTE = ("quanto unpack on CUDA: quanto's Python reference (optimum/quanto/library/unpack.py), not the "
        "JIT-built quanto_cuda kernel (KVQ_QUANTO_PY_UNPACK=1)")


def requested() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def python_unpack(packed, bits: int):
    """quanto's own Python reference for ``quanto::unpack``, as written in optimum-quanto
    0.2.7 ``library/unpack.py`` (Apache-2.0; the "default" kernel of the op; the module's
    name ``unpack`` is not importable: the decorator there returns None). Packed byte row
    i holds value rows i, i + R, ... in its successive ``bits``-wide fields (R = rows of
    ``packed``): field k goes to output rows k*R .. (k+1)*R - 1."""
    import torch

    unpacked = []
    for i in range(8 // bits):
        mask = 2 ** (bits * (i + 1)) - 1
        unpacked.append((packed & mask) >> (bits * i))
    return torch.cat(unpacked).to(torch.uint8)


class PythonUnpackLib:
    """Stands in for a compiled quanto extension module: ``unpack`` only."""

    def __init__(self, extension_name: str):
        self.extension_name = extension_name

    @staticmethod
    def unpack(packed, bits: int):
        return python_unpack(packed, bits)

    def __getattr__(self, name):
        raise RuntimeError(f"{self.extension_name}.{name} was called with {ENV}=1, which replaces only "
                           f"`unpack`; unset {ENV} to build the real {self.extension_name} extension")


def install(extension_name: str = "quanto_cuda") -> bool:
    """Give quanto's ``extension_name`` extension the Python ``unpack``. False when that
    extension is not registered (no CUDA here, or quanto not installed)."""
    try:
        from optimum.quanto.library.extensions import extension as quanto_extension
    except ImportError:
        return False
    if not quanto_extension.is_extension_available(extension_name):
        return False
    ext = quanto_extension.get_extension(extension_name)
    if ext._lib is None or isinstance(ext._lib, PythonUnpackLib):
        ext._lib = PythonUnpackLib(extension_name)
        return True
    raise RuntimeError(f"{extension_name} is already built and loaded in this process: {ENV} must be set "
                       f"before the first quanto dequantize")


def uninstall(extension_name: str) -> None:
    from optimum.quanto.library.extensions import extension as quanto_extension

    ext = quanto_extension.get_extension(extension_name)
    if isinstance(ext._lib, PythonUnpackLib):
        ext._lib = None


def install_if_requested() -> str | None:
    """Install on CUDA when requested; the note to record, or None when nothing changed."""
    if requested() and install("quanto_cuda"):
        return NOTE
    return None
