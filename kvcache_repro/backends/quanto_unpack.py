"""Opt-in: quanto's ``unpack`` on CUDA through quanto's own Python reference, so the first
CUDA dequantize does not JIT-build the whole ``quanto_cuda`` extension.

optimum-quanto 0.2.7's CUDA ``quanto::unpack`` is ``ext.lib.unpack``, and the first access to
``ext.lib`` builds all 8 sources of ``quanto_cuda`` with nvcc: minutes. The KV cache reaches no
other quanto CUDA op (quantizing is Python; the AWQ / Marlin subclasses are for 2-D weights only,
K/V are 4-D). So ``ext._lib``, which ``Extension.lib`` returns without building, becomes a stand-in
whose ``unpack`` is quanto's Python reference and whose other attributes raise. All else stays
quanto's (bitwise equal: tests/test_device_run.py); affected measurements carry ``NOTE``.

Enable with ``KVQ_QUANTO_PY_UNPACK=1`` (``./kvq device-run`` sets it unless ``--quanto-cuda-kernel``).
"""
from __future__ import annotations

import os

ENV = "KVQ_QUANTO_PY_UNPACK"
NOTE = ("quanto unpack on CUDA: quanto's Python reference (optimum/quanto/library/unpack.py), not the "
        "JIT-built quanto_cuda kernel (KVQ_QUANTO_PY_UNPACK=1)")


class PythonUnpackLib:
    """Stands in for a compiled quanto extension module: ``unpack`` only."""

    def __init__(self, extension_name: str):
        self.extension_name = extension_name

    @staticmethod
    def unpack(packed, bits: int):
        """quanto's Python reference for ``quanto::unpack`` as in optimum-quanto 0.2.7
        ``library/unpack.py`` (Apache-2.0; not importable: its decorator binds the name to None).
        Packed byte row i holds value rows i, i + R, ... in its successive ``bits``-wide fields
        (R = rows of ``packed``): field k goes to output rows k*R .. (k+1)*R - 1."""
        import torch

        unpacked = []
        for i in range(8 // bits):
            mask = 2 ** (bits * (i + 1)) - 1
            unpacked.append((packed & mask) >> (bits * i))
        return torch.cat(unpacked).to(torch.uint8)

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


def install_if_requested() -> str | None:
    """Install on CUDA when requested; the note to record, or None when nothing changed."""
    if os.environ.get(ENV, "") not in ("", "0") and install("quanto_cuda"):
        return NOTE
    return None
