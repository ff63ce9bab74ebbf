"""clintune.blocks: large CPU blocks mapped once and reused while training."""
import pytest
import torch

from clintune import blocks

MB = 1 << 20


@pytest.fixture
def cache():
    if blocks.compiled() is None:
        pytest.skip("no C++ compiler or PyTorch headers: the block cache is not built")
    assert blocks.install(min_block=MB, fit=4.0, limit=3 * MB)
    try:
        yield
    finally:
        blocks.uninstall()


def _delta(before: dict, key: str) -> float:
    return blocks.stats()[key] - before[key]


def test_large_blocks_are_mapped_kept_and_reused(cache):
    s0 = blocks.stats()
    a = torch.empty(MB // 4 * 2, dtype=torch.float32)                 # 2 MiB: the cache's
    a.fill_(3.0)
    assert _delta(s0, "mappings") == 1 and _delta(s0, "mapped_mb") == 2.0
    ptr = a.data_ptr()
    del a
    assert _delta(s0, "kept_mb") == 2.0
    b = torch.empty(MB // 4 * 2 - 100, dtype=torch.float32)          # fits the kept block: no new mapping
    assert b.data_ptr() == ptr and _delta(s0, "reused") == 1 and _delta(s0, "mappings") == 1
    b.copy_(torch.arange(b.numel(), dtype=torch.float32))
    assert float(b[-1]) == b.numel() - 1


def test_small_blocks_and_too_large_kept_ones_are_not_used(cache):
    s0 = blocks.stats()
    small = torch.empty(1000)                                       # glibc's, as before
    assert blocks.stats() == s0 and small.numel() == 1000
    big = torch.empty(2 * MB, dtype=torch.uint8)
    del big                                                          # a kept 2 MiB block
    tiny = torch.empty(MB // 2 // 4 * 4 + MB // 4 * 4, dtype=torch.uint8)   # 1.5 MiB: fits within fit=4 of it
    assert _delta(s0, "reused") == 1
    del tiny
    huge = torch.empty(9 * MB, dtype=torch.uint8)                  # more than the kept one: a new mapping
    assert _delta(s0, "mappings") == 2
    del huge                                                         # 9 MiB kept would pass the 3 MiB limit
    assert _delta(s0, "unmapped") == 1 and blocks.stats()["kept_mb"] <= 3.0


def test_uninstall_unmaps_what_is_kept_and_later_frees():
    if blocks.compiled() is None:
        pytest.skip("no C++ compiler or PyTorch headers: the block cache is not built")
    assert blocks.install(min_block=MB, fit=4.0, limit=64 * MB)
    assert not blocks.install()                                     # once
    s0 = blocks.stats()
    kept, alive = torch.empty(4 * MB, dtype=torch.uint8), torch.ones(2 * MB, dtype=torch.uint8)
    del kept
    assert blocks.uninstall() and not blocks.uninstall()
    s1 = blocks.stats()
    assert s1["kept_mb"] == 0 and s1["mapped_mb"] - s0["mapped_mb"] == 2.0      # only the live block is mapped
    assert int(alive.sum()) == 2 * MB                                # still readable
    after = torch.empty(4 * MB, dtype=torch.uint8)                  # glibc's again
    del alive, after
    assert blocks.stats()["mapped_mb"] == s0["mapped_mb"]


def test_a_training_step_gets_the_same_gradients_with_and_without_it(cache):
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 512))
    x = torch.randn(1024, 512)

    def grads():
        lin.zero_grad(set_to_none=True)
        lin(x).square().mean().backward()
        return [p.grad.clone() for p in lin.parameters()]

    with_cache = grads()
    assert blocks.stats()["reused"] + blocks.stats()["mappings"] > 0
    blocks.uninstall()
    without = grads()
    assert all(torch.equal(a, b) for a, b in zip(with_cache, without))
