"""Saved activations in one reused buffer: training's heap without their holes (issue 7).

A training step keeps tensors for its backward pass (attention probabilities, LayerNorm inputs, GELU's
derivative, LoRA's dropped inputs: some 415 MB at 16 x 256 tokens of MiniLM) between temporaries of other
sizes that come and go. glibc's heap places both wherever they fit, and the holes the temporaries leave between
kept blocks stay resident: measured on LoRA MiniLM, micro-batches of 4,096 tokens, glibc's heap grew to about
960 MB for a peak of 629 MB in use (an ``LD_PRELOAD`` counter of ``malloc_usable_size``), a third of it holes.

An :class:`Arena` hands the fused steps' saved tensors out of one buffer by bumping an offset, and starts
again at its beginning for the next micro-batch, once the backward pass has let them all go. The heap is left
with the temporaries, which come and go in order and reuse their own space. The buffer grows to the largest
micro-batch's needs (fresh chunks while it grows, one buffer of the high-water mark after), so it costs what
the saved tensors cost and nothing more. Outside :func:`saving_into` (prediction, validation, anything not
training) :func:`saved_empty` is ``torch.empty``.

Safety: a handed-out tensor is a view with its own version counter (``.data``), so a kernel writing the next
layer's tensors into the same buffer never looks like an in-place change to autograd; and :meth:`Arena.reset`
reuses the buffer only when the storage's use count says no view of it is alive (a graph kept with
``retain_graph``, an exception between forward and backward): otherwise it lets the buffer go to whoever
still holds it and starts a new one.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch

ALIGN = 64                # bytes: every tensor starts on a cache line, as torch.empty's do
CHUNK = 64 << 20          # a growing arena's new chunks: above glibc's mmap threshold (fast.reuse_freed_memory)


def _uses(buf: torch.Tensor) -> int:
    """How many tensors share ``buf``'s storage (views included), or -1 where PyTorch cannot say."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return -1 if count is None else int(count(buf.untyped_storage()._cdata))


class Arena:
    """A bump allocator over reusable byte buffers for tensors that live from a forward pass to its backward.

    ``empty(shape, dtype)`` returns an uninitialised tensor (as ``torch.empty``) carved from the current
    buffer; ``reset()`` after the backward pass makes the space reusable; ``release()`` gives it all back.
    ``high`` is the most bytes one forward-backward used, ``chunks_made`` how many buffers were allocated.
    """

    def __init__(self) -> None:
        self._chunks: list[tuple[torch.Tensor, int]] = []      # (uint8 buffer, its storage's own use count)
        self._i = self._off = self.used = self.high = 0
        self.chunks_made = self.abandoned = 0

    def _new(self, nbytes: int) -> tuple[torch.Tensor, int]:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        self.chunks_made += 1
        return buf, _uses(buf)

    def empty(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        shape = tuple(shape)
        n = math.prod(shape) * dtype.itemsize
        size = -(-max(n, 1) // ALIGN) * ALIGN
        while True:
            if self._i < len(self._chunks):
                buf = self._chunks[self._i][0]
                if self._off + size <= buf.numel():
                    t = buf[self._off:self._off + n].view(dtype).view(shape).data    # .data: its own version counter
                    self._off += size
                    self.used += size
                    self.high = max(self.high, self.used)
                    return t
                self._i, self._off = self._i + 1, 0                 # the rest of this chunk stays unused this time
                continue
            self._chunks.append(self._new(max(size, CHUNK)))

    def reset(self) -> None:
        """Make the buffers reusable: after a backward pass has let go of what its forward saved. If any view is
        still alive the buffers are left to their holders and fresh ones made next time; if the last pass
        needed more than one chunk, the chunks become one buffer of the high-water mark."""
        if any(base < 0 or _uses(buf) > base for buf, base in self._chunks):
            self._chunks = []
            self.abandoned += 1
        elif len(self._chunks) > 1:
            self._chunks = []                                       # freed (unmapped) before the one buffer
            self._chunks = [self._new(self.high)]
        self._i = self._off = self.used = 0

    def release(self) -> None:
        """Let every buffer go (training is over)."""
        self._chunks = []
        self._i = self._off = self.used = 0

    def report(self) -> dict:
        return {"high_mb": round(self.high / 2 ** 20, 3), "buffers_made": self.chunks_made,
                "abandoned": self.abandoned}


_ACTIVE: Arena | None = None


def saved_empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised tensor that a forward pass keeps for its backward: from the active :class:`Arena`
    inside :func:`saving_into`, else ``torch.empty``. (Not keyed on grad mode: autograd functions' forwards
    run without it.)"""
    if _ACTIVE is not None:
        return _ACTIVE.empty(shape, dtype)
    return torch.empty(shape, dtype=dtype)


@contextlib.contextmanager
def saving_into(arena: Arena | None) -> Iterator[None]:
    """Within: :func:`saved_empty` carves from ``arena`` (nothing changes for None). Wrap one forward pass and
    its backward; on leaving, the arena is reset for the next."""
    global _ACTIVE
    if arena is None:
        yield
        return
    prev, _ACTIVE = _ACTIVE, arena
    try:
        yield
    finally:
        _ACTIVE = prev
        arena.reset()
