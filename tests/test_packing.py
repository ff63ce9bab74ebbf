"""Prediction without padding (clintune.packing): the kernels on packed sequences, pack/unpack, a packed BERT
encoder against the padded one (whole and with its last layer trimmed to the first token), and Classifier."""
import json

import numpy as np
import pytest
import torch

import clintune
from clintune import fast, masks
from clintune.packing import STARTS, first_position, pack

from conftest import tiny_config


def _kernels(int8: bool) -> bool:
    lib = masks.compiled()
    return bool(lib is not None and lib.attention_bf16_available() and (not int8 or lib.attention_int8_available()))


def _packed_qkv(lengths, h, d, seed=0):
    torch.manual_seed(seed)
    n = sum(lengths)
    starts = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int64)
    x = torch.randn(1, n, 3 * h * d).bfloat16()          # one projection's output, as the encoder makes them
    q, k, v = (x[..., i * h * d:(i + 1) * h * d].view(1, n, h, d).transpose(1, 2) for i in range(3))
    return q, k, v, starts


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("d", [32, 64])
def test_packed_kernels_give_each_sequence_its_own_attention_bit_for_bit(int8, d):
    if not _kernels(int8):
        pytest.skip("no AVX-512 BF16 (and VNNI) kernels on this CPU")
    kernel = masks.attention_int8 if int8 else masks.attention
    lengths, h, t = [256, 250, 17, 1, 100, 64, 33], 3, 256
    q, k, v, starts = _packed_qkv(lengths, h, d)
    out = kernel(q, k, v, None, d ** -0.5, starts=starts)
    assert out.shape == (1, sum(lengths), h, d)
    for b, n in enumerate(lengths):
        a = int(starts[b])
        rows = slice(a, a + n)
        alone = kernel(q[:, :, rows], k[:, :, rows], v[:, :, rows], None, d ** -0.5)
        assert torch.equal(out[0, rows], alone[0]), b

        def padded(z):
            p = torch.zeros(1, h, t, d, dtype=z.dtype)
            p[:, :, :n] = z[:, :, rows]
            return p

        mask = torch.zeros(1, 1, 1, t, dtype=torch.bool)
        mask[..., :n] = True
        assert torch.equal(out[0, rows], kernel(padded(q), padded(k), padded(v), mask, d ** -0.5)[0, :n]), b


def test_packed_kernels_refuse_offsets_that_do_not_fit():
    if not _kernels(False):
        pytest.skip("no AVX-512 BF16 kernels on this CPU")
    q, k, v, starts = _packed_qkv([5, 7], 2, 32)
    for bad in (torch.tensor([0, 5, 11]), torch.tensor([1, 5, 12]), torch.tensor([0, 7, 5, 12]), torch.tensor([0]),
                torch.tensor([0, 5, 12], dtype=torch.int32)):
        with pytest.raises(ValueError, match="starts"):
            masks.attention(q, k, v, None, 0.2, starts=bad)
    with pytest.raises(ValueError, match="mask"):
        masks.attention(q, k, v, torch.ones(1, 1, 12, 12, dtype=torch.bool), 0.2, starts=starts)
    with pytest.raises(ValueError, match="prediction"):
        masks.attention(q, k, v, None, 0.2, starts=starts, probs=torch.empty(2, 2, 7, 7, dtype=torch.bfloat16))


def test_pack_lays_the_notes_end_to_end_and_unpack_puts_them_back():
    ids = torch.tensor([[2, 10, 11, 12, 3], [2, 13, 3, 0, 0], [2, 3, 0, 0, 0]])
    mask = (ids != 0).long()
    kwargs, layout = pack(ids, mask)
    assert kwargs["input_ids"].tolist() == [[2, 10, 11, 12, 3, 2, 13, 3, 2, 3]]
    assert kwargs["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1]]
    assert kwargs[STARTS].tolist() == [0, 5, 8, 10]
    # no padding, said outright: transformers would otherwise read the restarting positions as packed sequences
    # and build an (N, N) block-diagonal mask for every forward pass
    assert kwargs["attention_mask"].tolist() == [[1] * 10]
    states = torch.arange(10.0).view(1, 10, 1).expand(1, 10, 2)
    back = layout.unpack(states, first_token_only=False)
    assert back[..., 0].tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 0, 0], [8, 9, 0, 0, 0]]
    assert layout.unpack(states[:, :3], first_token_only=True).shape == (3, 1, 2)
    # rounded: a filler sequence after the notes (the first ids again, positions from 0), dropped by unpack
    assert pack(ids, mask, round_rows=True)[0]["input_ids"].shape == (1, 10)       # under 32 tokens: as they are
    long = torch.randint(5, 40, (3, 20), generator=torch.Generator().manual_seed(0))
    lmask = (torch.arange(20) < torch.tensor([20, 17, 14])[:, None]).long()
    kwargs, layout = pack(long, lmask, first_position=2, round_rows=True)
    assert kwargs["input_ids"].shape == (1, 52) and kwargs["attention_mask"].tolist() == [[1] * 52]  # 51 -> 52
    assert kwargs[STARTS].tolist() == [0, 20, 37, 51, 52] and layout.starts.tolist() == [0, 20, 37, 51]
    assert kwargs["input_ids"][0, 51] == long[0, 0] and kwargs["position_ids"][0, 51] == 2
    states = torch.arange(52.0).view(1, 52, 1)
    assert layout.unpack(states, first_token_only=False)[lmask.bool()].flatten().tolist() == list(range(51))
    assert layout.unpack(states[:, [0, 20, 37, 51]], first_token_only=True).flatten().tolist() == [0, 20, 37]
    left = torch.tensor([[0, 2, 3], [2, 10, 3]])
    assert pack(left, (left != 0).long()) is None                         # left padding: stays padded
    assert pack(ids, torch.zeros_like(mask)) is None                      # an empty row: stays padded


KINDS = ("bert", "roberta", "distilbert", "electra")
PAD = {"bert": 0, "roberta": 1, "distilbert": 0, "electra": 0}


def _encoder(trim: bool, int8: bool = False, kind: str = "bert"):
    """A tiny encoder of the ``kind``'s code with clintune's attention (head size 32, which the kernels take)."""
    import transformers as tr

    from clintune.prune import first_token_only
    from clintune.quantize import quantize_int8

    fast.register()
    torch.manual_seed(0)
    size = dict(vocab_size=40, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                max_position_embeddings=64)
    if kind == "bert":
        enc = tr.BertModel(tr.BertConfig(**size), add_pooling_layer=False)
    elif kind == "roberta":
        enc = tr.RobertaModel(tr.RobertaConfig(**{**size, "max_position_embeddings": 66}, pad_token_id=1),
                              add_pooling_layer=False)
    elif kind == "electra":
        enc = tr.ElectraModel(tr.ElectraConfig(**size, embedding_size=48))
    else:
        enc = tr.DistilBertModel(tr.DistilBertConfig(vocab_size=40, dim=64, n_layers=2, n_heads=2, hidden_dim=128,
                                                     max_position_embeddings=64))
    enc.eval().config._attn_implementation = fast.ATTENTION
    if trim:
        assert first_token_only(enc)
    if int8:
        quantize_int8(enc)
    return enc


def _batch(pad: int = 0):
    ids = torch.randint(5, 40, (4, 24), generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([24, 20, 9, 1])
    mask = (torch.arange(24) < lengths[:, None]).long()
    ids[:, 0] = 2
    return ids.masked_fill(mask == 0, pad), mask


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("trim", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_a_packed_encoder_gives_the_padded_batchs_outputs(kind, trim, precision):
    """Every real token's state (or each note's first row, last layer trimmed) as in the padded batch: to fp32
    rounding in fp32 (attention one sequence at a time), bf16's rounding with the kernels, and int8's coding
    (its dynamic ranges no longer see the padding). BERT's, RoBERTa's (positions from padding_idx + 1),
    DistilBERT's and ELECTRA's code."""
    if precision != "fp32" and not _kernels(precision == "int8"):
        pytest.skip("no AVX-512 BF16 (and VNNI) kernels on this CPU")
    enc = _encoder(trim, int8=precision == "int8", kind=kind)
    first = first_position(enc)
    assert first == (2 if kind == "roberta" else 0)
    ids, mask = _batch(PAD[kind])
    kwargs, layout = pack(ids, mask, first)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "fp32"):
        padded = enc(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        packed = layout.unpack(enc(**kwargs).last_hidden_state, trim).float()
    real = mask.bool()[:, :1] if trim else mask.bool()
    assert packed.shape == padded.shape and (packed[~real] == 0).all()
    err = float((packed[real] - padded[real]).norm() / padded[real].norm())
    assert err < {"fp32": 1e-6, "bf16": 1e-2, "int8": 5e-2}[precision], err


def test_rounded_rows_allows_seventeen_row_counts_an_octave_and_under_a_sixteenth_more_rows():
    from clintune.packing import rounded_rows

    assert [rounded_rows(n) for n in (1, 20, 31, 32, 33, 63, 64, 65, 4095, 4096, 4097)] == \
        [1, 20, 31, 32, 34, 64, 64, 68, 4096, 4096, 4352]
    for lo in (64, 512, 2048):
        counts = {rounded_rows(n) for n in range(lo, 2 * lo)}
        assert len(counts) == 17 and all(rounded_rows(n) - n < n / 16 for n in range(lo, 2 * lo))


@pytest.mark.parametrize("trim", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_rounded_packed_sequence_gives_the_notes_the_same_states(trim, precision):
    """The filler only adds rows: each note's rows are those of the packed sequence without it, to fp32 rounding
    (attention one sequence at a time; the filler joined to the last note would move its rows by about 1e-2),
    and in bf16 through the kernels up to the products blocking the rows otherwise (bf16's last bit)."""
    if precision == "bf16" and not _kernels(False):
        pytest.skip("no AVX-512 BF16 kernels on this CPU")
    enc = _encoder(trim)
    ids, mask = _batch()
    mask[3, 1] = 1                                            # 55 tokens: rounded to 56
    outs = []
    for rounded in (False, True):
        kwargs, layout = pack(ids, mask, round_rows=rounded)
        assert kwargs["input_ids"].shape[1] == (56 if rounded else 55)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            outs.append(layout.unpack(enc(**kwargs).last_hidden_state, trim).float())
    assert outs[0].shape == outs[1].shape
    tol = {"fp32": 1e-5, "bf16": 2e-2}[precision]
    assert float((outs[0] - outs[1]).abs().max()) <= tol * float(outs[0].abs().max())


def test_packed_attention_runs_the_kernel_once_per_layer_or_each_sequence_without_it(monkeypatch):
    if not _kernels(False):
        pytest.skip("no AVX-512 BF16 kernels on this CPU")
    enc = _encoder(trim=False)
    ids, mask = _batch()
    kwargs, _ = pack(ids, mask)
    calls, real = [], masks.attention
    monkeypatch.setattr(masks, "attention", lambda *a, **k: calls.append(k.get("starts") is not None) or real(*a, **k))

    def run():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return enc(**kwargs).last_hidden_state.float()

    a = run()
    # one packed call per layer; where the kernels do not run (AMX tiles not lent), SDPA one note at a time
    assert calls == ([True, True] if fast._attention_kernels() else [])
    calls.clear()
    enc.config._attn_implementation = fast.NO_KERNEL    # PyTorch's products, one note at a time
    b = run()
    assert calls == [] and float((a - b).norm() / b.norm()) < 1e-2
    with pytest.raises(ValueError, match="prediction"):
        fast.attention(enc.encoder.layer[0].attention.self, *(torch.zeros(1, 2, 4, 32, requires_grad=True),) * 3,
                       None, **{STARTS: torch.tensor([0, 4])})


def test_packing_is_for_encoders_whose_positions_and_attention_it_knows():
    """BERT's, RoBERTa's, ELECTRA's and DistilBERT's code with clintune's attention and its compiled kernels at a
    head size they take: elsewhere packed notes would attend one at a time, or be numbered otherwise."""
    from transformers import AlbertConfig, AlbertModel, BertConfig, BertModel, GPT2Model

    enc = _encoder(trim=False)
    assert first_position(enc) == 0
    enc.config._attn_implementation = fast.NO_KERNEL
    assert first_position(enc) is None
    enc.config._attn_implementation = "sdpa"
    assert first_position(enc) is None
    heads16 = BertModel(BertConfig(vocab_size=40, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   intermediate_size=128, max_position_embeddings=64), add_pooling_layer=False)
    heads16.config._attn_implementation = fast.ATTENTION
    assert first_position(heads16) is None
    assert [first_position(_encoder(False, kind=k)) for k in KINDS] == [0, 2, 0, 0]
    # ALBERT: BERT-like modules, but its own model code (shared layers), so not taken for BERT
    albert = AlbertModel(AlbertConfig(vocab_size=40, embedding_size=32, hidden_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=128))
    albert.config._attn_implementation = fast.ATTENTION
    assert first_position(albert) is None
    # transformers wraps many forwards in one generic decorator: the code compared is what it wraps
    assert not fast._same_code(GPT2Model.forward, BertModel.forward)
    assert fast._same_code(BertModel.forward, BertModel.forward)


@pytest.fixture(scope="module", params=["bert", "roberta", "distilbert"])
def packing_backbone(request, tiny_backbone, tmp_path_factory):
    from conftest import build_kernel_backbone

    kind = request.param
    return build_kernel_backbone(tiny_backbone, tmp_path_factory.mktemp(f"kernel-{kind}"), kind), kind


def test_a_classifier_predicts_packed_with_the_padded_probabilities(packing_backbone, binary_csv, tmp_path,
                                                                   monkeypatch):
    """A bf16 CPU Classifier packs its notes (the kernels here), with the padded batches' probabilities to bf16
    noise, whole last layer or trimmed, with BERT's, RoBERTa's (positions from padding_idx + 1) and DistilBERT's
    code; ``--fast-off packing`` keeps padded batches."""
    import yaml

    from clintune import modeling

    if not _kernels(False):
        pytest.skip("no AVX-512 BF16 kernels on this CPU: prediction stays padded")
    shipped = fast._attention_kernels()     # False on an AMX CPU whose tiles are not lent: made to run here
    monkeypatch.setattr(fast, "_attention_kernels", lambda: True)
    kernel_backbone, kind = packing_backbone
    texts = ["heart cardiac noted", "rash eczema today", "cardiac", "skin rash rash eczema heart noted today",
             "patient presents with history of acute chronic heart infarction noted on exam today"]
    packs, real = [], modeling.pack
    monkeypatch.setattr(modeling, "pack", lambda *a: packs.append(1) or real(*a))
    for pooling in ("cls", "mean"):
        out = tmp_path / pooling
        clintune.train(tiny_config(kernel_backbone, binary_csv, precision="bf16", epochs=1, pooling=pooling,
                                   head="pooler" if pooling == "cls" else "mlp", out=str(out)))
        clf = clintune.load(out)
        assert clf.model.packed and clf.model.first_token_only == (pooling == "cls")
        assert clf.model.first_position == (1 if kind == "roberta" else 0)          # RoBERTa: padding_idx 0 + 1
        assert clf.model.round_rows                                       # bf16: to a few lengths
        record = json.loads((out / "record.json").read_text())
        assert record["cost"]["speedups"]["prediction"] == "notes packed without padding"
        packs.clear()
        packed = clf.predict_proba(texts)
        assert packs                                                  # went through pack()
        clf.model.packed = False
        padded = clf.predict_proba(texts)
        np.testing.assert_allclose(packed, padded, atol=5e-3)
        assert (packed.argmax(1) == padded.argmax(1)).all()
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    (out / "config.yaml").write_text(yaml.safe_dump({**cfg, "fast_off": ["packing"]}))
    assert not clintune.load(out).model.packed
    (out / "config.yaml").write_text(yaml.safe_dump({**cfg, "precision": "fp32"}))
    assert not clintune.load(out).model.packed                      # fp32: the kernels are bf16
    monkeypatch.undo()                      # as shipped: packed wherever the kernels run (AMX form included)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert clintune.load(out).model.packed == shipped
