"""Dropout keep-masks: the compiled SplitMix64 kernel is exactly its numpy reference; the fallback and
the kernel give Bernoulli(1 - p) at the right rate; a failed compile falls back cleanly."""
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


@pytest.mark.parametrize("openmp", [True, False])
def test_the_kernel_is_compiled_once_into_the_kernel_dir(monkeypatch, tmp_path, openmp):
    """Built once and reused, with PyTorch's OpenMP runtime or without (one thread, the same results)."""
    if masks.shutil.which("cc") is None and masks.shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    monkeypatch.delenv("CLINTUNE_NO_KERNELS", raising=False)
    monkeypatch.setenv("CLINTUNE_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(masks, "_LIB", [])
    if not openmp:
        monkeypatch.setattr(masks, "_torch_openmp", lambda: False)
    assert masks.compiled() is not None
    scores = torch.randn(2, 3, 7, 7).bfloat16()
    probs, kept = torch.empty_like(scores), torch.empty_like(scores)
    masks.softmax_keep(scores, probs, kept, 0, 5, 0)
    torch.testing.assert_close(probs.float(), torch.softmax(scores.float(), -1), rtol=2 ** -7, atol=0)
    built = list(tmp_path.glob("masks-*.so"))
    assert len(built) == 1 and not list(tmp_path.glob(".*partial"))
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(masks, "_LIB", [])
    assert masks.compiled() is not None and built[0].stat().st_mtime_ns == stamp          # reused, not rebuilt


@pytest.mark.parametrize("arch", [("-march=x86-64",), ("-march=x86-64-v3",)])
def test_the_kernels_build_and_load_for_cpus_without_avx512(monkeypatch, tmp_path, arch):
    """Built for an older CPU (no AVX-512: the wide kernels compiled out), the library still declares every
    function the Python side gives a signature to (a stub that says "not here" where a kernel is missing), and
    its mask stream is the same; the AVX-512 and AMX kernels say they do not run."""
    if masks.shutil.which("cc") is None and masks.shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    monkeypatch.delenv("CLINTUNE_NO_KERNELS", raising=False)
    monkeypatch.setenv("CLINTUNE_KERNEL_DIR", str(tmp_path))
    lib = masks._compile(arch)
    assert lib is not None
    assert not lib.lora_kernels_available() and not lib.attention_bf16_available()
    assert not lib.attention_amx_available() and not lib.attention_int8_available()
    out = torch.empty(1000, dtype=torch.int32)
    lib.keep_i32(out.data_ptr(), out.numel(), 5, -26214)
    want = torch.from_numpy(masks.reference(out.numel(), 5, -26214)).to(torch.int32)
    assert torch.equal(out, want)


def test_draw_refuses_a_non_contiguous_target():
    with pytest.raises(ValueError):
        masks.draw(torch.empty(4, 4, dtype=torch.int16).t(), 0)


def _needs_kernel():
    if masks.compiled() is None:
        pytest.skip("no C compiler: attention uses PyTorch's softmax (tested in test_fast.py)")


@pytest.mark.parametrize("t", [1, 9, 37, 256])
def test_fused_softmax_keep_is_softmax_then_the_row_padded_mask(t):
    """P equals torch's bf16 softmax up to one rounding step (and exactly almost everywhere); P m is P where
    attention_keep keeps, +0 elsewhere, bit for bit; masked (-inf) keys get exactly 0; rows are independent,
    so the tensor in two calls (row0 set) is the tensor in one, on any number of threads."""
    _needs_kernel()
    g = torch.Generator().manual_seed(0)
    scores = (torch.randn(3, 4, t, t, generator=g) * 4).bfloat16()
    scores[1, :, :, t // 2 + 1:] = float("-inf")
    probs, kept = torch.empty_like(scores), torch.empty_like(scores)
    thr, seed = int(round(0.2 * 65536)) - 32768, 987654321
    masks.softmax_keep(scores, probs, kept, 0, seed, thr)
    want = torch.softmax(scores.float(), -1)
    assert ((probs.float() - want).abs() <= want * 2 ** -7 + 1e-30).all()     # within one bf16 step
    assert (probs == want.bfloat16()).float().mean() > 0.99
    assert (probs[1, :, :, t // 2 + 1:] == 0).all()
    keep = masks.attention_keep(scores.shape, thr, torch.int16, seed)
    assert torch.equal(kept.view(torch.int16), probs.view(torch.int16) * keep)
    if t >= 9:
        assert 0.75 < keep.float().mean() < 0.85
    rows = 3 * 4 * t
    half = rows // 2
    p2, k2 = torch.empty_like(scores), torch.empty_like(scores)
    flat = lambda x: x.view(rows, t)                                              # noqa: E731
    masks.softmax_keep(flat(scores)[:half], flat(p2)[:half], flat(k2)[:half], 0, seed, thr)
    masks.softmax_keep(flat(scores)[half:], flat(p2)[half:], flat(k2)[half:], half, seed, thr)
    assert torch.equal(p2, probs) and torch.equal(k2, kept)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        masks.softmax_keep(scores, p2, k2, 0, seed, thr)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(p2, probs) and torch.equal(k2, kept)


@pytest.mark.parametrize("t", [5, 64])
def test_fused_softmax_keep_backward_is_dropout_then_softmax_gradient(t):
    _needs_kernel()
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 3, t, t, generator=g).bfloat16()
    probs, kept = torch.empty_like(scores), torch.empty_like(scores)
    thr, seed = int(round(0.1 * 65536)) - 32768, 42
    masks.softmax_keep(scores, probs, kept, 0, seed, thr)
    grad = torch.randn(scores.shape, generator=g).bfloat16()
    keep = masks.attention_keep(scores.shape, thr, torch.int16, seed).double()
    gm = grad.double() * keep
    want = probs.double() * (gm - (gm * probs.double()).sum(-1, keepdim=True))   # the formula, in float64
    d_s, again = grad.clone(), torch.empty_like(scores)
    masks.softmax_keep_backward(d_s, probs, again, 0, seed, thr)
    assert torch.equal(again, kept)                                              # the forward's P m, redrawn
    torch.testing.assert_close(d_s.double(), want, rtol=2 ** -7, atol=1e-3 * want.abs().max().item())
    torch.testing.assert_close(d_s, torch._softmax_backward_data((grad.double() * keep).bfloat16(), probs, -1,
                                                                 torch.bfloat16), rtol=2 ** -7, atol=1e-3)


def test_fused_kernels_refuse_what_they_cannot_do():
    _needs_kernel()
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="bf16"):
        masks.softmax_keep(x, x, x, 0, 1, 0)
    assert masks.fused_softmax_available(256) and not masks.fused_softmax_available(masks.MAX_ROW + 1)


def _ref_dropout(x, y_dtype, seed, thr, scale):
    """The unfused dropout (fast._Dropout's fallback): the mask drawn as integers, a product, then zeroing."""
    from clintune import fast

    keep = masks.draw(torch.empty(x.shape, dtype=fast._BITS[y_dtype]), thr, seed)
    y = torch.mul(x, scale, out=torch.empty(x.shape, dtype=y_dtype))
    return fast.zero_dropped(y, keep, inplace=True)


@pytest.mark.parametrize("shape", [(1,), (7,), (4097,), (3, 5, 4099)])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                    (torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_dropout_kernel_is_the_unfused_dropout_bit_for_bit(shape, dtypes):
    """One pass (mask drawn inline, element k from word k / 4) gives the bits of draw + product + zeroing, for
    pieces that end inside a word and tensors of several pieces, on one thread or two; NaN stays NaN."""
    _needs_kernel()
    x_dtype, y_dtype = dtypes
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(x_dtype)
    x.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -0.0])[: x.numel()]
    thr, seed, scale = int(round(0.25 * 65536)) - 32768, 1234567, 1.0 / 0.75
    got = masks.dropout(x, torch.empty(shape, dtype=y_dtype), seed, thr, scale)
    if x_dtype == torch.bfloat16 and y_dtype == torch.float32:            # the backward pass: fp32 product
        from clintune import fast

        keep = masks.draw(torch.empty(shape, dtype=torch.int16), thr, seed)
        want = fast.zero_dropped(x, keep).float().mul_(scale)
    else:
        want = _ref_dropout(x, y_dtype, seed, thr, scale)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    if x.numel() > 1000:
        assert 0.2 < (got == 0).float().mean() < 0.3
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        again = masks.dropout(x, torch.empty(shape, dtype=y_dtype), seed, thr, scale)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(again, got, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("n", [5, 37, 384])
def test_dropout_add_norm_is_dropout_then_the_sum_then_layernorm(n):
    """z = drop(h) + r exactly as unfused; y = LayerNorm(z) within fp32 rounding of torch's; gradients as
    autograd's through torch's ops with the same mask: dr within fp32 rounding, dh the same bf16 values except
    where a one-ulp difference in dz crosses a rounding boundary. Rows whose length is not a multiple of 4 start
    inside a mask word."""
    _needs_kernel()
    from clintune import fast

    g = torch.Generator().manual_seed(0)
    rows = 2 * 13
    h = (torch.randn(2, 13, n, generator=g) * 3).bfloat16()
    r = torch.randn(2, 13, n, generator=g)
    w, b = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g) * 0.1
    p, seed, eps = 0.1, 777, 1e-12
    thr, scale = fast._threshold(p), 1.0 / (1.0 - p)
    y, z, stats = masks.dropout_add_norm(h, r, w, b, eps, seed, thr, scale)
    dropped = _ref_dropout(h, torch.bfloat16, seed, thr, scale)
    assert torch.equal(z, dropped.float() + r)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(z, (n,), w, b, eps), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats[:, 0], z.view(rows, n).mean(1), rtol=1e-5, atol=1e-6)

    keep = masks.draw(torch.empty(h.shape, dtype=torch.int16), thr, seed)

    class RefDrop(torch.autograd.Function):                                 # fast._Dropout's fallback, this mask
        @staticmethod
        def forward(ctx, x):
            return fast.zero_dropped(torch.mul(x, scale), keep)

        @staticmethod
        def backward(ctx, grad):
            return fast.zero_dropped(grad, keep).mul_(scale)

    h1, r1 = h.clone().requires_grad_(), r.clone().requires_grad_()
    dy = torch.randn(h.shape, generator=g)
    torch.nn.functional.layer_norm(RefDrop.apply(h1) + r1, (n,), w, b, eps).backward(dy)
    dh, dr = masks.dropout_add_norm_backward(dy, z, stats, w, seed, thr, scale)
    torch.testing.assert_close(dr, r1.grad, rtol=1e-4, atol=1e-5)
    assert dh.dtype == torch.bfloat16 and torch.equal(dh == 0, h1.grad == 0)
    assert (dh == h1.grad).float().mean() > 0.99
    torch.testing.assert_close(dh.float(), h1.grad.float(), rtol=2 ** -7, atol=1e-5)
    dh2, none = masks.dropout_add_norm_backward(dy, z, stats, w, seed, thr, scale, need_residual=False)
    assert none is None and torch.equal(dh2, dh)


def test_gelu_and_grad_is_exact_gelu_and_its_derivative_to_bf16():
    """GELU(x) = x Phi(x) and Phi(x) + x phi(x) against float64, over bf16 inputs from -12 to 12: within one bf16
    rounding step of the true value (plus 1e-6 near the zeros), and equal to torch's bf16 GELU almost everywhere
    in [-4, 4]."""
    _needs_kernel()
    x = torch.linspace(-12, 12, 200_001).bfloat16()
    y, d = masks.gelu_and_grad(x)
    xd = x.double()
    want_y = torch.nn.functional.gelu(xd)
    want_d = torch.ops.aten.gelu_backward(torch.ones_like(xd), xd)
    assert ((y.double() - want_y).abs() <= want_y.abs() * 2 ** -8 + 1e-6).all()
    assert ((d.double() - want_d).abs() <= want_d.abs() * 2 ** -8 + 1e-6).all()
    body = x.abs() <= 4                            # beyond, torch's bf16 GELU rounds x Phi(x) to 0 (erf(x) = -1)
    assert (y[body] == torch.nn.functional.gelu(x)[body]).float().mean() > 0.97
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).bfloat16()
    assert torch.equal(masks.mul(grad, d), (grad.float() * d.float()).bfloat16())


@pytest.mark.parametrize("n", [5, 37, 384])
def test_add_norm_is_the_sum_then_layernorm(n):
    """Prediction's sublayer end: LayerNorm(h + r) with the sum exact and the LayerNorm within fp32 rounding of
    torch's; the same values as the training kernel with every element kept (p = 0)."""
    _needs_kernel()
    g = torch.Generator().manual_seed(1)
    h = (torch.randn(3, 11, n, generator=g) * 3).bfloat16()
    r = torch.randn(3, 11, n, generator=g)
    w, b = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g) * 0.1
    y = masks.add_norm(h, r, w, b, 1e-12)
    assert y.dtype == torch.float32 and y.shape == h.shape
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(h.float() + r, (n,), w, b, 1e-12),
                               rtol=1e-5, atol=1e-5)
    kept, _, _ = masks.dropout_add_norm(h, r, w, b, 1e-12, 5, -32768, 1.0)
    assert torch.equal(y, kept)
    y2, yb = masks.add_norm(h, r, w, b, 1e-12, bf16_copy=True)      # and its bf16 rounding from the same pass
    assert torch.equal(y2, y) and yb.dtype == torch.bfloat16 and torch.equal(yb, y.bfloat16())
    codes = masks.affine_u8(-1.5, 1.0)                               # narrower than y: both ends clip
    y3, q = masks.add_norm(h, r, w, b, 1e-12, codes=codes)          # its uint8 codes from the same pass
    assert torch.equal(y3, y) and torch.equal(q, masks.quantize_u8(y, codes)[0])
    assert bool((q == 0).any()) and bool((q == 255).any())
    with pytest.raises(ValueError, match="not both"):
        masks.add_norm(h, r, w, b, 1e-12, bf16_copy=True, codes=codes)
    with pytest.raises(ValueError, match="r must be"):
        masks.add_norm(h, r.bfloat16(), w, b, 1e-12)


@pytest.mark.parametrize("n", [37, 384])
def test_sixteen_row_blocks_give_each_row_its_own_bits(n):
    """The LayerNorm kernels take 16 rows at a time (their sums side by side in vector lanes); each row must get
    the very bits it gets alone (one row: the one-row path, its own chains of sums): y, z and the stats under
    dropout, the bf16 copy and the uint8 codes, on rows of very different scales, three blocks and five rows
    more, and rows of 37 (a remainder after 16 lanes)."""
    _needs_kernel()
    from clintune import fast

    g = torch.Generator().manual_seed(5)
    rows = 16 * 3 + 5
    h = (torch.randn(rows, n, generator=g) * 3).bfloat16()
    r = torch.randn(rows, n, generator=g) * torch.rand(rows, 1, generator=g).mul(100)
    w, b = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g) * 0.1
    codes = masks.affine_u8(-2.0, 2.0)
    thr, scale = fast._threshold(0.1), 1.0 / 0.9
    y, z, stats = masks.dropout_add_norm(h, r, w, b, 1e-12, 3, thr, scale)
    dropped = _ref_dropout(h, torch.bfloat16, 3, thr, scale)               # each row's own dropout output
    y1, q1 = masks.add_norm(h, r, w, b, 1e-12, codes=codes)
    _, yb1 = masks.add_norm(h, r, w, b, 1e-12, bf16_copy=True)
    for i in range(rows):
        one = slice(i, i + 1)
        yi, zi, si = masks.dropout_add_norm(dropped[one], r[one], w, b, 1e-12, 0, -32768, 1.0)
        assert torch.equal(yi, y[one]) and torch.equal(zi, z[one]) and torch.equal(si, stats[one])
        yi, qi = masks.add_norm(h[one], r[one], w, b, 1e-12, codes=codes)
        _, ybi = masks.add_norm(h[one], r[one], w, b, 1e-12, bf16_copy=True)
        assert torch.equal(yi, y1[one]) and torch.equal(qi, q1[one]) and torch.equal(ybi, yb1[one])


def test_fused_passes_refuse_what_they_cannot_do():
    _needs_kernel()
    h = torch.zeros(4, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="r must be"):
        masks.dropout_add_norm(h, h, torch.ones(8), torch.zeros(8), 1e-5, 1, 0, 1.0)
    with pytest.raises(ValueError, match="weight must be"):
        masks.dropout_add_norm(h, h.float(), torch.ones(7), torch.zeros(8), 1e-5, 1, 0, 1.0)
    with pytest.raises(ValueError, match="x must be"):
        masks.gelu_and_grad(h.float())
    with pytest.raises(ValueError, match="dropout kernel"):
        masks.dropout(h, torch.empty(4, 8, dtype=torch.float16), 1, 0, 1.0)
    with pytest.raises(ValueError, match="dropout kernel"):
        masks.dropout(h.t(), torch.empty(8, 4, dtype=torch.bfloat16), 1, 0, 1.0)
    assert masks.fused_rows_available(384) and not masks.fused_rows_available(masks.MAX_ROW + 1)
    assert masks.dropout_available(torch.float32, torch.bfloat16)
    assert not masks.dropout_available(torch.float16, torch.float16)


def _attention_kernel():
    lib = masks.compiled()
    if lib is None or not lib.attention_bf16_available():
        pytest.skip("no AVX-512 BF16 on this CPU: prediction attends with the chunked form (tests/test_fast.py)")


def _amx_tiles() -> bool:
    lib = masks.compiled()
    return bool(lib is not None and lib.attention_bf16_available() and lib.attention_amx_available())


@pytest.fixture(params=["avx512", "amx"])
def kernel_form(request):
    """The bf16 attention kernels' two forms: AVX-512 BF16 dot products, and AMX tiles where the CPU has them (the
    kernels choose AMX there; this runs the other form too, so that both are checked on such a CPU)."""
    _attention_kernel()
    if request.param == "amx" and not _amx_tiles():
        pytest.skip("no AMX tiles on this CPU")
    with masks.amx_form(request.param == "amx"):
        yield request.param


def _exact_attention(q, k, v, mask, scale):
    s = q.double() @ k.double().transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)                                   # a row with no key: zeros
    return (p @ v.double()).transpose(1, 2)


def _padded_case(b, h, t, d):
    """Seeded (q, k, v, lengths, padding mask, scale): (B, T, h, d) projections seen as (B, h, T, d), as
    transformers hands them over; example 0 unpadded, the others padded to a random length."""
    g = torch.Generator().manual_seed(b * t + d)
    q, k, v = (torch.randn(b, t, h, d, generator=g).mul(2).bfloat16().transpose(1, 2) for _ in range(3))
    lens = torch.randint(1, t + 1, (b,), generator=g)
    lens[0] = t
    mask = (torch.arange(t)[None, :] < lens[:, None])[:, None, None, :].expand(b, 1, t, t)
    scale = d ** -0.5
    return q, k, v, lens, mask, scale


def _same_bits_for_copies_and_padding(kernel, q, k, v, lens, mask, scale, out):
    """Contiguous inputs and a materialised mask give ``kernel`` the same bits as ``out``, and so do padded keys'
    values set to 1e4: they never leak into the output."""
    c = [x.contiguous() for x in (q, k, v)]
    assert torch.equal(kernel(*c, mask.contiguous(), scale), out)
    v2 = v.clone()
    for i, n in enumerate(lens.tolist()):
        v2[i, :, n:] = 1e4
    assert torch.equal(kernel(q, k, v2, mask, scale), out)


@pytest.mark.parametrize("b,h,t,d", [(3, 2, 37, 32), (2, 3, 16, 64), (2, 12, 130, 32), (1, 1, 1, 64), (2, 2, 512, 32)])
def test_attention_kernel_is_exact_attention_to_bf16_rounding(b, h, t, d, kernel_form):
    _attention_kernel()
    q, k, v, lens, mask, scale = _padded_case(b, h, t, d)
    out = masks.attention(q, k, v, mask, scale)
    assert out.shape == (b, t, h, d) and out.dtype == torch.bfloat16
    exact = _exact_attention(q, k, v, mask, scale)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)
    err, err_sdpa = ((x.double() - exact).abs().max().item() for x in (out, sdpa))
    assert err <= 2 * err_sdpa + 2 ** -8, (err, err_sdpa)
    # bf16 output: within a rounding step of the exact value, plus P's rounding
    assert ((out.double() - exact).abs() <= exact.abs() * 2 ** -7 + 2 ** -7).all()
    _same_bits_for_copies_and_padding(masks.attention, q, k, v, lens, mask, scale, out)


def test_attention_kernel_takes_any_attend_mask_and_declines_what_it_cannot_do(kernel_form):
    _attention_kernel()
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 2, 20, 32, generator=g).bfloat16() for _ in range(3))
    mask = torch.rand(2, 1, 20, 20, generator=g) > 0.5
    mask[1, 0, 3] = False                                                       # a row that attends to nothing
    out = masks.attention(q, k, v, mask, 0.2)
    exact = _exact_attention(q, k, v, mask, 0.2)
    assert torch.equal(out[1, 3], torch.zeros(2, 32, dtype=torch.bfloat16))
    torch.testing.assert_close(out.double(), exact, atol=2e-2, rtol=2e-2)
    shared = mask[:1]                                                           # one mask for the batch
    torch.testing.assert_close(masks.attention(q, k, v, shared, 0.2).double(),
                               _exact_attention(q, k, v, shared, 0.2), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(masks.attention(q, k, v, None, 0.2).double(),
                               _exact_attention(q, k, v, None, 0.2), atol=2e-2, rtol=2e-2)
    assert masks.attention(q.float(), k.float(), v.float(), None, 0.2) is None          # fp32: not this kernel
    q48 = torch.randn(1, 1, 4, 48).bfloat16()
    assert masks.attention(q48, q48, q48, None, 0.2) is None                            # head size 48
    long = torch.randn(1, 1, masks.ATTENTION_MAX_T + 1, 32).bfloat16()
    assert masks.attention(long, long, long, None, 0.2) is None
    assert masks.attention(q, k, v, mask.float(), 0.2) is None                          # additive masks


def test_attention_backward_kernel_is_the_formula_over_a_shared_mask_and_a_row_with_nothing_to_attend(kernel_form):
    """Training's pair of kernels with one mask for the batch (keys 13.. hidden) and one row that attends to
    nothing (zeros out, no gradient through it): the gradients of O = (P m) V / (1 - p) to bf16 rounding."""
    _attention_kernel()
    g = torch.Generator().manual_seed(8)
    b, h, t, d, thr, seed = 2, 3, 21, 32, -29491, 77           # threshold -29491: p = 0.05
    q, k, v = (torch.randn(b, h, t, d, generator=g).bfloat16() for _ in range(3))
    mask = torch.ones(1, 1, t, t, dtype=torch.bool)
    mask[..., 13:] = False
    mask[0, 0, 4] = False
    probs = torch.empty(b, h, t, t, dtype=torch.bfloat16)
    out = masks.attention(q, k, v, mask, 1.0, probs=probs, seed=seed, threshold=thr, dropout_scale=1.25)
    assert torch.equal(out[:, 4], torch.zeros(b, h, d, dtype=torch.bfloat16)) and not probs[:, :, 4].any()
    d_out = torch.randn(b, t, h, d, generator=g).bfloat16()
    grads = masks.attention_backward(q, k, v, d_out.transpose(1, 2), probs, seed, thr, 1.25, 0.5)
    keep = masks.attention_keep((b, h, t, t), thr, torch.bool, seed).double()
    p64, do = probs.double(), d_out.transpose(1, 2).double() * 1.25
    dp = (do @ v.double().transpose(-1, -2)) * keep
    ds = p64 * (dp - (dp * p64).sum(-1, keepdim=True))
    want = (ds @ k.double() * 0.5, ds.transpose(-1, -2) @ q.double(), (p64 * keep).transpose(-1, -2) @ do)
    for got, w in zip(grads, want):
        torch.testing.assert_close(got.double(), w, rtol=0.02, atol=0.01 * w.abs().max().item())
    assert not grads[1][:, :, 13:].any() and not grads[2][:, :, 13:].any()     # hidden keys: no gradient
    assert not grads[0][:, :, 4].any()                                         # the empty row: none either
    q48 = torch.randn(1, 1, 4, 48).bfloat16()
    assert masks.attention_backward(q48, q48, q48, q48, torch.zeros(1, 1, 4, 4).bfloat16(), 1, 0, 1.0, 1.0) is None
    with pytest.raises(ValueError, match="probs"):
        masks.attention_backward(q, k, v, d_out.transpose(1, 2), probs.float(), seed, thr, 1.25, 0.5)


@pytest.mark.parametrize("t", [70, 256])
def test_attention_training_kernels_drop_out_by_the_row_padded_mask_in_every_block(t, kernel_form):
    """Rows of many 32-key blocks (the mask's stream is drawn 32 elements at a time, the last block cut at t): the
    kept P is the softmax, the output (P m) V / (1 - p) and the gradients the formula's, with attention_keep's m."""
    _attention_kernel()
    g = torch.Generator().manual_seed(t)
    b, h, d, thr, seed = 2, 2, 32, -26214, 5                    # threshold -26214: p = 0.1
    q, k, v = (torch.randn(b, h, t, d, generator=g).bfloat16() for _ in range(3))
    probs = torch.empty(b, h, t, t, dtype=torch.bfloat16)
    out = masks.attention(q, k, v, None, 0.3, probs=probs, seed=seed, threshold=thr, dropout_scale=1 / 0.9)
    keep = masks.attention_keep((b, h, t, t), thr, torch.bool, seed).double()
    assert 0.85 < keep.mean() < 0.95
    p64 = torch.softmax(q.double() @ k.double().transpose(-1, -2) * 0.3, -1)
    torch.testing.assert_close(probs.double(), p64, rtol=2 ** -7, atol=1e-6)
    want = (probs.double() * keep) @ v.double() / 0.9
    torch.testing.assert_close(out.transpose(1, 2).double(), want, rtol=0.02, atol=0.01 * want.abs().max().item())
    d_out = torch.randn(b, t, h, d, generator=g).bfloat16()
    grads = masks.attention_backward(q, k, v, d_out.transpose(1, 2), probs, seed, thr, 1 / 0.9, 0.3)
    pk, do = probs.double(), d_out.transpose(1, 2).double() / 0.9
    dp = (do @ v.double().transpose(-1, -2)) * keep
    ds = pk * (dp - (dp * pk).sum(-1, keepdim=True))
    want = (ds @ k.double() * 0.3, ds.transpose(-1, -2) @ q.double(), (pk * keep).transpose(-1, -2) @ do)
    for got, w in zip(grads, want):
        torch.testing.assert_close(got.double(), w, rtol=0.02, atol=0.01 * w.abs().max().item())


@pytest.fixture(params=["avx512", "amx"])
def lora_form(request):
    """The LoRA kernels' two forms: AVX-512 broadcasts, and AMX tiles for the rank-r products where the CPU has
    them (the kernels choose the tiles there, for n and k multiples of 32; this runs the other form too)."""
    if masks.compiled() is None or not masks.lora_kernels_available(64, 64, 8):
        pytest.skip("no AVX-512 BF16 LoRA kernels here")
    if request.param == "amx" and not _amx_tiles():
        pytest.skip("no AMX tiles on this CPU")
    with masks.amx_form(request.param == "amx", lora_only=True):
        yield request.param


@pytest.mark.parametrize("m,r,n,with_x", [(37, 8, 48, True), (4, 16, 64, True), (9, 3, 64, False),
                                          (70, 8, 64, True), (64, 16, 96, True)])
def test_lora_backward_kernel_is_the_formula_in_one_pass(m, r, n, with_x, lora_form):
    """dU = s g B (fp32), dB = s U^T g, dA = dU^T drop(x) and dx = gW + (dU A) m / (1 - p) against float64, rows not a
    multiple of the kernels' four or 32 (37, 9, 70), ranks under and at 16, no input gradient (the first layer's),
    and n not a multiple of 32 (48: the AVX-512 form even where the tiles run). The tiles' dA comes from dU's fp32
    bits in three bf16 parts, so both forms meet fp32's bound."""
    gen = torch.Generator().manual_seed(m + r)
    k, s, seed, thr = 64, 0.5, 7, -26214
    g, b, a = (torch.randn(*shape, generator=gen).bfloat16() for shape in ((m, n), (n, r), (r, k)))
    dropped, gw = torch.randn(m, k, generator=gen).bfloat16(), torch.randn(m, k, generator=gen).bfloat16()
    u = (dropped.double() @ a.double().t()).bfloat16()
    da, db, dx = masks.lora_backward(g, b, u, dropped, a, gw if with_x else None, s, seed, thr, 1 / 0.9)
    du = s * (g.double() @ b.double())
    keep = torch.from_numpy(masks.reference(m * k, seed, thr)).view(m, k).double()
    want = {"da": du.t() @ dropped.double(), "db": s * (g.double().t() @ u.double())}
    got = {"da": da, "db": db}
    if with_x:
        want["dx"], got["dx"] = gw.double() + (du @ a.double()) * keep / 0.9, dx
    else:
        assert dx is None
    for name, w in want.items():
        assert got[name].dtype == torch.float32 and got[name].shape == w.shape, name
        assert float((got[name].double() - w).abs().max() / w.abs().max()) < 1e-6, name


@pytest.mark.parametrize("dropout", [True, False])
def test_lora_input_and_output_kernels_are_the_cast_the_dropout_and_the_rank_r_products(dropout, lora_form):
    """One pass over x: its bf16 copy and drop(x) are the cast's and the dropout kernel's very bits, U = drop(x) A^T
    within its one rounding (111 rows: three blocks of the tiles' 32 and a part); the update y + s U B^T rounded
    once is addmm_'s fp32 sum, to the bit."""
    gen = torch.Generator().manual_seed(int(dropout))
    x = torch.randn(3, 37, 64, generator=gen)
    a, b = torch.randn(8, 64, generator=gen).bfloat16(), torch.randn(48, 8, generator=gen).bfloat16()
    seed, thr = (9, -26214) if dropout else (0, -32768)
    xb, dropped, u = masks.lora_input(x, a, seed, thr, 1 / 0.9 if dropout else 1.0, dropout)
    assert torch.equal(xb, x.bfloat16()) and (dropped is not xb) == dropout
    if dropout:
        assert torch.equal(dropped, masks.dropout(x, torch.empty(x.shape, dtype=torch.bfloat16), seed, thr, 1 / 0.9))
    want = dropped.double() @ a.double().t()
    assert (u.double() - want).abs().max() <= 2 ** -8 * want.abs().max()
    y = torch.randn(3, 37, 48, generator=gen).bfloat16()
    want_y = y.float().view(-1, 48).addmm(u.float().view(-1, 8), b.float().t(), alpha=0.5).bfloat16().view(y.shape)
    assert masks.lora_output(y, u, b, 0.5) is y and torch.equal(y, want_y)



@pytest.mark.parametrize("m,n,with_x,dropout", [(70, 64, True, True), (37, 48, True, True), (9, 64, False, True),
                                                (40, 64, True, False)])
def test_lora_kernels_take_query_key_and_value_together(m, n, with_x, dropout, lora_form):
    """Three LoRA linears on one x (query, key and value) in one call: x's bf16 copy once, each linear's dropout,
    U, dA and dB the very bits of its own call (its own seed), and dx = gW + sum_e (dU_e A_e) m_e / (1 - p) against
    float64 from g (m, 3n) side by side; rows past the kernels' blocks (70, 37, 9), n past the tiles' 32 (48), no
    dropout (U from xb for all); and x's copy written with the three U beside it (``width``), the backward reading drop(x) from it."""
    gen = torch.Generator().manual_seed(m + n)
    k, r, s, thr = 64, 8, 0.5, (-26214 if dropout else -32768)
    dscale = 1 / 0.9 if dropout else 1.0
    seeds = [11, 12, 13] if dropout else [0, 0, 0]
    x = torch.randn(m, k, generator=gen)
    a = [torch.randn(r, k, generator=gen).bfloat16() for _ in range(3)]
    b = [torch.randn(n, r, generator=gen).bfloat16() for _ in range(3)]
    xb, dropped, u = masks.lora_input(x, a, seeds, thr, dscale, dropout)
    assert torch.equal(xb, x.bfloat16()) and len(dropped) == len(u) == 3
    for e in range(3):
        xb1, d1, u1 = masks.lora_input(x, a[e], seeds[e], thr, dscale, dropout)
        assert torch.equal(dropped[e], d1) and torch.equal(u[e], u1), e
        assert (dropped[e] is xb) == (not dropout)
    g = torch.randn(m, 3 * n, generator=gen).bfloat16()
    gw = torch.randn(m, k, generator=gen).bfloat16()
    da, db, dx = masks.lora_backward(g, b, u, dropped, a, gw if with_x else None, s, seeds, thr, dscale)
    want_dx = gw.double()
    for e in range(3):
        ge = g[:, e * n:(e + 1) * n].contiguous()
        da1, db1, _ = masks.lora_backward(ge, b[e], u[e], dropped[e], a[e], None, s, seeds[e], thr, dscale)
        assert torch.equal(da[e], da1) and torch.equal(db[e], db1), e
        keep = torch.from_numpy(masks.reference(m * k, seeds[e], thr)).view(m, k).double()
        want_dx = want_dx + (s * (ge.double() @ b[e].double()) @ a[e].double()) * keep * dscale
    if with_x:
        assert float((dx.double() - want_dx).abs().max() / want_dx.abs().max()) < 1e-6
    else:
        assert dx is None
    # the updates folded into the product's input: [bf16(x) | U_1 U_2 U_3 | 0], 32 columns past x's 64 (24 + 8)
    wide, dropped_w, u_w = masks.lora_input(x, a, seeds, thr, dscale, dropout, width=k + 32)
    assert wide.shape == (m, k + 32) and torch.equal(wide[:, :k], xb) and not wide[:, k + 24:].any()
    for e in range(3):
        assert torch.equal(u_w[e], u[e]) and torch.equal(wide[:, k + e * r:k + (e + 1) * r], u[e])
        assert torch.equal(dropped_w[e], dropped[e]) and (dropped_w[e].stride(0) == k + 32) == (not dropout)
    da_w, db_w, dx_w = masks.lora_backward(g, b, u_w, dropped_w, a, gw if with_x else None, s, seeds, thr, dscale)
    assert all(torch.equal(p, q) for p, q in zip(da_w + db_w, da + db)) and (dx is None or torch.equal(dx_w, dx))
    with pytest.raises(ValueError, match="1 to 4 linears"):
        masks.lora_input(x, a * 2, seeds * 2, thr, dscale, dropout)
    with pytest.raises(ValueError, match="width 80 holds neither"):
        masks.lora_input(x, a, seeds, thr, dscale, dropout, width=k + 16)

def test_sixteen_row_reductions_give_each_rows_own_reduction_bit_for_bit():
    """AMX prediction finds 16 rows' largest scores and sums of e at once (reduce16_max / reduce16_add: permutes
    across rows); each must be the very bits of that row's own reduction, as the kernel made them before, on rows
    whose float sums depend on the order (magnitudes 1e-8 to 1e8) and on rows of zeros of both signs, whose
    largest depends on the order of max's operands (vmaxps returns the second of two zeros); -inf too."""
    _attention_kernel()
    g = torch.Generator().manual_seed(16)
    lib = masks.compiled()
    rows = torch.randn(16, 16, generator=g) * torch.pow(10.0, torch.randint(-8, 9, (16, 16), generator=g).float())
    rows[3] = -float("inf")
    rows[5, ::2] = -float("inf")
    sequential = torch.zeros(16)
    for j in range(16):
        sequential = sequential + rows[:, j]                                    # left to right in fp32
    pairwise = rows.view(16, 2, 8).sum(1).view(16, 2, 4).sum(1).view(16, 2, 2).sum(1).sum(1)
    assert not torch.equal(sequential, pairwise)          # these rows' sums do depend on the order
    assert lib.reduce16_mismatches(rows.contiguous().data_ptr()) == 0
    for _ in range(8):                                    # zeros: each sign pattern picks its own lane's zero
        zeros = torch.where(torch.rand(16, 16, generator=g) < 0.5, -0.0, 0.0).contiguous()
        assert lib.reduce16_mismatches(zeros.data_ptr()) == 0


@pytest.mark.parametrize("t,d", [(45, 32), (33, 64), (256, 32), (7, 64)])
def test_amx_and_avx512_kernels_compute_the_same_attention_and_gradients(t, d):
    """The AMX form of the kernels against the AVX-512 form on the same inputs, dropout mask and padding: the same
    element-wise steps, only the order of the fp32 sums differs, so the outputs, the kept P and the gradients
    agree to a bf16 rounding step (P exactly in most places), and so do packed sequences."""
    _attention_kernel()
    if not _amx_tiles():
        pytest.skip("no AMX tiles on this CPU")
    g = torch.Generator().manual_seed(t + d)
    b, h, thr, seed = 3, 2, -29491, 11
    q, k, v = (torch.randn(b, h, t, d, generator=g).mul(1.5).bfloat16() for _ in range(3))
    mask = torch.ones(b, 1, t, t, dtype=torch.bool)
    mask[1, ..., t // 3:] = False
    d_out = torch.randn(b, t, h, d, generator=g).bfloat16()
    starts = torch.tensor([0, t // 4, t // 2, t], dtype=torch.int64)
    runs = []
    for amx in (True, False):
        with masks.amx_form(amx):
            probs = torch.empty(b, h, t, t, dtype=torch.bfloat16)
            out = masks.attention(q, k, v, mask, 0.3, probs=probs, seed=seed, threshold=thr, dropout_scale=1.25)
            grads = masks.attention_backward(q, k, v, d_out.transpose(1, 2), probs, seed, thr, 1.25, 0.3)
            predicted = masks.attention(q, k, v, mask, 0.3)
            packed = masks.attention(q[:1], k[:1], v[:1], None, 0.3, starts=starts)
        runs.append((out, probs, *grads, predicted, packed))
    assert _amx_tiles()                                             # the AMX form back after the blocks
    for a, w in zip(*runs):
        scale = w.double().abs().max().item()
        assert (a.double() - w.double()).abs().max().item() <= 2 ** -7 * scale + 1e-6
        assert (a == w).double().mean() > 0.5                                     # mostly the very same bits
    assert not runs[0][3][1, :, t // 3:].any() and not runs[0][4][1, :, t // 3:].any()   # hidden keys: no gradient


def _int8_attention_kernel():
    _attention_kernel()
    if not masks.compiled().attention_int8_available():
        pytest.skip("no AVX-512 VNNI on this CPU: --quantize int8 attends with the bf16 kernel")


@pytest.mark.parametrize("b,h,t,d", [(3, 2, 37, 32), (2, 3, 16, 64), (2, 12, 130, 32), (1, 1, 1, 64)])
def test_int8_attention_is_attention_to_its_codes_precision(b, h, t, d):
    _int8_attention_kernel()
    q, k, v, lens, mask, scale = _padded_case(b, h, t, d)
    out = masks.attention_int8(q, k, v, mask, scale)
    assert out.shape == (b, t, h, d) and out.dtype == torch.bfloat16
    exact = _exact_attention(q, k, v, mask, scale)
    err = (out.double() - exact).abs()
    # 8-bit codes: each output within a few hundredths of its head's largest |v|, a percent or two overall
    assert (err <= 0.04 * v.double().abs().amax(dim=(2, 3))[:, None, :, None]).all(), err.max()
    assert err.norm() / exact.norm() < 0.02
    # the bf16 kernel is nearer, the int8 kernel near enough: the same computation, coarser numbers
    assert (masks.attention(q, k, v, mask, scale).double() - exact).norm() <= err.norm()
    # padded keys' values neither leak into the output nor widen the values' codes
    _same_bits_for_copies_and_padding(masks.attention_int8, q, k, v, lens, mask, scale, out)


def test_int8_attention_exact_where_its_codes_are():
    """Values that are integers with each column's largest |v| = 127 are coded exactly (s_v = 1): attention that
    is uniform (q = 0) gives the attended keys' mean, attention on one key (a score far above the others) gives
    that key's value row, bit for bit."""
    _int8_attention_kernel()
    g = torch.Generator().manual_seed(3)
    b, h, t, d = 2, 2, 40, 32
    v = torch.randint(-126, 127, (b, h, t, d), generator=g).float()
    v[:, :, 5] = 127.0
    lens = torch.tensor([40, 23])
    mask = (torch.arange(t)[None, :] < lens[:, None])[:, None, None, :]
    zero = torch.zeros(b, h, t, d, dtype=torch.bfloat16)
    k = torch.randn(b, h, t, d, generator=g).bfloat16()
    out = masks.attention_int8(zero, k, v.bfloat16(), mask, d ** -0.5).transpose(1, 2).double()
    for i, n in enumerate(lens.tolist()):
        mean = v[i, :, :n].double().mean(1, keepdim=True).expand(h, t, d)
        assert torch.equal(out[i], mean.bfloat16().double())
    q = torch.zeros(b, h, t, d)
    q[..., 0] = 8.0
    k = torch.zeros(b, h, t, d)
    k[:, :, 17, 0] = 127.0                       # key 17: score 8 * 127 / sqrt(32) = 180 above every other key
    out = masks.attention_int8(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, d ** -0.5).transpose(1, 2)
    assert torch.equal(out, v[:, :, 17:18].expand(b, h, t, d).bfloat16())


def test_int8_attention_takes_any_attend_mask_and_declines_what_it_cannot_do():
    _int8_attention_kernel()
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 2, 20, 32, generator=g).bfloat16() for _ in range(3))
    mask = torch.rand(2, 1, 20, 20, generator=g) > 0.5
    mask[1, 0, 3] = False                                                       # a row that attends to nothing
    out = masks.attention_int8(q, k, v, mask, 0.2)
    assert torch.equal(out[1, 3], torch.zeros(2, 32, dtype=torch.bfloat16))
    for m in (mask, mask[:1], None):                                            # per row, one for the batch, none
        torch.testing.assert_close(masks.attention_int8(q, k, v, m, 0.2).double(), _exact_attention(q, k, v, m, 0.2),
                                   atol=5e-2, rtol=5e-2)
    assert masks.attention_int8(q[..., :16], k[..., :16], v[..., :16], None, 0.2) is None      # head size 16
    assert masks.attention_int8(q.float(), k.float(), v.float(), None, 0.2) is None            # not bf16
