"""int8 prediction (--quantize int8): the activation codes, the int8 linear against its formula, which layers
are replaced, one quantisation per shared input, and the option from the API and the command line."""
import numpy as np
import pytest
import torch
from torch import nn

import clintune
from clintune import masks
from clintune.errors import ConfigError
from clintune.fast import gelu_algorithm
from clintune.quantize import Int8Linear, _SharedInput, int8_available, quantize_int8

from conftest import tiny_config

needs_int8 = pytest.mark.skipif(not int8_available(), reason="no oneDNN int8 linear in this PyTorch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_activation_codes_are_pytorchs(dtype, kernels, monkeypatch):
    if not kernels:
        monkeypatch.setattr(masks, "compiled", lambda: None)
    torch.manual_seed(0)
    for x in (torch.randn(37, 129) * 3 + 0.5, torch.rand(5, 64) + 1.0, -torch.rand(3, 40)):
        x = x.to(dtype)
        q, scale, zero = masks.quantize_u8(x)
        ref = torch.quantize_per_tensor_dynamic(x.float(), torch.quint8, False)
        assert q.dtype == torch.uint8 and q.shape == x.shape
        assert scale == pytest.approx(ref.q_scale(), rel=1e-6) and zero == ref.q_zero_point()
        assert torch.equal(q, ref.int_repr())
        # every value within half a step of its code; 0 exactly representable
        assert ((q.float() - zero) * scale - x.float()).abs().max() <= scale / 2 * (1 + 1e-5)
        assert zero == round(-min(x.float().min().item(), 0.0) / scale)


def test_activation_codes_a_hair_from_half_steps():
    """Values within a few ulps of a half step, with a large zero point: x / s + z rounded once (PyTorch's fused
    multiply-add) and rounded twice (the product, then the sum) give different codes for some of them."""
    rng = np.random.default_rng(0)
    lo, hi = -7.5, 1.9                                   # fixes s and z = 203
    s = np.float32((hi - lo) / 255.0)
    inv = np.float32(1.0 / float(s))
    k = rng.integers(-200, 50, 20_000)
    x = ((k + 0.5) / inv).astype(np.float32)
    x = x + (rng.integers(-3, 4, x.size) * np.spacing(x)).astype(np.float32)
    x[:2] = lo, hi
    twice = np.rint(np.clip(((x * inv).astype(np.float32) + np.float32(203)).astype(np.float32), 0, 255))
    codes = {}
    for dtype in (torch.float32, torch.bfloat16):
        xt = torch.from_numpy(x).to(dtype)
        codes[dtype], scale, zero = masks.quantize_u8(xt)
        ref = torch.quantize_per_tensor_dynamic(xt.float(), torch.quint8, False)
        assert (scale, zero) == (pytest.approx(ref.q_scale(), rel=1e-6), ref.q_zero_point())
        assert torch.equal(codes[dtype], ref.int_repr())
    assert zero == 203 and (codes[torch.float32].numpy() != twice).any()   # the fp32 case tells them apart


def test_activation_codes_edge_cases():
    q, scale, zero = masks.quantize_u8(torch.zeros(4, 8))
    assert (scale, zero) == (1.0, 0) and not q.any()
    x = torch.tensor([[1.0, float("nan"), -1.0, 0.0]])
    q, scale, zero = masks.quantize_u8(x)                  # NaN is ignored by the range and coded 0
    assert scale == pytest.approx(2 / 255, rel=1e-6) and q[0, 1] == 0 and q[0, 3] == zero in (127, 128)
    assert q[0, 0] == zero + 127 and q[0, 2] == 0
    for dtype in (torch.float32, torch.bfloat16):      # the same in the 16-lane pass as in the scalar tail
        x = (torch.randn(7, 35) * 4).to(dtype)
        x.view(-1)[[0, 5, 16, 31, 200, 244]] = float("nan")
        q, scale, zero = masks.quantize_u8(x)
        ref = torch.quantize_per_tensor_dynamic(x.float().nan_to_num(0.0), torch.quint8, False)
        nan = x.isnan()
        assert (scale, zero) == (pytest.approx(ref.q_scale(), rel=1e-6), ref.q_zero_point())
        assert torch.equal(q[~nan], ref.int_repr()[~nan]) and not q[nan].any()
    with pytest.raises(ValueError, match="infinite"):
        masks.quantize_u8(torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match="contiguous"):
        masks.quantize_u8(torch.ones(4, 6).t())
    with pytest.raises(ValueError, match="fp32 or bf16"):
        masks.quantize_u8(torch.ones(3, dtype=torch.float64))


@needs_int8
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_computes_its_formula(out_dtype):
    torch.manual_seed(1)
    lin = nn.Linear(48, 20)
    x = torch.randn(2, 7, 48)
    q8 = Int8Linear.from_linear(lin, _SharedInput())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=out_dtype == torch.bfloat16):
        y = q8(x)
    assert y.dtype == out_dtype and y.shape == (2, 7, 20)
    # by hand, in float64: per-channel symmetric weights, per-tensor asymmetric uint8 inputs
    w = lin.weight.detach().double()
    s_w = w.abs().amax(1) / 127
    q_w = torch.round(w / s_w[:, None]).clamp(-127, 127)
    xf = x.reshape(-1, 48).double()
    lo, hi = min(xf.min().item(), 0.0), max(xf.max().item(), 0.0)
    s_x = float(np.float32((hi - lo) / 255))
    z = round(-lo / s_x)
    q_x = torch.clamp(torch.round(xf / s_x) + z, 0, 255)
    want = (s_x * (q_x - z) @ (q_w * s_w[:, None]).T + lin.bias.double()).reshape(2, 7, 20)
    tol = 1e-5 if out_dtype == torch.float32 else 1e-2
    assert torch.allclose(y.double(), want, rtol=tol, atol=tol * want.abs().max().item())
    # and within the quantisation error of the float layer
    exact = lin(x).detach().double()
    assert (y.double() - exact).norm() / exact.norm() < 0.03


@needs_int8
def test_quantize_int8_replaces_the_encoders_linears_only(tiny_backbone, binary_csv, tmp_path):
    out = tmp_path / "m"
    clintune.train(tiny_config(tiny_backbone, binary_csv, out=str(out)))
    plain = clintune.load(out)
    q8 = clintune.load(out, quantize="int8")
    # 2 layers x (query, key, value, attention output, intermediate, output); the head's pooler stays
    n_linear = sum(isinstance(m, nn.Linear) for m in plain.model.encoder.modules())
    assert q8.int8_linears == n_linear == 2 * 6
    assert not any(isinstance(m, nn.Linear) for m in q8.model.encoder.modules())
    assert sum(isinstance(m, Int8Linear) for m in q8.model.encoder.modules()) == n_linear
    # each intermediate layer's GELU (class-swapped by clintune.fast) applied inside its int8 product
    assert [m.gelu for m in q8.model.encoder.modules() if isinstance(m, Int8Linear) and m.gelu] == ["none"] * 2
    assert not any(isinstance(m, Int8Linear) for m in q8.model.head.modules())
    texts = ["patient with heart failure and chest pain", "rash on the skin of the arm"] * 4
    p, p8 = plain.predict_proba(texts), q8.predict_proba(texts)
    assert np.abs(p - p8).max() < 0.05
    assert (p.argmax(1) == p8.argmax(1)).all()
    assert clintune.load(out).int8_linears == 0          # the override does not stick to the directory


@needs_int8
def test_query_key_value_quantise_their_input_once(tiny_backbone, monkeypatch):
    import gc
    import weakref

    from transformers import BertModel

    enc = BertModel.from_pretrained(tiny_backbone, add_pooling_layer=False).eval()
    quantize_int8(enc)
    calls = []
    real = masks.quantize_u8
    monkeypatch.setattr(masks, "quantize_u8", lambda x, fixed=None: calls.append(x.shape) or real(x, fixed))
    with torch.inference_mode():
        enc(input_ids=torch.tensor([[2, 5, 6, 3]]), attention_mask=torch.ones(1, 4, dtype=torch.long))
    assert len(calls) == 2 * 4        # per layer: q/k/v once, attention output, intermediate, output
    # outside inference mode a change in place since is seen
    shared, x = _SharedInput(), torch.randn(3, 8)
    a = shared.codes_of(x)
    assert shared.codes_of(x) is a
    x.mul_(2)
    assert shared.codes_of(x) is not a
    b = shared.codes_of(x)
    assert shared.codes_of(x.view(3, 8)) is not b          # keyed on the object, not on its storage
    gone = weakref.ref(x)
    del x
    gc.collect()
    assert gone() is None                                  # the codes do not keep their input alive


@needs_int8
@pytest.mark.parametrize("algorithm", ["none", "tanh"])
def test_int8_linear_applies_gelu_as_it_writes(algorithm):
    torch.manual_seed(2)
    lin = nn.Linear(48, 20)
    x = torch.randn(5, 48) * 3
    plain = Int8Linear.from_linear(lin, _SharedInput())
    fused = Int8Linear.from_linear(lin, _SharedInput())
    fused.gelu = algorithm
    want = nn.functional.gelu(plain(x), approximate=algorithm)     # fp32 output: the same codes and products
    assert torch.allclose(fused(x), want, rtol=1e-6, atol=1e-6)
    other = "tanh" if algorithm == "none" else "none"              # and it is that GELU, not the other one
    assert not torch.allclose(fused(x), nn.functional.gelu(plain(x), approximate=other), rtol=1e-6, atol=1e-6)


def _tiny_encoder(kind: str, act: str):
    from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel

    torch.manual_seed(3)
    if kind == "bert":
        return BertModel(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, max_position_embeddings=64, hidden_act=act),
                         add_pooling_layer=False).eval()
    return DistilBertModel(DistilBertConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                            max_position_embeddings=64, activation=act)).eval()


@needs_int8
@pytest.mark.parametrize("kind", ["bert", "distilbert"])
@pytest.mark.parametrize("act, algorithm", [("gelu", "none"), ("gelu_pytorch_tanh", "tanh"), ("relu", None)])
def test_feed_forward_gelu_moves_into_the_int8_product(kind, act, algorithm, monkeypatch):
    import copy

    from clintune import quantize

    enc = _tiny_encoder(kind, act)
    ref = copy.deepcopy(enc)
    assert quantize_int8(enc) == 2 * 6
    with monkeypatch.context() as m:             # ref: the same int8 layers, the activation left where it was
        m.setattr(quantize, "_linear_then_gelu", lambda encoder: iter(()))
        assert quantize_int8(ref) == 2 * 6
    assert [m.gelu for m in enc.modules() if isinstance(m, Int8Linear) and m.gelu] == [algorithm] * 2 * bool(algorithm)
    ffns = [m for m in enc.modules() if type(m).__name__ in ("BertIntermediate", "FFN")]
    acts = [m.intermediate_act_fn if kind == "bert" else m.activation for m in ffns]
    assert len(ffns) == 2 and all(isinstance(a, nn.Identity) == (algorithm is not None) for a in acts)
    ids = torch.randint(5, 40, (3, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.inference_mode():
        a = enc(input_ids=ids, attention_mask=mask).last_hidden_state
        b = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)   # fp32: the same function, only where it is applied moved
    assert gelu_algorithm(nn.GELU()) == "none" and gelu_algorithm(nn.ReLU()) is None


@needs_int8
def test_quantize_from_the_command_line(tiny_backbone, binary_csv, tmp_path, capsys):
    from clintune.cli import main

    out = tmp_path / "m"
    clintune.train(tiny_config(tiny_backbone, binary_csv, out=str(out), quantize="int8"))
    assert clintune.load(out).int8_linears > 0             # a model trained with --quantize int8 predicts so
    assert clintune.load(out, quantize="none").int8_linears == 0
    assert main(["evaluate", "--model", str(out), "--data", binary_csv, "--quantize", "none"]) == 0
    assert main(["predict", "--model", str(out), "--data", binary_csv, "--out", str(tmp_path / "p.csv"),
                 "--quantize", "int8"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--model", str(out), "--data", binary_csv, "--quantize", "int4"])
    assert e.value.code == 2


def test_quantize_is_checked():
    with pytest.raises(ConfigError, match="--quantize"):
        clintune.TrainConfig(data="x.csv", quantize="int4")
    with pytest.raises(ConfigError, match="not --method tfidf"):
        clintune.TrainConfig(data="x.csv", method="tfidf", quantize="int8")
    with pytest.raises(ConfigError, match="not --device cuda"):
        clintune.TrainConfig(data="x.csv", device="cuda", quantize="int8")
    from clintune.quantize import require_cpu
    require_cpu("none", torch.device("cuda"))
    require_cpu("int8", torch.device("cpu"))
    with pytest.raises(ConfigError, match="CPU prediction only, not cuda"):
        require_cpu("int8", torch.device("cuda"))


@needs_int8
def test_int8_prediction_attends_with_the_int8_kernel(monkeypatch):
    """quantize_int8 marks the encoder's self-attention modules; clintune's attention then takes the int8 kernel
    for them (one call per layer), close to the bf16 kernel's result, and the bf16 kernel where it declines; where
    the bf16 kernels run on AMX tiles (faster there), the bf16 kernel."""
    from transformers import BertConfig, BertModel

    from clintune import fast

    lib = masks.compiled()
    if lib is None or not lib.attention_bf16_available() or not lib.attention_int8_available():
        pytest.skip("no AVX-512 BF16 and VNNI on this CPU: int8 prediction attends with the bf16 or chunked form")
    fast.register()
    torch.manual_seed(0)
    enc = BertModel(BertConfig(vocab_size=40, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=128, max_position_embeddings=64), add_pooling_layer=False).eval()
    enc.config._attn_implementation = "clintune"
    quantize_int8(enc)
    marked = [m for m in enc.modules() if getattr(m, "int8_attention", False)]
    assert len(marked) == 2 and all(type(m).__name__ == "BertSelfAttention" for m in marked)
    ids = torch.randint(5, 40, (3, 20), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 9:] = 0
    calls = []
    real = masks.attention_int8

    def run(kernel):
        monkeypatch.setattr(masks, "attention_int8", kernel)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return enc(input_ids=ids, attention_mask=mask).last_hidden_state.float()

    if fast._amx() and fast._attention_kernels():
        # the bf16 kernels' AMX form is the faster one there: int8 prediction attends through it
        assert not fast._int8_attention(marked[0])
        a = run(lambda *args: calls.append(1) or real(*args))
        assert calls == []
        with masks.amx_form(False):                             # the AVX-512 form: the int8 kernel again
            assert fast._int8_attention(marked[0])
            a = run(lambda *args: calls.append(1) or real(*args))
    else:
        a = run(lambda *args: calls.append(1) or real(*args))
    assert len(calls) == 2
    b = run(lambda *args: None)                                 # declined: the bf16 kernel
    assert len(calls) == 2 and not torch.equal(a, b)
    assert (a - b).norm() / b.norm() < 0.05


# --- int8-static: the feed-forward activations on calibrated ranges ---------------------------------------------

def _gelu_outputs(enc, run):
    """The GELU outputs (the first feed-forward linears' fp32 outputs) that ``run()`` produces, dynamic codes."""
    from clintune.quantize import static_sites

    seen = []
    hooks = [up.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone())) for _, up, _ in
             static_sites(enc)]
    run()
    for h in hooks:
        h.remove()
    return seen


@needs_int8
@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_static_codes_flow_from_the_first_feed_forward_linear_to_the_second(kind):
    from clintune.quantize import calibrate, set_static, static_sites

    enc = _tiny_encoder(kind, "gelu")
    quantize_int8(enc)
    sites = static_sites(enc)
    names = ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"] if kind == "bert" else \
        ["transformer.layer.0.ffn.lin2", "transformer.layer.1.ffn.lin2"]
    assert [n for n, _, _ in sites] == names
    assert all(enc.get_submodule(n) is down for n, _, down in sites)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, 40, (4, 12), generator=g)
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[2, 6:] = 0

    def run(i=ids):
        with torch.inference_mode():
            return enc(input_ids=i, attention_mask=mask).last_hidden_state

    dynamic = run()
    outs = _gelu_outputs(enc, run)
    inputs = {}                                 # every other linear's input, as the dynamic run gives it
    linears = {n: m for n, m in enc.named_modules() if isinstance(m, Int8Linear)}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, a[0].detach().float().clone()))
             for n, m in linears.items() if n not in names]
    run()
    for h in hooks:
        h.remove()
    assert len(inputs) == 5 * 2                 # query, key, value, attention output, first feed-forward: 2 layers
    ranges = calibrate(enc, run)
    # the range of each site is the smallest and largest GELU output the calibration run produced, and of each
    # other linear the smallest and largest value of its input
    assert ranges == {**{n: [o.min().item(), o.max().item()] for (n, _, _), o in zip(sites, outs)},
                      **{n: [x.min().item(), x.max().item()] for n, x in inputs.items()}}
    assert all(m.seen is None and m.codes_out is None and m.static_in is None for m in linears.values())
    set_static(enc, ranges, "test")
    for (n, up, down), o in zip(sites, outs):
        s, z = masks.affine_u8(*ranges[n])
        assert up.codes_out == down.codes_in == (s, z)
    assert all(linears[n].static_in == masks.affine_u8(*ranges[n]) for n in inputs)
    coded = _gelu_outputs(enc, run)             # now the first linear writes uint8 codes of its GELU output
    for (n, _, _), o, q in zip(sites, outs, coded):
        s, z = masks.affine_u8(*ranges[n])
        assert q.dtype == torch.uint8
        want = torch.clamp(torch.round(o.double() / s + z), 0, 255)
        diff = (q.double() - want).abs()
        assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99       # one code off where y/s sits at a tie
    static = run()
    assert (static - dynamic).norm() / dynamic.norm() < 0.02               # within the codes' error
    # values beyond the calibrated range are clipped to its ends, not wrapped around
    narrow = {**ranges, **{n: [lo, hi / 4] for n, (lo, hi) in ranges.items() if n in names}}
    set_static(enc, narrow, "test")
    for (n, _, _), o, q in zip(sites, outs, _gelu_outputs(enc, run)):
        s, z = masks.affine_u8(*narrow[n])
        over = o > (255 - z) * s + s
        assert over.any() and (q[over] == 255).all()
    with pytest.raises(clintune.errors.ModelDirError, match="other layers"):
        set_static(enc, {names[0]: ranges[names[0]]}, "x.json")
    with pytest.raises(clintune.errors.ModelDirError, match="other layers"):
        set_static(enc, {**ranges, "pooler.dense": [0.0, 1.0]}, "x.json")
    other = torch.randint(5, 40, (4, 12), generator=g)      # notes the ranges were not calibrated on
    set_static(enc, ranges, "test")
    full = run(other)
    set_static(enc, {n: ranges[n] for n in names}, "format 1")  # the feed-forward sites alone: the rest dynamic
    assert all(linears[n].static_in is None for n in inputs) and all(up.codes_out for _, up, _ in sites)
    ffn_only = run(other)
    assert not torch.equal(full, ffn_only) and (full - ffn_only).norm() / ffn_only.norm() < 0.02
    with pytest.raises(clintune.errors.ModelDirError, match="x.json: the range of .* two finite numbers"):
        set_static(enc, {**ranges, names[1]: [1.0, float("nan")]}, "x.json")


@needs_int8
def test_int8_static_layernorms_write_the_codes_their_readers_take(monkeypatch):
    """int8-static on BERT's fused prediction path: the embeddings and the sublayer ends write their output's uint8
    codes on the readers' calibrated range in the same pass (masks.add_norm / embed_norm with codes), so only the
    attention output is coded by a pass of its own; the probabilities are those of coding each input in a pass
    of its own on the same range, bit for bit."""
    from clintune import fast
    from clintune.quantize import _producers, calibrate, set_static

    if masks.compiled() is None:
        pytest.skip("no C compiler: nothing is fused")
    enc = _tiny_encoder("bert", "gelu").requires_grad_(False)
    fast.replace_dropout(enc)
    fused = fast.fuse_passes(enc)
    assert len(fused["embeddings"]) == 1 and len(fused["sublayer_end"]) == 4
    quantize_int8(enc)
    ids = torch.randint(5, 40, (4, 12), generator=torch.Generator().manual_seed(5))

    def run(i=ids):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return enc(input_ids=i, attention_mask=torch.ones_like(i)).last_hidden_state

    set_static(enc, calibrate(enc, run), "test")
    producers = _producers(enc)
    assert [type(p).__name__ for p, _ in producers] == ["FusedBertEmbeddings", "FusedBertSelfOutput",
                                                        "FusedBertOutput", "FusedBertSelfOutput"]
    assert all(p.codes_next == readers[0].static_in for p, readers in producers)
    calls = []
    real = masks.quantize_u8
    monkeypatch.setattr(masks, "quantize_u8", lambda x, fixed=None: calls.append(fixed) or real(x, fixed))
    other = torch.randint(5, 40, (4, 12), generator=torch.Generator().manual_seed(6))
    fused_codes = run(other)
    assert len(calls) == 2 and all(c is not None for c in calls)      # the attention outputs alone, on their range
    for p, _ in producers:
        p.codes_next = None
    calls.clear()
    own_pass = run(other)
    assert len(calls) == 2 * 3 and torch.equal(fused_codes, own_pass)


needs_amx_int8 = pytest.mark.skipif(not (int8_available() and masks.int8_linear_available(64, 32)),
                                    reason="no AMX int8 tiles here: the int8 linears stay oneDNN's")


@needs_amx_int8
def test_amx_gelu_is_the_exact_gelu_to_fp32_rounding():
    """The kernel's GELU, max(x, 0) - H(|x|) with H by 32 polynomials, against x Phi(x) in float64 over [-12, 12]
    and a few larger values: within 3e-8 plus half an fp32 step of x; its tanh approximation is not."""
    import math

    x = torch.cat([torch.linspace(-12, 12, 480_000), torch.tensor([-1e4, -40.0, 1e-30, -1e-30, 40.0, 1e4])])
    x = torch.cat([x, torch.zeros((-len(x)) % 16)]).contiguous()
    y = torch.empty_like(x)
    masks.compiled().gelu_lanes_f32(x.data_ptr(), y.data_ptr(), len(x))
    xd = x.double()
    exact = xd * 0.5 * torch.erfc(-xd / math.sqrt(2))
    err = (y.double() - exact).abs()
    assert (err <= 3e-8 + xd.abs() * 2 ** -24).all(), err.max().item()
    tanh = torch.nn.functional.gelu(xd, approximate="tanh")
    assert (tanh - exact).abs().max() > 100 * err.max()


def _int8_case(m: int, n: int = 96, k: int = 192):
    """A seeded linear, its int8 weight and scales, and uint8 codes x (m, k) on (0.02, 131)."""
    from clintune.quantize import _int8_weight

    g = torch.Generator().manual_seed(m)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.1)
        lin.bias.copy_(torch.randn(n, generator=g))
    q, sw = _int8_weight(lin)
    return lin, q, sw, torch.randint(0, 256, (m, k), generator=g, dtype=torch.uint8), 0.02, 131


@needs_amx_int8
@pytest.mark.parametrize("m", [1, 31, 32, 77])
def test_amx_int8_linear_computes_onednns_function(m):
    """y = s_x s_w[j] sum (q_x - z_x) q_w + b on AMX tiles against oneDNN's qlinear_pointwise on the same codes,
    rows that fill no whole tile included: fp32 within fp32 rounding, bf16 within one rounding step, with the
    exact GELU (fp32) likewise, and the uint8 codes of the GELU's output, against oneDNN's post-op and float64
    rounding, equal but at most a few a step apart (where y / s sits a hair from a half step), clipped at both
    ends of the range."""
    import math

    lin, q, sw, x, sx, zx = _int8_case(m)
    n, b = q.shape[0], lin.bias.detach()
    tiles = masks.int8_tiles(q)
    packed = torch.ops.onednn.qlinear_prepack(q, None)

    def onednn(out, post="none", codes=(1.0, 0)):
        return torch.ops.onednn.qlinear_pointwise(x, sx, zx, packed, sw, torch.zeros(n, dtype=torch.int32), b,
                                                  codes[0], codes[1], out, post, [], "none" if post == "gelu" else "")

    y = (x.double() - zx) @ q.double().t() * (sx * sw.double()) + b.double()
    exact = y * 0.5 * torch.erfc(-y / math.sqrt(2))
    for gelu, want in ((False, y), (True, exact)):
        got = masks.int8_linear(x, sx, zx, tiles, sw, b, gelu=gelu)
        assert got.dtype == torch.float32 and got.shape == (m, n)
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
        assert torch.allclose(got, onednn(torch.float32, "gelu" if gelu else "none"), rtol=1e-5, atol=1e-5)
    got = masks.int8_linear(x, sx, zx, tiles, sw, b, out=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert ((got.double() - y).abs() <= y.abs() * 2 ** -8 + 1e-6).all()
    assert (got == onednn(torch.bfloat16)).float().mean() > 0.99
    codes = masks.affine_u8(-0.1, 3.0)                          # GELU reaches -0.17: both ends clip
    got = masks.int8_linear(x, sx, zx, tiles, sw, b, gelu=True, codes=codes)
    assert got.dtype == torch.uint8
    rounded = torch.clamp(torch.round(exact / codes[0] + codes[1]), 0, 255)
    for want in (onednn(torch.uint8, "gelu", codes).int(), rounded.int()):
        diff = (got.int() - want).abs()
        assert diff.max() <= 1 and diff.sum() <= 2
    assert (got == 0).any() and (got == 255).any()


@needs_amx_int8
def test_int8_bert_predicts_through_the_amx_linears(monkeypatch):
    """A BERT whose widths the tiles take (64 -> 128): quantize_int8 packs every linear for the tiles (no oneDNN
    weight beside), and dynamic and int8-static prediction go through masks.int8_linear (six per layer), each as
    close to the same model on oneDNN's products as the codes' rounding allows; a tanh GELU stays oneDNN's."""
    import copy

    from transformers import BertConfig, BertModel

    from clintune.quantize import calibrate, set_static

    torch.manual_seed(0)
    enc = BertModel(BertConfig(vocab_size=40, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=128, max_position_embeddings=64), add_pooling_layer=False).eval()
    ref = copy.deepcopy(enc)
    tanh = BertModel(BertConfig(vocab_size=40, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=128, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh"),
                     add_pooling_layer=False).eval()
    quantize_int8(enc)
    quantize_int8(tanh)
    with monkeypatch.context() as m:
        m.setattr(masks, "int8_linear_available", lambda k, n: False)
        quantize_int8(ref)
    lins = [m for m in enc.modules() if isinstance(m, Int8Linear)]
    assert len(lins) == 12 and all(m.tiles is not None and m.packed is None for m in lins)
    assert all(m.tiles is None and m.packed is not None for m in ref.modules() if isinstance(m, Int8Linear))
    assert [m.tiles is None for m in tanh.modules() if isinstance(m, Int8Linear)] == [False] * 4 + [True, False] + \
        [False] * 4 + [True, False]                             # the first feed-forward linears: oneDNN's
    ids = torch.randint(5, 40, (3, 20), generator=torch.Generator().manual_seed(4))

    def run(model):
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state

    calls = []
    real = masks.int8_linear
    monkeypatch.setattr(masks, "int8_linear", lambda *a, **kw: calls.append(kw.get("codes")) or real(*a, **kw))
    for static in (False, True):
        if static:
            for model in (enc, ref):
                set_static(model, calibrate(model, lambda: run(model)), "test")
        calls.clear()
        a, b = run(enc), run(ref)
        assert len(calls) == 12 and sum(c is not None for c in calls) == 2 * static   # the GELU's codes
        assert (a - b).norm() / b.norm() < 1e-3


@needs_int8
def test_int8_static_trains_saves_and_reloads_its_calibration(tiny_backbone, binary_csv, tmp_path):
    import json

    from clintune.errors import ClintuneError, ModelDirError

    out = tmp_path / "m"
    res = clintune.train(tiny_config(tiny_backbone, binary_csv, out=str(out), quantize="int8-static"))
    cal = json.loads((out / "int8_calibration.json").read_text())
    n_train = res.record["data"]["n_train"]
    assert cal["notes"] == min(256, n_train) and cal["source"] == "training split"
    ffn = ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]
    linears = {n for n, m in res.classifier.model.encoder.named_modules() if isinstance(m, Int8Linear)}
    assert cal["format"] == 2 and set(cal["ranges"]) == linears and set(ffn) < linears   # every linear's input
    assert all(lo <= 0 < hi for lo, hi in (cal["ranges"][n] for n in ffn))   # GELU outputs: down to -0.17, and up
    assert res.record["cost"]["int8_calibration_seconds"] > 0
    texts = ["patient with heart failure and chest pain", "rash on the skin of the arm"] * 4
    again = clintune.load(out)                      # the saved ranges: the same probabilities, bit for bit
    assert again.calibration["ranges"] == cal["ranges"]
    assert np.array_equal(again.predict_proba(texts), res.classifier.predict_proba(texts))
    dyn = clintune.load(out, quantize="int8")
    assert np.abs(dyn.predict_proba(texts) - again.predict_proba(texts)).max() < 0.05
    # a calibration of format 1 (the feed-forward sites alone, before every input was calibrated) still loads
    (out / "int8_calibration.json").write_text(json.dumps({**cal, "format": 1,
                                                           "ranges": {n: cal["ranges"][n] for n in ffn}}))
    old = clintune.load(out)
    assert sum(m.static_in is not None for m in old.model.encoder.modules() if isinstance(m, Int8Linear)) == 0
    assert np.abs(old.predict_proba(texts) - again.predict_proba(texts)).max() < 0.05
    # other notes give other ranges; a model trained without int8-static has none saved
    plain = tmp_path / "plain"
    clintune.train(tiny_config(tiny_backbone, binary_csv, out=str(plain)))
    with pytest.raises(ModelDirError, match="no int8 calibration .*--calibration FILE"):
        clintune.load(plain, quantize="int8-static")
    mine = clintune.load(plain, quantize="int8-static", calibration=texts)
    assert mine.calibration["notes"] == len(texts) and mine.predict_proba(texts).shape == (8, 2)
    with pytest.raises(ConfigError, match="--calibration: for --quantize int8-static"):
        clintune.load(plain, quantize="int8", calibration=texts)
    (out / "int8_calibration.json").write_text("{not json")
    with pytest.raises(ModelDirError, match="int8_calibration.json: corrupt"):
        clintune.load(out)
    # a Classifier made int8-static by hand predicts only once calibrated
    from clintune.modeling import Classifier
    c = Classifier(mine.model, mine.tokenizer, mine.label_map, mine.config)
    with pytest.raises(ClintuneError, match="not calibrated"):
        c.predict_proba(texts)
    with pytest.raises(ClintuneError, match="for --quantize int8-static, not none"):
        clintune.load(plain).calibrate(texts)


@needs_int8
def test_int8_static_from_the_command_line(tiny_backbone, binary_csv, tmp_path, capsys):
    from clintune.cli import main

    out = tmp_path / "m"
    clintune.train(tiny_config(tiny_backbone, binary_csv, out=str(out)))
    assert main(["evaluate", "--model", str(out), "--data", binary_csv, "--quantize", "int8-static",
                 "--calibration", binary_csv]) == 0
    assert main(["predict", "--model", str(out), "--data", binary_csv, "--out", str(tmp_path / "p.csv"),
                 "--quantize", "int8-static", "--calibration", binary_csv]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--data", binary_csv, "--quantize", "int8-static"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no int8 calibration" in err[0] and "Traceback" not in err[0]
    assert main(["evaluate", "--model", str(out), "--data", binary_csv, "--quantize", "int8-static",
                 "--calibration", str(tmp_path / "missing.csv")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.csv" in err[0]
