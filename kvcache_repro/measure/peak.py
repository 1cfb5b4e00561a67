"""Exact peak of live tensor bytes on any device: the CPU counterpart of CUDA's
``max_memory_allocated``.

A ``TorchDispatchMode`` sees every tensor an aten op returns. The first time it sees a
storage it adds the storage's bytes to the live total, and a weak-reference callback
subtracts them when the storage is freed; the maximum of the live total is the peak.
Storages are counted once however many views share them, and quantized tensor
subclasses (quanto's ``WeightQBitsTensor``, whose ``.nbytes`` is the DENSE size) are
flattened to the plain tensors they hold.

Why not RSS: glibc keeps freed blocks, so peak RSS of the same run moved from 0.86 to
1.12 of the unquantized run between two runs here; live storage bytes do not depend on
the allocator and repeat to the byte. Why not torch's own ``MemTracker``
(torch.distributed._tools.mem_tracker): it attributes memory to nn.Module phases and
optimizer state through module hooks, far more than this needs, and it is a private
module that has moved between releases.

What it cannot see: scratch memory an aten kernel allocates and frees inside one op
(e.g. inside a fused attention kernel). CUDA's counter would see those; this one counts
what is visible at op boundaries, which includes every tensor the cache and the model's
Python code create.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _plain(t: torch.Tensor) -> list[torch.Tensor]:
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [p for name in names for p in _plain(getattr(t, name))]
    return [t]


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (subclasses flattened)."""
    seen, total = set(), 0
    for t in tensors:
        for p in _plain(t):
            st = p.untyped_storage()
            if st.data_ptr() and st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
    return total


class PeakTracker(TorchDispatchMode):
    """``with PeakTracker() as t: ...`` then ``t.peak`` (bytes above what was live
    before), ``t.live`` (bytes created inside and still alive)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}  # storage data_ptr -> bytes counted
        self._refs: dict[int, weakref.ref] = {}
        self._preexisting: set[int] = set()

    def ignore(self, tensors) -> None:
        """Storages alive before the region (weights, inputs): never counted, even when
        an op returns them (in-place ops return their input)."""
        for t in tensors:
            for p in _plain(t):
                self._preexisting.add(p.untyped_storage().data_ptr())

    def _freed(self, ptr: int, _ref) -> None:
        size = self._sizes.pop(ptr, None)
        self._refs.pop(ptr, None)
        if size is not None:
            self.live -= size

    def _see(self, t: torch.Tensor, inputs: set[int]) -> None:
        for p in _plain(t):
            if p.device.type == "meta":
                continue
            st = p.untyped_storage()
            ptr, size = st.data_ptr(), st.nbytes()
            if not ptr or ptr in self._preexisting or (ptr in inputs and ptr not in self._sizes):
                continue
            known = self._sizes.get(ptr)
            if known is None:
                self._sizes[ptr] = size
                self._refs[ptr] = weakref.ref(st, lambda ref, ptr=ptr: self._freed(ptr, ref))
                self.live += size
            elif known != size:  # resized in place (out= ops)
                self._sizes[ptr] = size
                self.live += size - known
            self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # A view or an in-place op returns a storage it was given: not an allocation
        # (and a weight's storage must not become "new" because linear() took its .t()).
        inputs = {p.untyped_storage().data_ptr() for leaf in _tensors(args) for p in _plain(leaf)}
        if kwargs:
            inputs.update(p.untyped_storage().data_ptr() for leaf in _tensors(kwargs.values()) for p in _plain(leaf))
        for leaf in _tensors((out,)):
            self._see(leaf, inputs)
        return out


def _tensors(values):
    """Tensors among aten arguments/results: plain values or one level of list/tuple
    (torch.cat's list) - aten schemas nest no deeper; cheaper than a pytree walk, which
    doubled the cost of every op."""
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            for x in v:
                if isinstance(x, torch.Tensor):
                    yield x


def pop_leftover_modes() -> list[str]:
    """Pops every TorchDispatchMode still active between tests and names them. A tracker
    left on (a region that raised without ending it) sees every later op of the process:
    later runs get several times slower and every later peak is measured inside it."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack, _pop_mode

    left = [type(mode).__name__ for mode in _get_current_dispatch_mode_stack()]
    for _ in left:
        _pop_mode()
    return left
