"""Exact peak of live tensor bytes on any device: the CPU counterpart of CUDA's
``max_memory_allocated``.

A ``TorchDispatchMode`` sees every tensor an aten op returns: a storage's bytes join the
live total the first time it is seen and leave it when a weak-reference callback says it
was freed; the peak is the live total's maximum. Storages count once however many views
share them; quantized tensor subclasses (quanto's, whose ``.nbytes`` is the DENSE size)
are flattened to the plain tensors they hold. Unlike RSS (glibc keeps freed blocks: 0.86
vs 1.12 of the unquantized run in two runs) it repeats to the byte; torch's private
``MemTracker`` attributes memory to module phases, far more than this needs. It cannot
see scratch memory a kernel allocates and frees inside one op.
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
    sizes = {st.data_ptr(): st.nbytes() for t in tensors for st in (p.untyped_storage() for p in _plain(t))}
    return sum(size for ptr, size in sizes.items() if ptr)


class PeakTracker(TorchDispatchMode):
    """``with PeakTracker() as t: ...`` then ``t.peak`` (bytes above what was live
    before), ``t.live`` (bytes created inside and still alive)."""

    def __init__(self, trace: list | None = None):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.window = 0  # the live total's maximum since open_window()
        # (storage key, bytes) when one is created, (key, 0) when it is freed, in order: the
        # allocation sequence reserved.replay puts through CUDA's allocator rules
        self.trace = trace
        self._sizes: dict[int, int] = {}  # storage data_ptr -> bytes counted
        self._refs: dict[int, weakref.ref] = {}
        self._preexisting: set[int] = set()

    def ignore(self, tensors) -> None:
        """Storages alive before the region (weights, inputs): never counted, even when an
        op returns them."""
        self._preexisting.update(p.untyped_storage().data_ptr() for t in tensors for p in _plain(t))

    def _freed(self, ptr: int, _ref) -> None:
        size = self._sizes.pop(ptr, None)
        self._refs.pop(ptr, None)
        if size is not None:
            self.live -= size
            if self.trace is not None:
                self.trace.append((ptr, 0))

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
            else:
                continue
            if self.trace is not None:
                self.trace += [(ptr, 0)] * (known is not None) + [(ptr, size)]
            self.peak = max(self.peak, self.live)
            self.window = max(self.window, self.live)

    def open_window(self) -> None:
        """Starts a new ``window``: the peak of a part of the region (one forward call)."""
        self.window = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        given = [(st, st.data_ptr()) for leaf in _tensors((*args, *(kwargs or {}).values()))
                 for st in (p.untyped_storage() for p in _plain(leaf))]
        out = func(*args, **(kwargs or {}))
        for st, before in given:  # grown in place (an out= op, resize_): a new block, the old one freed
            if st.data_ptr() != before and before in self._sizes:
                self._freed(before, None)
        # A view or an in-place op returns a storage it was given: not an allocation. lift_fresh
        # returns the storage torch.tensor() just made outside any op: one.
        inputs = set() if func is _LIFT_FRESH else {before for _, before in given}
        for leaf in _tensors((out,)):
            self._see(leaf, inputs)
        return out


_LIFT_FRESH = torch.ops.aten.lift_fresh.default


def _tensors(values):
    """Tensors among aten arguments/results: plain or in one level of list/tuple (torch.cat's):
    aten schemas nest no deeper, and a pytree walk doubled the cost of every op."""
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            for x in v:
                if isinstance(x, torch.Tensor):
                    yield x


def pop_leftover_modes() -> list[str]:
    """Pops every TorchDispatchMode still active between tests and names them: a tracker left
    on (a region that raised) would slow and nest every later run of the process."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack, _pop_mode

    left = [type(mode).__name__ for mode in _get_current_dispatch_mode_stack()]
    for _ in left:
        _pop_mode()
    return left
