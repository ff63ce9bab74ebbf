"""Dropout keep-masks: the compiled SplitMix64 kernel is exactly its numpy reference; the fallback and
the kernel give Bernoulli(1 - p) at the right rate; a failed compile falls back cleanly."""
import numpy as np
import pytest
import torch

from clintune import masks


@pytest.mark.parametrize("dtype", [torch.bool, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("n", [1, 7, 4096, 100_003])
def test_compiled_kernel_is_splitmix64_as_specified(dtype, n):
    if masks.compiled() is None:
        pytest.skip("no C compiler on this machine: the numpy path is tested below")
    torch.manual_seed(4)
    seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    torch.manual_seed(4)
    got = masks.draw(torch.empty(n, dtype=dtype), -26214)
    assert torch.equal(got, torch.from_numpy(masks.reference(n, seed, -26214)).to(dtype))


def test_splitmix64_is_the_published_sequence():
    # SplitMix64 from state 0 (Vigna's reference splitmix64.c): 0xe220a8397b1dcdaf, 0x6e789e6aa1b965f4, ...
    assert [hex(w) for w in masks.splitmix64(2, 0)] == ["0xe220a8397b1dcdaf", "0x6e789e6aa1b965f4"]


@pytest.mark.parametrize("use_kernel", [True, False])
def test_masks_have_the_right_rate_and_repeat_with_the_seed(use_kernel, monkeypatch):
    if not use_kernel:
        monkeypatch.setattr(masks, "_LIB", [None])
    elif masks.compiled() is None:
        pytest.skip("no C compiler")
    thr = int(round(0.1 * 65536)) - 32768
    torch.manual_seed(0)
    a = masks.draw(torch.empty(1000, 1000, dtype=torch.bool), thr)
    torch.manual_seed(0)
    assert torch.equal(masks.draw(torch.empty(1000, 1000, dtype=torch.bool), thr), a)
    assert abs(a.float().mean().item() - 0.9) < 0.002
    lanes = masks.draw(torch.empty(250_000, 4, dtype=torch.int16), 0).float().mean(0)   # each 16-bit lane
    assert (lanes - 0.5).abs().max() < 0.005
    torch.manual_seed(0)
    seed = masks.new_seed()                                     # what draw takes from the generator
    torch.manual_seed(123)
    assert torch.equal(masks.draw(torch.empty(1000, 1000, dtype=torch.bool), thr, seed), a)
    wide = masks.draw(torch.empty(1000, 1000, dtype=torch.int16), thr, seed)  # any width: the same mask
    assert torch.equal(wide.bool(), a)


def test_a_compiler_that_fails_means_numpy(monkeypatch, tmp_path):
    monkeypatch.setenv("CLINTUNE_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    monkeypatch.setattr(masks.shutil, "which", lambda name: "/bin/false" if name == "false" else None)
    monkeypatch.setattr(masks, "_LIB", [])
    assert masks.compiled() is None
    assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob(".*partial"))     # nothing left behind
    out = masks.draw(torch.empty(1000, dtype=torch.int32), 0)
    assert out.dtype == torch.int32 and 400 < int(out.sum()) < 600


def test_the_kernel_is_compiled_once_into_the_kernel_dir(monkeypatch, tmp_path):
    if masks.shutil.which("cc") is None and masks.shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("CLINTUNE_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(masks, "_LIB", [])
    assert masks.compiled() is not None
    built = list(tmp_path.glob("masks-*.so"))
    assert len(built) == 1 and not list(tmp_path.glob(".*partial"))
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(masks, "_LIB", [])
    assert masks.compiled() is not None and built[0].stat().st_mtime_ns == stamp          # reused, not rebuilt


def test_draw_refuses_a_non_contiguous_target():
    with pytest.raises(ValueError):
        masks.draw(torch.empty(4, 4, dtype=torch.int16).t(), 0)
