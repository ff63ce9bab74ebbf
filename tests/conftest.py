"""Shared fixtures: a tiny BERT built inside the tests, and small labelled datasets with real signal."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = SHARED / "data"

NEUTRAL = ("patient presents with history of the left right acute chronic mild severe noted on exam today "
           "reports denies pain since week month year follow up visit review plan treatment stable").split()
MARKERS = {
    "cardio": "heart cardiac infarction arrhythmia hypertension coronary".split(),
    "skin": "rash eczema dermatitis lesion psoriasis ulcer".split(),
    "bone": "fracture femur osteoporosis tibia sprain joint".split(),
}
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIALS + sorted(set(NEUTRAL + [w for ws in MARKERS.values() for w in ws] + ["é", "##s", "##ed"]))

# the tiny encoder: 2 layers, hidden 32, 2 heads, feed-forward 64
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=128, type_vocab_size=2)


def make_texts(classes: list[str], n: int, seed: int = 0) -> pd.DataFrame:
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        c = classes[i % len(classes)]
        words = rnd.choices(NEUTRAL, k=rnd.randint(4, 14)) + rnd.choices(MARKERS[c], k=rnd.randint(1, 2))
        rnd.shuffle(words)
        rows.append({"text": " ".join(words) + f" {i}", "label": c})
    rnd.shuffle(rows)
    return pd.DataFrame(rows)


def build_tiny_backbone(d: Path) -> str:
    """A 2-layer BERT with a 56-word WordPiece vocabulary, saved as a local Hugging Face directory."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(VOCAB)}
    tk = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]")
    tok.save_pretrained(str(d))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(VOCAB), **TINY))
    model.save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="session", autouse=True)
def private_feature_cache(tmp_path_factory):
    """Tests never write to the user's feature cache."""
    os.environ["CLINTUNE_CACHE_DIR"] = str(tmp_path_factory.mktemp("feature-cache"))


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> str:
    return build_tiny_backbone(tmp_path_factory.mktemp("tiny-bert"))


def build_kernel_backbone(tiny_backbone: str, d: Path, kind: str = "bert") -> str:
    """The tiny BERT's tokenizer with a 2-layer encoder of head size 32, which the attention kernels take: BERT's
    code, or RoBERTa's or DistilBERT's (the same WordPiece tokenizer; RoBERTa's padding_idx is its [PAD])."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel, RobertaConfig, RobertaModel

    for f in Path(tiny_backbone).iterdir():
        if "token" in f.name or f.name.startswith("vocab"):
            shutil.copy(f, d / f.name)
    vocab = BertConfig.from_pretrained(tiny_backbone).vocab_size
    size = {**TINY, "hidden_size": 64, "intermediate_size": 128}
    torch.manual_seed(0)
    if kind == "bert":
        model = BertModel(BertConfig(vocab_size=vocab, **size))
    elif kind == "roberta":
        model = RobertaModel(RobertaConfig(vocab_size=vocab, **{**size, "max_position_embeddings": 130,
                                                                 "type_vocab_size": 1}, pad_token_id=0))
    else:
        model = DistilBertModel(DistilBertConfig(vocab_size=vocab, dim=64, n_layers=2, n_heads=2, hidden_dim=128,
                                                 max_position_embeddings=128, pad_token_id=0))
    model.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def kernel_backbone(tiny_backbone, tmp_path_factory):
    """The tiny BERT's tokenizer with a 2-layer encoder of head size 32, which the attention kernels take."""
    return build_kernel_backbone(tiny_backbone, tmp_path_factory.mktemp("kernel-bert"))


@pytest.fixture(scope="session")
def binary_csv(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("binary")
    df = make_texts(["cardio", "skin"], 400, seed=1)
    df["label"] = (df["label"] == "cardio").astype(int)
    p = d / "notes.csv"
    df.to_csv(p, index=False)
    return str(p)


@pytest.fixture(scope="session")
def multiclass_csv(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("multi")
    p = d / "notes.csv"
    make_texts(["cardio", "skin", "bone"], 180, seed=2).to_csv(p, index=False)
    return str(p)


def tiny_config(backbone: str, data: str, **kw):
    from clintune import TrainConfig

    base = dict(data=data, backbone=backbone, method="lora", epochs=2, batch_size=16, max_length=32,
                progress=False, seed=7, precision="fp32", lr=5e-3)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present (a user's clone has none)")
    return SHARED_DATA
