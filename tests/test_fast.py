"""The CPU speed-ups keep the maths: same distribution, same attention, same bits where promised."""
import numpy as np
import pytest
import torch

import clintune
from clintune import fast, masks
from clintune.arena import saving_into
from clintune.runtime import Runtime

from conftest import tiny_config


def test_keep_mask_has_the_right_rate_and_is_seeded():
    torch.manual_seed(0)
    m = fast.keep_mask((1000, 1000), 0.1)
    assert m.dtype == torch.bool and abs(m.float().mean().item() - 0.9) < 0.002
    torch.manual_seed(0)
    assert torch.equal(fast.keep_mask((1000, 1000), 0.1), m)
    assert fast.keep_mask((10, 10), 0.0).all()
    assert abs(fast.keep_mask((1000, 1000), 0.5).float().mean().item() - 0.5) < 0.002
    lanes = fast.keep_mask((250_000, 4), 0.5).float().mean(0)        # every 16-bit slice of a draw is uniform
    assert (lanes - 0.5).abs().max() < 0.005


def test_fast_dropout_is_inverted_dropout():
    d = fast.FastDropout(0.2)
    x = torch.rand(400, 500) + 0.5
    y = d.train()(x)
    dropped = y == 0
    assert abs(dropped.float().mean().item() - 0.2) < 0.005
    torch.testing.assert_close(y[~dropped], x[~dropped] / 0.8)
    assert abs(y.mean().item() - x.mean().item()) < 0.01
    assert torch.equal(d.eval()(x), x)


def test_fast_dropout_backward_redraws_the_forward_mask_without_touching_the_generator():
    d = fast.FastDropout(0.3).train()
    x = (torch.rand(300, 70) + 0.5).requires_grad_()
    torch.manual_seed(5)
    y = d(x)
    y.backward(torch.full_like(y, 2.0))
    after_backward = torch.rand(3)
    torch.testing.assert_close(x.grad, (y != 0).float() * 2.0 / 0.7)       # kept entries only, scaled
    assert 0.25 < (y == 0).float().mean().item() < 0.35
    torch.manual_seed(5)
    d(x.detach())
    assert torch.equal(torch.rand(3), after_backward)                         # the redraw took no numbers


def _qkv(b=2, h=2, t=6, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, t, d, generator=g) for _ in range(3))
    mask = torch.ones(b, 1, t, t, dtype=torch.bool)
    mask[1, :, :, 4:] = False                                                   # last two keys padded
    return q, k, v, mask


class _Mod(torch.nn.Module):
    is_causal = False                                                           # as BERT-family encoders say


def test_attention_matches_eager_attention_and_respects_the_mask():
    from transformers.models.bert.modeling_bert import eager_attention_forward

    q, k, v, mask = _qkv()
    mod = _Mod().eval()
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    want, _ = eager_attention_forward(mod, q, k, v, additive, scaling=0.5)
    got, _ = fast.attention(mod, q, k, v, mask, dropout=0.0, scaling=0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    mod.train()
    v2 = v.clone()
    v2[1, :, 4:] = 1e6                                                          # padded values must not leak
    torch.manual_seed(1)
    a, _ = fast.attention(mod, q, k, v, mask, dropout=0.1, scaling=0.5)
    torch.manual_seed(1)
    b, _ = fast.attention(mod, q, k, v2, mask, dropout=0.1, scaling=0.5)
    torch.testing.assert_close(a, b)
    mean = torch.stack([fast.attention(mod, q, k, v, mask, dropout=0.1, scaling=0.5)[0] for _ in range(3000)]).mean(0)
    torch.testing.assert_close(mean, want, rtol=0, atol=0.05)                    # unbiased: E[dropout] = identity


def test_inference_attention_in_bf16_is_chunked_softmax_as_close_to_exact_as_sdpa(monkeypatch):
    monkeypatch.setattr(fast, "_amx", lambda: False)                            # the chunked form (SDPA with AMX)
    q, k, v, mask = _qkv(b=5, h=3, t=24, d=8, seed=3)
    mask[3, :, :, 10:] = False
    q, k, v = (x.bfloat16() for x in (q, k, v))
    mod = _Mod().eval()
    with torch.inference_mode():                                                # as predict_logits runs it
        whole, _ = fast.attention(mod, q, k, v, mask, scaling=0.3)
        monkeypatch.setattr(fast, "_CHUNK_ELEMENTS", 2 * 3 * 24 * 24)            # chunks of 2 examples, 1 left over
        chunked, _ = fast.attention(mod, q, k, v, mask, scaling=0.3)
        v2 = v.clone()
        v2[1, :, 4:] = 1e4                                                      # padded keys' values must not leak
        v2[3, :, 10:] = -1e4
        leak, _ = fast.attention(mod, q, k, v2, mask, scaling=0.3)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3).transpose(1, 2)
    assert whole.shape == (5, 24, 3, 8) and whole.dtype == torch.bfloat16
    assert torch.equal(whole, chunked) and torch.equal(whole, leak)
    # the same bits as the unfused bf16 form training uses: bf16 scores, softmax accumulated in fp32, bf16 P
    scores = torch.matmul(q * 0.3, k.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
    assert torch.equal(whole, torch.matmul(torch.softmax(scores, -1), v).transpose(1, 2))
    exact = torch.softmax((q.double() @ k.double().transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf")), -1)
    exact = (exact @ v.double()).transpose(1, 2)
    err, err_sdpa = ((x.double() - exact).abs().max().item() for x in (whole, sdpa))
    assert err < 2 * err_sdpa + 2 ** -8, (err, err_sdpa)                         # bf16 noise, as SDPA's


def test_keep_bits_is_the_keep_mask_draw_as_integers():
    torch.manual_seed(3)
    want = fast.keep_mask((64, 333), 0.25)
    for dtype, bits in ((torch.bfloat16, torch.int16), (torch.float32, torch.int32), (torch.float64, torch.int64)):
        torch.manual_seed(3)
        got = fast.keep_bits((64, 333), 0.25, dtype)
        assert got.dtype == bits and torch.equal(got, want.to(bits))


def test_zero_dropped_zeroes_exactly_the_dropped_entries():
    keep = torch.rand(50, 40, generator=torch.Generator().manual_seed(0)) > 0.3
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        x = torch.randn(50, 40).to(dtype)
        want = torch.where(keep, x, torch.zeros((), dtype=dtype))
        assert torch.equal(fast.zero_dropped(x, keep), want)
        y = x.clone()
        assert fast.zero_dropped(y, keep.to(fast._BITS[dtype]), inplace=True) is y and torch.equal(y, want)


def test_lora_dropout_hands_autocast_the_same_bits_and_gradients():
    x = torch.randn(4, 7, 16, dtype=torch.float32, requires_grad=True)
    g = torch.randn(4, 7, 16).bfloat16()
    outs, grads = [], []
    for to_autocast in (False, True):
        d = fast.FastDropout(0.1, to_autocast=to_autocast).train()
        torch.manual_seed(11)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = d(x)
        outs.append(y.to(torch.bfloat16))               # what a bf16 linear would read either way
        (grad,) = torch.autograd.grad(y, x, g.to(y.dtype))
        grads.append(grad)
    assert outs[1].dtype == torch.bfloat16 and torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0], grads[1])
    assert (outs[1] == 0).float().mean().item() == pytest.approx(0.1, abs=0.03)


@pytest.mark.parametrize("padded", [False, True])
def test_dropout_attention_forward_and_gradients_match_the_formula(padded):
    """The chunked attention against softmax(Q K^T s + bias) * m / (1 - p) V, in float64, same mask m."""
    b, h, t, d, p, scale = 5, 3, 9, 4, 0.2, 0.37
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b, t, h, d, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_()
               for _ in range(3))
    mask = torch.ones(b, 1, t, t, dtype=torch.bool)
    if padded:
        mask[1, ..., 6:] = False
        mask[4, ..., 2:] = False
    grad_out = torch.randn(b, t, h, d, generator=g, dtype=torch.float64)
    mod = _Mod().train()
    old = fast._CHUNK_ELEMENTS
    fast._CHUNK_ELEMENTS = 2 * h * t * t                                          # several chunks
    try:
        torch.manual_seed(7)
        got, _ = fast.attention(mod, q, k, v, mask, dropout=p, scaling=scale)
    finally:
        fast._CHUNK_ELEMENTS = old
    got_grads = torch.autograd.grad(got, (q, k, v), grad_out)
    torch.manual_seed(7)
    keep = masks.attention_keep((b, h, t, t), fast._threshold(p), torch.int64, masks.new_seed()).bool()
    scores = (q @ k.transpose(-1, -2)) * scale + torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    want = ((torch.softmax(scores, -1) * keep / (1 - p)) @ v).transpose(1, 2)
    want_grads = torch.autograd.grad(want, (q, k, v), grad_out)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, w in zip(got_grads, want_grads):
        torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-11)
    if padded:                                                                   # padded keys get no gradient
        assert got_grads[1][1, :, 6:].abs().max() == 0 and got_grads[2][4, :, 2:].abs().max() == 0



def test_fused_bf16_attention_matches_pytorchs_softmax_path(monkeypatch):
    """bf16 attention with the compiled softmax-dropout kernels against the same attention with PyTorch's
    softmax, its gradient and zero_dropped, same seed and so the same masks: equal up to bf16 rounding,
    over several chunks, padded examples and a length that is not a multiple of 4."""
    if masks.compiled() is None:
        pytest.skip("no C compiler: only PyTorch's path runs here")
    b, h, t, d, p = 6, 3, 37, 8, 0.1
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, h, t, d, generator=g).bfloat16() for _ in range(3))
    mask = torch.ones(b, 1, t, t, dtype=torch.bool)
    mask[2, ..., 20:] = False
    grad_out = torch.randn(b, t, h, d, generator=g).bfloat16()
    monkeypatch.setattr(fast, "_CHUNK_ELEMENTS", 2 * h * t * t)
    results = []
    for fused in (True, False):
        monkeypatch.setattr(fast, "_fused", lambda dtype, t, fused=fused: fused)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        torch.manual_seed(5)
        out, _ = fast.attention(_Mod().train(), *leaves, mask, dropout=p)
        results.append((out, *torch.autograd.grad(out, leaves, grad_out)))
    for a, w in zip(*results):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), w.float(), rtol=0.02, atol=0.02 * w.abs().max().item())
        assert (a == w).float().mean() > 0.5                       # mostly the very same bits
    assert results[0][2][2, :, 20:].abs().max() == 0            # padded keys get no gradient


def test_training_attention_kernels_keep_scores_in_fp32_and_give_the_formulas_gradients(monkeypatch):
    """Training's forward in the AVX-512 BF16 kernel (bf16, head size 32 or 64, a bool mask): against
    softmax(Q K^T s + bias) * m / (1 - p) V in float64 with the very same mask m, its output is closer than the
    unfused bf16 path's (whose scores are rounded to bf16), and so are the backward kernel's gradients (dP kept
    in fp32), the formula's to bf16 precision."""
    lib = masks.compiled()
    if lib is None or not lib.attention_bf16_available():
        pytest.skip("no AVX-512 BF16 attention kernel here")
    monkeypatch.setattr(fast, "_attention_kernels", lambda: True)                  # on AMX CPUs too
    b, h, t, p = 3, 2, 45, 0.1
    for d in (32, 64):
        g = torch.Generator().manual_seed(d)
        q, k, v = (torch.randn(b, h, t, d, generator=g).mul(2).bfloat16() for _ in range(3))
        mask = torch.ones(b, 1, t, t, dtype=torch.bool)
        mask[1, ..., 30:] = False
        grad_out = torch.randn(b, t, h, d, generator=g).bfloat16()
        calls, back = [], []
        kernel, kernel_back = masks.attention, masks.attention_backward
        monkeypatch.setattr(masks, "attention", lambda *a, **kw: calls.append(kw.get("probs")) or kernel(*a, **kw))
        monkeypatch.setattr(masks, "attention_backward", lambda *a, **kw: back.append(1) or kernel_back(*a, **kw))
        results = []
        for use_kernel in (True, False):
            monkeypatch.setattr(fast, "_fused", lambda dtype, t, f=use_kernel: f)   # off: PyTorch's softmax path
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            torch.manual_seed(5)
            out, _ = fast.attention(_Mod().train(), *leaves, mask, dropout=p)
            results.append((out, *torch.autograd.grad(out, leaves, grad_out)))
        assert len(calls) == 1 and calls[0] is not None and len(back) == 1   # the kernels ran, once, for training
        torch.manual_seed(5)
        keep = masks.attention_keep((b, h, t, t), fast._threshold(p), torch.int64, masks.new_seed()).bool()
        q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
        scores = (q64 @ k64.transpose(-1, -2)) * d ** -0.5
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
        want = ((probs * keep / (1 - p)) @ v64).transpose(1, 2)
        want_grads = torch.autograd.grad(want, (q64, k64, v64), grad_out.double())
        err = [(r[0].double() - want).abs() for r in results]
        assert err[0].mean() < 0.75 * err[1].mean()                 # fp32 scores: closer (both round Q s, P and O)
        torch.testing.assert_close(results[0][0].double(), want, rtol=0.02, atol=0.01 * want.abs().max().item())
        for a, u, w in zip(results[0][1:], results[1][1:], want_grads):
            assert a.dtype == torch.bfloat16
            torch.testing.assert_close(a.double(), w, rtol=0.02, atol=0.02 * w.abs().max().item())
            assert (a.double() - w).abs().mean() < 0.75 * (u.double() - w).abs().mean()   # dP in fp32: closer
        assert results[0][2][1, :, 30:].abs().max() == 0                      # padded keys get no gradient
        monkeypatch.setattr(masks, "attention", kernel)
        monkeypatch.setattr(masks, "attention_backward", kernel_back)


def test_attention_kernels_take_amx_tiles_where_linux_lends_them_and_step_aside_where_it_does_not(monkeypatch):
    """On CPUs with AMX the compiled kernels run in their AMX form (faster there than PyTorch's products and SDPA,
    benchmarks/attention_cpu.py); where the tiles are not lent to the process (a kernel without
    ARCH_REQ_XCOMP_PERM) they step aside, since their AVX-512 form is slower there than oneDNN's products on the
    tiles. Without AMX, the AVX-512 form runs wherever it is built."""
    from clintune import runtime

    lib = masks.compiled()
    if lib is None or not lib.attention_bf16_available():
        pytest.skip("no AVX-512 BF16 attention kernel here")

    def clear():
        fast._attention_kernels.cache_clear()
        fast._amx.cache_clear()

    clear()
    try:
        monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx512_bf16", "amx_bf16"}))
        for lent in (1, 0):
            monkeypatch.setattr(lib, "attention_amx_available", lambda lent=lent: lent)
            clear()
            assert fast._amx() and fast._attention_kernels() == bool(lent)
            assert fast.fingerprint(True, (), torch.device("cpu"))["attention"] == ("clintune-amx" if lent else "sdpa")
        monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
        monkeypatch.setattr(lib, "attention_amx_available", lambda: 0)
        clear()
        assert fast._attention_kernels() and not fast._amx()
        assert fast.fingerprint(True, (), torch.device("cpu"))["attention"] == "clintune"
    finally:
        monkeypatch.undo()
        clear()


@pytest.mark.parametrize("amx", [False, True])
def test_prediction_attention_without_the_kernel_is_sdpa_with_amx_and_chunked_without(monkeypatch, amx):
    """Where the compiled bf16 kernel does not run, prediction's bf16 attention is PyTorch's fused SDPA on AMX
    CPUs (measured faster there) and the chunked products elsewhere: the same attention to bf16 rounding."""
    monkeypatch.setattr(fast, "_amx", lambda: amx)
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 40, 32).bfloat16() for _ in range(3))
    mask = torch.ones(3, 1, 1, 40, dtype=torch.bool)
    mask[1, ..., 25:] = False
    sdpa, chunked = [], fast._chunked_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, _f=torch.nn.functional.scaled_dot_product_attention, **kw: sdpa.append(1) or _f(*a, **kw))
    monkeypatch.setattr(fast, "_chunked_attention", lambda *a: sdpa.append(0) or chunked(*a))
    with torch.inference_mode():
        got = fast._predict_attention(q, k, v, mask, 32 ** -0.5).float()
        scores = (q.float() @ k.float().transpose(-1, -2)) * 32 ** -0.5
        want = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v.float()
    assert sdpa == [1 if amx else 0]
    assert got.shape == (3, 40, 2, 32)
    torch.testing.assert_close(got, want.transpose(1, 2), atol=0.03, rtol=0.02)


def test_dropout_attention_broadcasts_one_mask_over_the_batch():
    b, h, t, d = 3, 2, 5, 4
    q, k, v = (torch.randn(b, h, t, d, dtype=torch.float64).requires_grad_() for _ in range(3))
    one = torch.ones(1, 1, t, t, dtype=torch.bool)
    one[..., 3:] = False
    mod = _Mod().train()
    torch.manual_seed(2)
    got, _ = fast.attention(mod, q, k, v, one, dropout=0.1)
    torch.manual_seed(2)
    want, _ = fast.attention(mod, q, k, v, one.expand(b, 1, t, t), dropout=0.1)
    torch.testing.assert_close(got, want)


def test_attention_leaves_causal_and_unknown_modules_to_transformers():
    q, k, v, _ = _qkv()
    for causal in (True, None):
        mod = torch.nn.Module()
        if causal is not None:
            mod.is_causal = causal
        got, _ = fast.attention(mod.train(), q, k, v, None, dropout=0.0, scaling=0.5)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5).transpose(1, 2)
        torch.testing.assert_close(got, want)


def test_reusing_freed_memory_is_reported():
    assert isinstance(fast.reuse_freed_memory(), bool)


def test_bf16_frozen_weights_give_the_same_bits_as_autocast(tiny_backbone):
    from clintune.backbones import load_backbone

    model, tok, _ = load_backbone(tiny_backbone)
    model.eval().requires_grad_(False)
    ids = torch.tensor(tok(["heart failure noted today", "rash"], padding=True)["input_ids"])
    mask = (ids != tok.pad_token_id).long()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
        saved = fast.frozen_linears_to(model, torch.bfloat16)
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert saved and torch.equal(got, want)
    sp = fast.Speedups()
    sp._weights = saved
    sp.restore()
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_paging_out_originals_keeps_their_values(tmp_path):
    """page_out drops whole pages of a tensor mapped from a file (read again from it) and never changes a value,
    whether the tensor is file-backed, anonymous or written after mapping."""
    import mmap

    n = 5 * mmap.PAGESIZE // 4 + 77                     # several pages, not page-aligned at the end
    want = torch.randn(n, generator=torch.Generator().manual_seed(0))
    want.numpy().tofile(tmp_path / "w.bin")
    mapped = torch.from_file(str(tmp_path / "w.bin"), shared=False, size=n, dtype=torch.float32)
    written = mapped.clone()
    written[:10] = 7.0
    anon = want.clone()
    assert float(mapped.sum()) == float(want.sum())     # every page read once, as rounding to bf16 does
    advised = fast.page_out([mapped, written, anon])
    assert advised > 0 and advised % mmap.PAGESIZE == 0
    assert torch.equal(mapped, want) and torch.equal(anon, want)
    assert torch.equal(written[10:], want[10:]) and bool((written[:10] == 7.0).all())
    assert isinstance(fast.trim_heap(), bool)


def test_a_frozen_linear_reads_the_bf16_copy_a_prediction_sublayer_end_leaves_on_its_output():
    """Prediction's sublayer end (BERT's LayerNorm(dense(x) + input)) over a bf16 FrozenLinear returns its fp32 output
    carrying that output's bf16 rounding (one pass, the bits a cast gives); a FrozenLinear under bf16 autocast
    reads the copy instead of casting. An output without one is cast as before."""
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertSelfOutput

    if masks.compiled() is None or not fast._onednn_linear():
        pytest.skip("no compiled kernels or oneDNN linear here")
    torch.manual_seed(0)
    end = BertSelfOutput(BertConfig(hidden_size=32, intermediate_size=64)).eval().requires_grad_(False)
    end.dense.to(torch.bfloat16)
    sp = fast.Speedups()
    sp._classes = fast.frozen_linear_class(end) + [p for ps in fast.fuse_passes(end).values() for p in ps]
    assert type(end.dense) is fast.FrozenLinear and hasattr(type(end), "_fused_from")
    h, r = torch.randn(3, 5, 32), torch.randn(3, 5, 32)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = end(h, r)
        copy = getattr(y, fast.BF16_COPY)
        assert y.dtype == torch.float32 and torch.equal(copy, y.bfloat16())
        lin = end.dense                                          # a FrozenLinear reading y next
        assert torch.equal(lin(y), lin(y.clone()))               # the copy's bits are the cast's
        setattr(y, fast.BF16_COPY, torch.zeros_like(copy))        # it reads the copy, not y
        assert torch.equal(lin(y), lin(torch.zeros_like(y)))
    sp.restore()


def test_frozen_linears_through_onednn_give_autocasts_bits_and_gradients(tiny_backbone):
    """Frozen bf16 linears swapped to FrozenLinear (bias added inside oneDNN's product): the same output bits
    and input gradients as autocast's linear, no gradient for W or b, the same state dict, and restore()
    puts the class back."""
    from torch.utils.flop_counter import FlopCounterMode

    from clintune.backbones import load_backbone

    if not fast._onednn_linear():
        pytest.skip("this PyTorch has no oneDNN linear")
    model, tok, _ = load_backbone(tiny_backbone)
    model.eval().requires_grad_(False)
    ids = torch.tensor(tok(["heart failure noted today", "rash"], padding=True)["input_ids"])
    mask = (ids != tok.pad_token_id).long()
    keys = list(model.state_dict())
    sp = fast.Speedups()
    sp._weights = fast.frozen_linears_to(model, torch.bfloat16)
    results = []
    for swap in (False, True):
        if swap:
            sp._classes = fast.frozen_linear_class(model)
            assert sp._classes and all(type(m) is fast.FrozenLinear for m, _ in sp._classes)
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        with FlopCounterMode(display=False) as counter:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(inputs_embeds=emb, attention_mask=mask).last_hidden_state
            (grad,) = torch.autograd.grad(out.float().square().sum(), emb)
        results.append((out, grad, counter.get_total_flops()))
    assert results[1][2] == results[0][2] > 0                    # MFU counts oneDNN's linears as addmm's
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=0)
    assert list(model.state_dict()) == keys
    assert all(p.grad is None for p in model.parameters())
    sp.restore()
    assert all(type(m) is not fast.FrozenLinear for m in model.modules())
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_speedups_change_training_only_by_bf16_noise_without_dropout(tiny_backbone, binary_csv, tmp_path):
    import shutil
    from transformers import BertConfig

    bb = tmp_path / "nodrop"
    shutil.copytree(tiny_backbone, bb)
    cfg = BertConfig.from_pretrained(bb)
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
    cfg.save_pretrained(bb)
    runs = [clintune.train(tiny_config(str(bb), binary_csv, method="lora", lora_dropout=0.0, head_dropout=0.0,
                                       precision="bf16", fast=f, epochs=2)) for f in (True, False)]
    texts = ["heart cardiac noted", "rash eczema today"]
    a, b = (r.classifier.predict_proba(texts) for r in runs)
    # the fast path computes training attention unfused (fused SDPA's CPU backward is slower): same maths,
    # bf16 rounding in another order, so equal up to bf16 noise
    np.testing.assert_allclose(a, b, atol=5e-3)
    assert (a.argmax(1) == b.argmax(1)).all()
    assert runs[0].record["cost"]["speedups"]["bf16_frozen_linear_tensors"] > 0


def test_a_cpu_classifier_predicts_with_the_speedups_and_the_same_probabilities(tiny_backbone, binary_csv,
                                                                               tmp_path):
    import shutil

    import yaml

    out = tmp_path / "run"
    res = clintune.train(tiny_config(tiny_backbone, binary_csv, method="lora", precision="bf16", epochs=1,
                                     out=str(out)))
    slow = tmp_path / "slow"
    shutil.copytree(out, slow)
    cfg = yaml.safe_load((slow / "config.yaml").read_text())
    (slow / "config.yaml").write_text(yaml.safe_dump({**cfg, "fast": False}))
    a, b = clintune.load(out), clintune.load(slow)
    assert b.speedups is None and res.classifier.speedups is not None
    rep = a.speedups.report
    assert rep["attention"] == "clintune" and rep["bf16_frozen_linear_tensors"] > 0
    assert "paged_out_fp32_mb" not in rep                                      # no fp32 originals kept
    assert all(m.weight.dtype == torch.bfloat16 for m in a.model.modules() if isinstance(m, torch.nn.Linear))
    texts = ["heart cardiac noted", "rash eczema today", "cardiac", "skin rash rash eczema heart noted today"]
    pa, pb = a.predict_proba(texts), b.predict_proba(texts)
    np.testing.assert_allclose(pa, pb, atol=5e-3)                               # bf16 noise: autocast's maths
    assert (pa.argmax(1) == pb.argmax(1)).all()
    assert np.array_equal(pa, a.predict_proba(texts))                            # and deterministic
    np.testing.assert_allclose(res.classifier.predict_proba(texts), pa, atol=1e-6)


def test_speedups_with_dropout_learn_as_well(tiny_backbone, binary_csv):
    acc = [clintune.train(tiny_config(tiny_backbone, binary_csv, method="full", lr=1e-3, epochs=6, patience=0,
                                      fast=f)).metrics["accuracy"] for f in (True, False)]
    assert min(acc) > 0.85 and abs(acc[0] - acc[1]) < 0.08, acc


def test_a_model_that_only_predicts_lets_the_fp32_originals_go():
    import gc
    import weakref

    model = torch.nn.Sequential(torch.nn.Linear(8, 4)).requires_grad_(False)
    original = weakref.ref(model[0].weight.data)
    sp = fast.accelerate(model, Runtime(torch.device("cpu"), "bf16"), restorable=False)
    gc.collect()
    assert original() is None and model[0].weight.dtype == torch.bfloat16
    assert sp.report["bf16_frozen_linear_tensors"] == 2 and "paged_out_fp32_mb" not in sp.report
    sp.restore()                                                                # classes back, weights stay bf16
    assert type(model[0]) is torch.nn.Linear and model[0].weight.dtype == torch.bfloat16
    kept = torch.nn.Sequential(torch.nn.Linear(8, 4)).requires_grad_(False)
    w = kept[0].weight.data.clone()
    fast.accelerate(kept, Runtime(torch.device("cpu"), "bf16")).restore()       # the default: all restored
    assert torch.equal(kept[0].weight, w)


def test_gpu_models_are_left_alone():
    sp = fast.accelerate(torch.nn.Sequential(torch.nn.Dropout(0.1)), Runtime(torch.device("cuda"), "bf16"))
    assert sp.report == {}


def test_measuring_cost_leaves_the_random_stream_alone():
    from clintune.cost import _PEAKS, matmul_peak_flops

    _PEAKS.clear()
    torch.manual_seed(5)
    matmul_peak_flops(torch.float32, sizes=(64,), seconds=0.01)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after)


def test_matmul_peak_counts_the_fastest_product_and_keeps_the_better_measurement(monkeypatch):
    """A product slowed by another process must not lower the peak (nor inflate MFU): the fastest single
    product counts, and measuring again keeps the higher peak."""
    import itertools

    from clintune import cost

    durations = itertools.cycle([1.0, 0.25, 2.0])        # seconds per product, as the clock will say
    clock = {"t": 0.0, "start": True}

    def fake_perf_counter():
        if not clock["start"]:
            clock["t"] += next(durations)
        clock["start"] = not clock["start"]
        return clock["t"]

    cost._PEAKS.clear()
    monkeypatch.setattr(cost.time, "perf_counter", fake_perf_counter)
    n = 16
    first = cost.matmul_peak_flops(torch.float32, sizes=(n,), seconds=3.0)
    assert first == pytest.approx(2 * n ** 3 / 0.25)      # not the mean, 2 n^3 * 3 / 3.25 s
    assert cost.matmul_peak_flops(torch.float32, sizes=(n,)) == first          # cached
    durations = itertools.cycle([4.0])                    # a slow second measurement
    assert cost.matmul_peak_flops(torch.float32, sizes=(n,), seconds=3.0, remeasure=True) == first
    durations = itertools.cycle([0.125])                  # a faster one replaces it
    assert cost.matmul_peak_flops(torch.float32, sizes=(n,), seconds=0.1, remeasure=True) == pytest.approx(
        2 * n ** 3 / 0.125)
    cost._PEAKS.clear()


def _lora_model(cfg):
    """(assembled, model in training mode) for a LoRA ``cfg``, seeded, with non-zero B (gradients reach A too)."""
    from clintune.modeling import assemble

    torch.manual_seed(0)
    asm = assemble(cfg, 2)
    model = asm.model.train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    return asm, model


def test_bf16_lora_gradients_with_dropout_match_fp32_with_the_same_masks(tiny_backbone):
    """One LoRA step with every dropout on: the bf16 fast path (bf16 frozen weights, bf16 chunked attention)
    against the same path in fp32, drawing the very same masks (same seed): the gradients of every LoRA
    matrix and of the head agree up to bf16 rounding, attention's query/key included (their gradient goes
    through softmax's backward, dP - rowsum(dP * P), computed in bf16)."""
    cfg = tiny_config(tiny_backbone, "unused.csv", method="lora", head="mlp", pooling="cls", lora_r=4, lora_alpha=4,
                      lora_dropout=0.1, target_modules=["query", "key", "value"])
    texts = ["heart failure with reduced ejection fraction noted on echo today and yesterday", "rash",
             "atrial fibrillation", "eczema of both hands, itching at night", "chest pain on exertion", "acne"]
    grads = []
    for precision in ("fp32", "bf16"):
        asm, model = _lora_model(cfg)
        enc = asm.tokenizer(texts, padding=True, return_tensors="pt")   # padded examples too
        ids, mask = enc["input_ids"], enc["attention_mask"]
        rt = Runtime(torch.device("cpu"), precision)
        sp = fast.accelerate(model, rt)
        assert sp.report["attention"] == fast.ATTENTION
        torch.manual_seed(123)
        with rt.autocast():
            logits = model(input_ids=ids, attention_mask=mask)
        torch.nn.functional.cross_entropy(logits.float(), torch.tensor([0, 1, 0, 1, 1, 0])).backward()
        grads.append({n: p.grad.double() for n, p in model.named_parameters() if p.requires_grad})
        sp.restore()                        # the process-wide parts too (the block cache), for the tests after
    ref, got = grads
    for part in ("query.lora_A", "query.lora_B", "key.lora_A", "key.lora_B", "value.lora_A", "value.lora_B", "head"):
        names = [n for n in ref if part in n]
        a = torch.cat([ref[n].flatten() for n in names])
        b = torch.cat([got[n].flatten() for n in names])
        assert a.norm() > 0, part
        rel = float((a - b).norm() / a.norm())
        assert rel < 0.05, (part, rel)


def test_fast_dropout_kernel_and_fallback_give_the_same_bits_and_gradients(monkeypatch):
    """FastDropout's one-pass kernel against its three-pass fallback: the same outputs and input gradients, bit for
    bit, for fp32 and bf16 values and for LoRA's hand-over to autocast."""
    if masks.compiled() is None:
        pytest.skip("no C compiler: the fallback is all there is")
    x32 = torch.randn(6, 9, 20, generator=torch.Generator().manual_seed(0))
    for x, to_autocast in ((x32, False), (x32.bfloat16(), False), (x32, True)):
        results = []
        for kernel in (True, False):
            if not kernel:
                monkeypatch.setattr(masks, "dropout_available", lambda a, b: False)
            leaf = x.clone().requires_grad_()
            torch.manual_seed(4)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=to_autocast):
                y = fast.FastDropout(0.2, to_autocast=to_autocast).train()(leaf)
            (grad,) = torch.autograd.grad(y, leaf, torch.linspace(-1, 1, y.numel()).view(y.shape).to(y.dtype))
            results.append((y, grad))
            monkeypatch.undo()
        (y1, g1), (y0, g0) = results
        assert y1.dtype == y0.dtype and torch.equal(y1, y0) and torch.equal(g1, g0)
        assert (y1 == 0).any() and (y1 != 0).any()


def _layer_outputs(model, emb, mask, fused: bool, seed=7):
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(inputs_embeds=emb, attention_mask=mask).last_hidden_state
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))    # (LayerNorm makes |out|^2 flat)
    (grad,) = torch.autograd.grad((out.float() * weights).sum(), emb)
    return out.float().detach(), grad


def _embeddings(kind: str):
    """A tiny embeddings module of BERT's, RoBERTa's or DistilBERT's code (eval, frozen, a LayerNorm that is not
    the identity), and its class."""
    from transformers import BertConfig, DistilBertConfig, RobertaConfig
    from transformers.models.bert.modeling_bert import BertEmbeddings
    from transformers.models.distilbert.modeling_distilbert import Embeddings
    from transformers.models.roberta.modeling_roberta import RobertaEmbeddings

    torch.manual_seed(0)
    size = dict(vocab_size=50, max_position_embeddings=40, hidden_dropout_prob=0.5)
    if kind == "bert":
        emb = BertEmbeddings(BertConfig(hidden_size=48, type_vocab_size=2, **size))
    elif kind == "roberta":
        emb = RobertaEmbeddings(RobertaConfig(hidden_size=48, type_vocab_size=2, pad_token_id=1, **size))
    else:
        emb = Embeddings(DistilBertConfig(dim=48, pad_token_id=0, dropout=0.5, **{**size, "hidden_dropout_prob": 0}))
    emb.eval().requires_grad_(False)
    with torch.no_grad():
        emb.LayerNorm.weight.normal_(1.0, 0.3)
        emb.LayerNorm.bias.normal_(0.0, 0.3)
    return emb, type(emb)


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
def test_prediction_embeddings_in_one_pass_match_the_models_own_and_step_aside_where_they_do_not_apply(kind):
    """BERT's, RoBERTa's and DistilBERT's embeddings fused for prediction (gathers, adds and LayerNorm in one pass,
    masks.embed_norm) give PyTorch's output to fp32 rounding for default (RoBERTa's from its padding index), given
    and restarting (packed) positions, given token types, the type buffer's types and a cache offset; under bf16
    autocast the output carries its bf16 cast's bits. An id outside the table raises PyTorch's own error; training
    (dropout on) and trainable tables take the original forward, bit for bit."""
    if masks.compiled() is None:
        pytest.skip("no C compiler: nothing is fused")
    emb, cls = _embeddings(kind)
    fused = fast.fuse_passes(emb)
    name = "distilbert_embeddings" if kind == "distilbert" else "embeddings"
    assert [m for m, _ in fused[name]] == [emb] and sum(map(len, fused.values())) == 1

    def both(*args, **kwargs):
        out = emb(*args, **kwargs)
        swapped, emb.__class__ = emb.__class__, cls
        want = emb(*args, **kwargs)
        emb.__class__ = swapped
        return out, want

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 50, (3, 7), generator=g)
    ids[1, 5:] = emb.word_embeddings.padding_idx                      # a padded row (RoBERTa numbers around it)
    packed = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]]) + (2 if kind == "roberta" else 0)
    cases = [dict(input_ids=ids), dict(input_ids=torch.randint(0, 50, (1, 10), generator=g), position_ids=packed)]
    if kind != "distilbert":
        cases += [dict(input_ids=ids, token_type_ids=torch.randint(0, 2, (3, 7), generator=g)),
                  dict(input_ids=ids, cache_length=5)]
    for kwargs in cases:
        with torch.inference_mode():
            out, want = both(**kwargs)
        assert out.dtype == torch.float32 and out.shape == want.shape
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    if kind != "distilbert":
        with torch.inference_mode():                      # the type buffer's types where none are given
            emb.token_type_ids[:, 3:] = 1
            out, want = both(input_ids=ids)
            emb.token_type_ids.zero_()
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(out, both(input_ids=ids)[1], atol=1e-3)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, want = both(input_ids=ids)
        assert out.dtype == torch.float32 and torch.equal(getattr(out, fast.BF16_COPY), out.bfloat16())
    with torch.inference_mode(), pytest.raises(IndexError):
        emb(torch.tensor([[3, 4, 50]]))
    emb.train()                                           # dropout on: the original forward, the same draws
    out, want = [], []
    for sink, c in ((out, type(emb)), (want, cls)):
        swapped, emb.__class__ = emb.__class__, c
        torch.manual_seed(5)
        sink.append(emb(ids))
        emb.__class__ = swapped
    assert torch.equal(out[0], want[0]) and not torch.equal(out[0], emb.eval()(ids))
    emb.word_embeddings.requires_grad_(True)              # a table that trains: the original forward
    out = emb(ids)
    assert out.requires_grad and out.grad_fn is not None
    for mod, c in fused[name]:
        mod.__class__ = c
    assert type(emb) is cls


def test_fused_sublayer_ends_and_gelu_keep_a_bert_encoders_outputs_and_gradients(tiny_backbone):
    """A tiny BERT in training mode, every dropout on, bf16 frozen weights under autocast: with the sublayer
    ends (dropout + residual + LayerNorm) and GELUs fused, the same masks are drawn, and the output and the
    gradient reaching the embeddings agree with the unfused modules to bf16 noise; the state dict is the same;
    restore() puts the classes back. Eval mode, and a LayerNorm that trains, take the original forward
    (bit-equal)."""
    from clintune.backbones import load_backbone

    if masks.compiled() is None:
        pytest.skip("no C compiler: nothing is fused")
    model, tok, _ = load_backbone(tiny_backbone)
    model.requires_grad_(False)
    layers = model.config.num_hidden_layers
    ids = torch.tensor(tok(["heart failure noted today and yesterday", "rash"], padding=True)["input_ids"])
    mask = (ids != tok.pad_token_id).long()
    keys = list(model.state_dict())
    fast.replace_dropout(model)
    sp = fast.Speedups()
    sp._weights = fast.frozen_linears_to(model, torch.bfloat16)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    model.train()
    plain = _layer_outputs(model, emb, mask, False)
    fused = fast.fuse_passes(model)
    assert len(fused["sublayer_end"]) == 2 * layers and len(fused["gelu"]) == layers
    assert not any(fast.fuse_passes(model).values())                                       # idempotent
    sp._classes = [pair for pairs in fused.values() for pair in pairs]
    got = _layer_outputs(model, emb, mask, True)
    torch.testing.assert_close(got[0], plain[0], rtol=0.02, atol=0.02)
    assert float((got[1] - plain[1]).norm() / plain[1].norm()) < 0.02
    other_seed = _layer_outputs(model, emb, mask, True, seed=8)                             # the masks matter
    assert float((other_seed[0] - got[0]).norm()) > 10 * float((got[0] - plain[0]).norm())
    assert list(model.state_dict()) == keys

    end, end_cls = fused["sublayer_end"][0]
    gelu, gelu_cls = fused["gelu"][0]
    h = torch.randn(2, 5, model.config.hidden_size).bfloat16()
    r = torch.randn(2, 5, model.config.hidden_size)
    u = torch.randn(2, 5, model.config.intermediate_size).bfloat16()

    def both(mod, original, *args):
        outs = []
        for cls in (type(mod), original):
            swapped, mod.__class__ = mod.__class__, cls
            torch.manual_seed(3)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outs.append(mod(*args))
            mod.__class__ = swapped
        return outs

    model.eval()                                          # inference, no gradients wanted: the original GELU
    a, b = both(gelu, gelu_cls, u)
    assert torch.equal(a, b)
    calls, add_norm = [], masks.add_norm                  # and the sublayer end in one pass, with or without grad
    masks.add_norm = lambda *args: calls.append(1) or add_norm(*args)
    try:
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                a, b = both(end, end_cls, h, r)
            assert a.dtype == b.dtype == torch.float32 and not a.requires_grad
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)           # the LayerNorm's fp32 rounding
    finally:
        masks.add_norm = add_norm
    assert len(calls) == 2
    a, b = both(gelu, gelu_cls, u.requires_grad_())           # with gradients: the kept-derivative GELU
    assert a.grad_fn is not None and "GeluKeepGrad" in type(a.grad_fn).__name__
    torch.testing.assert_close(a, b, rtol=2 ** -8, atol=1e-6)
    model.train()
    end.LayerNorm.requires_grad_(True)                                           # full fine-tuning: not fused
    a, b = both(end, end_cls, h, r)
    assert torch.equal(a, b) and a.requires_grad
    sp.restore()
    assert not any(hasattr(type(m), "_fused_from") for m in model.modules())


def _lora_module(dropout: float, seed: int = 0, dims: tuple[int, int] = (16, 24)):
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.query = torch.nn.Linear(*dims)

        def forward(self, x):
            return self.query(x)

    torch.manual_seed(seed)
    model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["query"]))
    with torch.no_grad():                                                    # non-zero B: gradients reach A
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(1))
    fast.replace_dropout(model)
    fast.frozen_linears_to(model, torch.bfloat16)
    fast.frozen_linear_class(model)
    return model


@pytest.mark.parametrize("dropout,dims", [(0.25, (16, 24)), (0.0, (16, 24)), (0.25, (32, 48)), (0.0, (32, 48))])
def test_fused_lora_linear_is_peft_lora_with_the_same_masks(dropout, dims, monkeypatch):
    """PEFT's LoRA linear over a bf16 FrozenLinear, against the fused LoRA function under bf16 autocast: the same
    dropout masks, the output within one bf16 rounding (the update is added in fp32 and rounded once), and the
    gradients of x, A and B within bf16 noise; eval mode draws no random numbers. Widths that are multiples of 16
    take the one-pass backward kernel where it is built (masks.lora_backward), the others torch's products."""
    if masks.compiled() is None or not fast._onednn_linear():
        pytest.skip("no C compiler or no oneDNN linear: nothing is fused")
    kernel_calls = []
    kernel = masks.lora_backward
    monkeypatch.setattr(masks, "lora_backward", lambda *a: kernel_calls.append(1) or kernel(*a))
    model = _lora_module(dropout, dims=dims).train()
    x = torch.randn(3, 5, dims[0], generator=torch.Generator().manual_seed(2))
    dy = torch.randn(3, 5, dims[1], generator=torch.Generator().manual_seed(3))
    runs = []
    for fuse in (False, True):
        if fuse:
            fused = fast.fuse_passes(model)
            assert {k: len(v) for k, v in fused.items()} == {"sublayer_end": 0, "gelu": 0, "lora": 1, "qkv": 0,
                                                                "ffn": 0, "embeddings": 0, "distilbert_embeddings": 0}
        leaf = x.clone().requires_grad_()
        torch.manual_seed(9)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(leaf)
        assert y.dtype == torch.bfloat16
        assert ("LoraLinear" in type(y.grad_fn).__name__) == fuse
        y.float().backward(dy)
        runs.append((y.float(), leaf.grad, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
        model.zero_grad(set_to_none=True)
    (y0, dx0, g0), (y1, dx1, g1) = runs
    torch.testing.assert_close(y1, y0, rtol=2 ** -7, atol=1e-2)
    assert float((dx1 - dx0).norm() / dx0.norm()) < 1e-2
    assert g0.keys() == g1.keys() and len(g0) == 2
    for name in g0:
        assert float((g1[name] - g0[name]).norm() / g0[name].norm()) < 1e-2, name
    if dropout:
        torch.manual_seed(10)                                                 # other masks: other gradients
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x.clone().requires_grad_()).float().backward(dy)
        other = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert all(float((other[n] - g1[n]).norm() / g1[n].norm()) > 0.05 for n in g1)
    assert bool(kernel_calls) == masks.lora_kernels_available(dims[1], dims[0], 4)
    model.eval()
    torch.manual_seed(11)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    after = torch.rand(2)
    torch.manual_seed(11)
    assert torch.equal(torch.rand(2), after)


def test_fused_lora_linear_leaves_other_adapters_to_peft():
    """A disabled adapter takes PEFT's own forward."""
    if masks.compiled() is None or not fast._onednn_linear():
        pytest.skip("no C compiler or no oneDNN linear: nothing is fused")
    model = _lora_module(0.0).train()
    fast.fuse_passes(model)
    x = torch.randn(2, 3, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "LoraLinear" in type(model(x).grad_fn).__name__
        with model.disable_adapter():
            assert "LoraLinear" not in type(model(x).grad_fn).__name__


def test_a_bert_encoder_predicts_the_same_with_clintune_attention_as_with_sdpa(monkeypatch):
    from transformers import BertConfig, BertModel

    calls = []
    kernel = masks.attention
    monkeypatch.setattr(masks, "attention", lambda *a: calls.append(kernel(*a)) or calls[-1])
    lib = masks.compiled()
    monkeypatch.setattr(fast, "_attention_kernels", lambda: bool(lib and lib.attention_bf16_available()))

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,   # heads of 32
                     intermediate_size=128, max_position_embeddings=64, attn_implementation="sdpa")
    model = BertModel(cfg).eval()
    ids = torch.randint(1, 50, (3, 40))
    am = torch.ones(3, 40, dtype=torch.long)
    am[1, 25:] = 0
    am[2, 7:] = 0
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(input_ids=ids, attention_mask=am).last_hidden_state.float()
        sp = fast.accelerate(model, Runtime(torch.device("cpu"), "fp32"))               # attention only
        got = model(input_ids=ids, attention_mask=am).last_hidden_state.float()
    assert sp.report["attention"] == "clintune"
    assert not any(m.training for m in model.modules())                     # swapped dropouts stay in eval
    assert len(calls) == (2 if fast._attention_kernels() else 0) and all(c is not None for c in calls)
    keep = am.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=0.06, rtol=0.02)       # bf16 noise through 2 layers
    sp.restore()
    assert model.config._attn_implementation == "sdpa"


def test_fast_off_parts_are_the_configs_and_unknown_ones_are_refused():
    from clintune.config import FAST_PARTS
    from clintune.errors import ConfigError

    assert FAST_PARTS == tuple(fast.PARTS)
    with pytest.raises(ConfigError, match="--fast-off: 'attn' is not one of"):
        tiny_config("unused", "unused.csv", fast_off=["attn"])
    assert tiny_config("unused", "unused.csv").replace(fast_off="gelu,lora").fast_off == ["gelu", "lora"]
    with pytest.raises(ValueError, match="unknown --fast-off"):
        fast.accelerate(torch.nn.Linear(2, 2), Runtime(torch.device("cpu"), "bf16"), off=["attn"])


def _lora_step(tiny_backbone, off, targets=("query", "key", "value"), lora_dropout=0.1):
    """One bf16 LoRA step with every dropout on (0.1) and ``off`` left out of the fast path: (the speed-ups'
    report, the trainable gradients, what accelerate swapped), the model restored afterwards."""
    cfg = tiny_config(tiny_backbone, "unused.csv", method="lora", head="pooler", pooling="cls", lora_r=4,
                      lora_alpha=4, lora_dropout=lora_dropout, target_modules=list(targets))
    asm, model = _lora_model(cfg)
    enc = asm.tokenizer(["heart failure with reduced ejection fraction noted on echo", "rash", "atrial fibrillation",
                         "eczema of both hands, itching at night"], padding=True, return_tensors="pt")
    rt = Runtime(torch.device("cpu"), "bf16")
    before = {n: type(m) for n, m in model.named_modules()}
    sp = fast.accelerate(model, rt, off=off)
    swapped = {n: type(m) for n, m in model.named_modules()}
    dtypes = {p.dtype for m in model.modules() if type(m) in (torch.nn.Linear, fast.FrozenLinear)
              for p in m.parameters(recurse=False) if not p.requires_grad}
    torch.manual_seed(123)
    with saving_into(sp.arena):                     # as training's loop: saved tensors in the arena, if any
        with rt.autocast():
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        torch.nn.functional.cross_entropy(logits.float(), torch.tensor([0, 1, 0, 1])).backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters() if p.requires_grad}
    sp.restore()                                    # everything back but the dropouts (FastDropout stays)
    assert all(type(m) is before[n] or type(m) is fast.FastDropout for n, m in model.named_modules())
    assert {m.config._attn_implementation for m in model.modules() if hasattr(m, "config")} == {"sdpa"}
    return sp.report, grads, swapped, dtypes



def test_the_folded_lora_product_follows_b_from_step_to_step():
    """_LoraLinears folds s B_e into its kept weight at every forward: after B changes in place (an optimiser's
    step), the next output is x W^T + b + s (x A^T) B^T with the new B, within bf16 rounding, for each of the three."""
    if masks.compiled() is None or not masks.lora_kernels_available(64, 64, 4) or not fast._onednn_linear():
        pytest.skip("no AVX-512 BF16 LoRA kernels here")
    gen = torch.Generator().manual_seed(0)
    b, t, k, n, r, heads, s = 2, 40, 64, 64, 4, 2, 0.5
    x = torch.randn(b, t, k, generator=gen)
    w, bias = (torch.randn(3 * n, k, generator=gen) * 0.1).bfloat16(), torch.randn(3 * n, generator=gen).bfloat16()
    folded = torch.zeros(3 * n, 96, dtype=torch.bfloat16)                       # 64 + 3 x 4 columns, padded to 96
    folded[:, :k] = w
    a = [torch.randn(r, k, generator=gen) * 0.1 for _ in range(3)]
    bs = [torch.zeros(n, r) for _ in range(3)]
    for step in range(3):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outs = fast._LoraLinears.apply(x, w, folded, bias, 0.0, s, heads, *a, *bs)
        xb = x.bfloat16().double()
        for e, out in enumerate(outs):
            u = (xb @ a[e].bfloat16().double().t()).bfloat16().double()
            want = xb @ w[e * n:(e + 1) * n].double().t() + bias[e * n:(e + 1) * n].double() \
                + s * u @ bs[e].bfloat16().double().t()
            got = out.transpose(1, 2).reshape(b, t, n).double()
            assert float((got - want).abs().max()) <= 2 ** -7 * float(want.abs().max()), (step, e)
        for be in bs:
            be.add_(torch.randn(be.shape, generator=gen))


@pytest.mark.parametrize("kind,lora_dropout", [("bert", 0.1), ("distilbert", 0.1), ("bert", 0.0)])
def test_query_key_and_value_as_one_lora_product_keep_the_linears_maths(kind, lora_dropout, tiny_backbone, tmp_path,
                                                                        monkeypatch):
    """BERT's and DistilBERT's query, key and value LoRA linears made together (fast._LoraLinears: one product of
    the stacked weights with the updates folded in, one input-gradient product, one pass for dx) against the same
    linears one at a time (--fast-off qkv): the same masks from the same seeds, so the loss's gradients agree to
    bf16 noise; without LoRA dropout, the three read x's copy beside the U they fold in."""
    from conftest import build_kernel_backbone

    if masks.compiled() is None or not masks.lora_kernels_available(64, 64, 4):
        pytest.skip("no AVX-512 BF16 LoRA kernels here")
    backbone = build_kernel_backbone(tiny_backbone, tmp_path, kind)
    targets = ("query", "key", "value") if kind == "bert" else ("q_lin", "k_lin", "v_lin")
    groups = []
    real = masks.lora_backward
    monkeypatch.setattr(masks, "lora_backward", lambda g, b, *a: groups.append(
        len(b) if isinstance(b, list) else 1) or real(g, b, *a))
    joint, real_joint = [], fast.joint_view
    monkeypatch.setattr(fast, "joint_view", lambda *t: joint.append(real_joint(*t) is not None) or real_joint(*t))
    report, fused, swapped, _ = _lora_step(backbone, [], targets, lora_dropout)
    # the attention took the first layer's query, key and value side by side, and where its backward kernel ran,
    # wrote their gradients so, which the LoRA backward then read in place
    assert joint.count(True) == (2 if fast._attention_kernels() else 1)
    # the first layer's three together; the last layer's query is for the first token only (--pooling cls:
    # clintune.prune), so its linears go one at a time (the backward pass takes the last layer first)
    assert report["fused_passes"]["qkv"] == 2 and groups == [1, 1, 1, 3]
    name = "FusedBertSelfAttention" if kind == "bert" else "FusedDistilBertSelfAttention"
    assert sum(name == t.__name__ for t in swapped.values()) == 2
    groups.clear()
    report, alone, _, _ = _lora_step(backbone, ["qkv"], targets, lora_dropout)
    assert "qkv" not in report["fused_passes"] and groups == [1] * 6
    assert fused.keys() == alone.keys() and len(fused) > 6
    for name, g in fused.items():
        assert float((g - alone[name]).norm() / alone[name].norm()) < 2e-2, name

@pytest.mark.parametrize("part", list(fast.PARTS))
def test_fast_off_leaves_out_just_that_part_and_keeps_the_gradients(kernel_backbone, part, monkeypatch):
    """Each --fast-off part: what accelerate does without it (the report, the classes, the weights' dtype,
    whether the attention kernel runs), and one bf16 LoRA step with every dropout on against the whole fast
    path from the same seed: where the part left out draws the same masks, the same gradients to bf16 noise;
    where it draws others (torch's dropout), gradients of the same size."""
    if masks.compiled() is None:
        pytest.skip("no C compiler: the kernels and fusions are not there to leave out")
    ran, real = [], masks.attention                                 # whether the attention kernel did the work

    def attention(*args, **kwargs):
        out = real(*args, **kwargs)
        ran.append(out is not None)
        return out

    monkeypatch.setattr(masks, "attention", attention)
    report, grads, swapped, dtypes = _lora_step(kernel_backbone, [part])
    names = {t.__name__ for t in swapped.values()}
    assert report["off"] == [part]
    assert (report["attention"] == "unchanged") == (part == "attention")
    assert (report["attention"] == fast.NO_KERNEL) == (part == "attention_kernel")
    assert ("FastDropout" in names) == (part != "dropout") and ("fast_dropout_modules" in report) == (part != "dropout")
    assert (torch.float32 in dtypes) == (part == "bf16_weights") and ("FrozenLinear" in names) == (part != "bf16_weights")
    fused = report["fused_passes"]
    assert ("lora" in fused) == (part not in ("lora", "dropout")) and ("sublayer_end" in fused) == (
        part not in ("sublayer_end", "dropout")) and ("gelu" in fused) == (part != "gelu")
    assert ("ffn" in fused) == (part != "gelu") and (fused.get("ffn", 0) > 0) == (part not in ("gelu", "bf16_weights"))
    assert (fused.get("lora", 0) > 0) == (part not in ("lora", "dropout", "bf16_weights"))
    assert ("qkv" in fused) == (part not in ("lora", "dropout", "qkv"))
    assert (fused.get("qkv", 0) > 0) == (part not in ("lora", "dropout", "qkv", "bf16_weights"))
    assert ("reuse_freed_memory" in report) == (part != "memory")
    assert ("arena" in report) == (part != "arena")
    assert ("block_cache" in report) == (part != "blocks")
    if part != "arena":                             # the fused steps kept their tensors there, and let them go
        assert report["arena"]["high_mb"] > 0 and report["arena"]["abandoned"] == 0
    if fast._attention_kernels():
        assert any(ran) == (part not in ("attention", "attention_kernel"))
    full = _lora_step(kernel_backbone, [])[1]
    for name, g in full.items():
        assert torch.isfinite(grads[name]).all() and grads[name].norm() > 0, name
    a = torch.cat([g.flatten() for g in full.values()])
    b = torch.cat([grads[n].flatten() for n in full])
    if part not in ("attention", "dropout"):
        # the same masks from the same seeds (these parts draw them the same way): bf16 noise apart
        assert float((a - b).norm() / a.norm()) < 0.05, part
    else:   # torch's generator instead of clintune's masks: another draw, the same size of gradient
        assert 0.5 < float(b.norm() / a.norm()) < 2.0, part


def test_fast_off_first_token_keeps_the_whole_last_layer(tiny_backbone):
    from clintune.modeling import assemble

    cfg = tiny_config(tiny_backbone, "unused.csv", head="pooler", pooling="cls")
    assert assemble(cfg, 2).model.first_token_only
    assert not assemble(cfg.replace(fast_off=["first_token"]), 2).model.first_token_only


def test_flop_counter_counts_cpu_attention_as_its_products():
    """SDPA's CPU kernel counts as the explicit products would (PyTorch's registry counts it as 0): runs whose
    attention goes through SDPA get the same FLOPs and MFU definition as the fast path's kernels."""
    from torch.utils.flop_counter import FlopCounterMode

    from clintune.cost import count_cpu_attention

    count_cpu_attention()
    b, h, s, d = 2, 4, 24, 8
    counts = []
    for explicit in (False, True):
        q = torch.randn(b, h, s, d, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            if explicit:
                out = (q @ q.transpose(-1, -2) / d ** 0.5).softmax(-1) @ q
            else:
                out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
            out.sum().backward()
        counts.append(counter.get_total_flops())
    forward = 2 * (2 * b * h * s * s * d)                    # Q K^T and P V
    assert counts[0] == counts[1] == 3 * forward             # backward: four products, twice the forward


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
def test_prediction_applies_the_feed_forward_gelu_inside_the_frozen_product(act):
    """BERT's intermediate layer over a bf16 FrozenLinear, without gradients: GELU(x W^T + b) from oneDNN's product
    with the GELU as a post-op, within a bf16 rounding of the float64 formula and no farther from it than the
    unfused product then GELU; with gradients (training) the original forward, GELU keeping its derivative; int8
    quantisation still moves the GELU into its own product after the swap."""
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertIntermediate

    from clintune import quantize

    if masks.compiled() is None or not fast._onednn_linear():
        pytest.skip("no compiled kernels or no oneDNN linear here")
    torch.manual_seed(0)
    mod = BertIntermediate(BertConfig(hidden_size=32, intermediate_size=96, hidden_act=act))
    x = torch.randn(4, 7, 32).bfloat16()
    w64, b64 = mod.dense.weight.detach().bfloat16().double(), mod.dense.bias.detach().bfloat16().double()
    pre = x.double() @ w64.t() + b64
    want = torch.nn.functional.gelu(pre, approximate="none" if act == "gelu" else "tanh")
    for p in mod.parameters():
        p.requires_grad_(False)
    fast.frozen_linears_to(mod, torch.bfloat16)
    fast.frozen_linear_class(mod)
    with torch.no_grad():
        unfused = mod(x)
    fused = fast.fuse_passes(mod)
    assert len(fused["ffn"]) == 1 and mod._gelu_algorithm == ("none" if act == "gelu" else "tanh")
    with torch.no_grad():
        got = mod(x)
    assert got.dtype == torch.bfloat16 and got.shape == (4, 7, 96)
    err, err_unfused = ((y.double() - want).abs().max().item() for y in (got, unfused))
    assert err <= err_unfused and ((got.double() - want).abs() <= want.abs() * 2 ** -8 + 1e-6).all()
    leaf = x.clone().requires_grad_()
    out = mod(leaf)                                                    # training: the original forward
    assert torch.equal(out.detach(), unfused)
    out.float().sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    if quantize.int8_available():
        quantize.quantize_int8(mod)
        assert mod.dense.gelu == ("none" if act == "gelu" else "tanh") and isinstance(mod.intermediate_act_fn, torch.nn.Identity)
        with torch.no_grad():
            torch.testing.assert_close(mod(x).double(), want, atol=0.05, rtol=0.05)
