"""clintune.arena: saved activations in one reused buffer."""
import pytest
import torch

from clintune import arena as arena_mod
from clintune.arena import ALIGN, Arena, saved_empty, saving_into


def _span(t: torch.Tensor) -> tuple[int, int]:
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


def test_tensors_are_aligned_disjoint_and_of_the_asked_shape(monkeypatch):
    monkeypatch.setattr(arena_mod, "CHUNK", 4096)
    a = Arena()
    shapes = [((3, 5), torch.float32), ((7,), torch.bfloat16), ((2, 3, 4), torch.uint8), ((1000,), torch.float32)]
    got = [a.empty(s, d) for s, d in shapes]
    for t, (s, d) in zip(got, shapes):
        assert t.shape == s and t.dtype == d and t.is_contiguous() and t.data_ptr() % ALIGN == 0
    spans = sorted(_span(t) for t in got)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))        # no two overlap
    # 60 + 14 + 24 bytes round up to 64 each; 4,000 did not fit the first 4,096-byte chunk: a new one of its own
    assert a.used == 3 * 64 + 4032 and a.chunks_made == 2


def test_reset_reuses_the_space_and_consolidates_chunks_into_one(monkeypatch):
    monkeypatch.setattr(arena_mod, "CHUNK", 1024)
    a = Arena()
    first = [a.empty((100,), torch.float32) for _ in range(5)]                 # 448 bytes each: 2 a chunk
    assert a.chunks_made == 3 and a.high == 5 * 448
    del first
    a.reset()                                     # nothing alive: the three chunks become one of 2,240 bytes
    assert a.chunks_made == 4 and a.abandoned == 0
    again = [a.empty((100,), torch.float32) for _ in range(5)]
    assert a.chunks_made == 4                    # all five fit the one buffer
    base = again[0].data_ptr()
    assert [t.data_ptr() - base for t in again] == [0, 448, 896, 1344, 1792]
    del again
    a.reset()
    assert a.empty((100,), torch.float32).data_ptr() == base and a.chunks_made == 4


def test_a_live_view_is_never_overwritten():
    """A tensor still held at reset (a graph kept with retain_graph, an exception before backward) keeps its
    values: the arena lets its buffer go and takes a new one."""
    a = Arena()
    kept = a.empty((64,), torch.float32)
    kept.fill_(7.0)
    a.reset()
    assert a.abandoned == 1
    other = a.empty((64,), torch.float32)
    other.fill_(-1.0)
    assert other.data_ptr() != kept.data_ptr() and bool((kept == 7.0).all())


def test_saved_empty_is_torch_empty_outside_the_scope_and_the_arena_inside():
    a = Arena()
    outside = saved_empty((4, 4))
    assert outside.dtype == torch.float32 and a.used == 0
    with saving_into(a):
        inside = saved_empty((4, 4), torch.bfloat16)
        assert a.used == 64 and inside.dtype == torch.bfloat16
        del inside
    assert a.used == 0 and a.abandoned == 0          # reset on leaving
    with saving_into(None):
        saved_empty((2,))
    assert a.used == 0


def test_saved_tensors_survive_writes_into_their_neighbours_through_autograd():
    """Each handed-out tensor has its own version counter: torch ops writing the next tensor in the same buffer
    are not in-place changes of the saved ones (autograd would refuse the backward pass)."""

    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            kept = saved_empty(x.shape, x.dtype)
            kept.copy_(x)                               # a torch op writing into the arena
            ctx.save_for_backward(kept)
            return x * x

        @staticmethod
        def backward(ctx, g):
            (kept,) = ctx.saved_tensors
            return 2 * kept * g

    a = Arena()
    x = torch.randn(3, 8, requires_grad=True)
    with saving_into(a):
        y = Square.apply(Square.apply(x) + 1.0)       # the second forward writes the buffer after the first saved
        y.sum().backward()
    want = 2 * (x * x + 1) * 2 * x
    torch.testing.assert_close(x.grad, want.detach())
    assert a.high == 2 * 128 and a.abandoned == 0    # both kept tensors let go by the backward pass: reused next


def test_release_lets_the_buffers_go():
    a = Arena()
    a.empty((10,), torch.float32)
    a.release()
    assert a.used == 0 and a._chunks == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_zero_sized_tensors(dtype):
    a = Arena()
    t = a.empty((0, 5), dtype)
    assert t.shape == (0, 5) and a.used == ALIGN
