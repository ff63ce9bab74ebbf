"""The study's heads: exact parameter counts, padding invariance, every head with every method."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import clintune
from clintune.config import TrainConfig
from clintune.heads import HEADS

from conftest import TINY, VOCAB, tiny_config

H, K, R = 32, 3, 8


def head_params(name: str) -> int:
    return {
        "linear": H * K + K,
        "mlp": (H * H + H) + (H * K + K),
        "pooler": (H * H + H) + (H * K + K),
        "adapter": (H * R + R) + (R * H + H) + (H * K + K),
        "lightweight": (H * R + R) + (R * R + R) + 2 * R + (R * K + K),
        "tinyattention": 3 * (H * R + R) + (R * H + H) + (H * K + K),
        "grn": (H * R + R) + (R * R + R) + 2 * (R * H + H) + 2 * H + (H * K + K),
    }[name]


def make(name, **kw):
    cfg = TrainConfig(head=name, head_dim=R, progress=False, **kw)
    torch.manual_seed(0)
    return HEADS[name](H, K, cfg)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_head_parameter_counts_are_exact(name):
    assert sum(p.numel() for p in make(name).parameters()) == head_params(name)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_heads_ignore_padding_and_shapes(name):
    head = make(name, head_heads=2 if name == "tinyattention" else 1).eval()
    states = torch.randn(2, 5, H)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = head(states, mask)
    assert out.shape == (2, K)
    garbage = states.clone()
    garbage[0, 3:] = 1e3                                            # padded positions hold junk
    longer = torch.cat([garbage, torch.randn(2, 3, H)], 1)          # and more padding
    mask2 = torch.cat([mask, torch.zeros(2, 3, dtype=torch.long)], 1)
    torch.testing.assert_close(head(longer, mask2)[0], out[0], rtol=1e-5, atol=1e-5)


def test_zero_initialised_residuals_start_as_linear_heads():
    states, mask = torch.randn(2, 4, H), torch.ones(2, 4, dtype=torch.long)
    for name in ("adapter", "tinyattention"):
        head = make(name).eval()
        pooled = states.mean(1)
        torch.testing.assert_close(head(states, mask), head.out(pooled))


def test_pooler_head_starts_from_the_checkpoints_pooler(tiny_backbone, tmp_path):
    """--head pooler: W1, b1 are the checkpoint's pooler; W2 ~ N(0, s^2) and b2 = 0 (s = initializer_range);
    a checkpoint without a pooler gives W1 ~ N(0, s^2), b1 = 0 instead of transformers' fresh random one."""
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    from clintune.modeling import assemble

    saved = load_file(str(next(Path(tiny_backbone).glob("*.safetensors"))))
    key = next(k for k in saved if k.endswith("pooler.dense.weight"))
    torch.manual_seed(1)
    head = assemble(tiny_config(tiny_backbone, "unused.csv", head="pooler", pooling="cls"), K).model.head
    torch.testing.assert_close(head.dense.weight, saved[key], rtol=0, atol=0)
    torch.testing.assert_close(head.dense.bias, saved[key.replace("weight", "bias")], rtol=0, atol=0)
    assert torch.count_nonzero(head.out.bias) == 0 and abs(head.out.weight.std().item() - 0.02) < 0.006
    # the same head on other backbones' defaults: an mlp head keeps PyTorch's initialisation
    mlp = assemble(tiny_config(tiny_backbone, "unused.csv", head="mlp"), K).model.head
    assert not torch.equal(mlp.dense.weight, saved[key]) and torch.count_nonzero(mlp.out.bias) == K

    bare = tmp_path / "no-pooler"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(VOCAB), initializer_range=0.05, **TINY), add_pooling_layer=False).save_pretrained(bare)
    for f in Path(tiny_backbone).iterdir():
        if "token" in f.name or f.name == "vocab.txt":
            shutil.copy(f, bare / f.name)
    head = assemble(tiny_config(str(bare), "unused.csv", head="pooler", pooling="cls"), K).model.head
    assert torch.count_nonzero(head.dense.bias) == 0 and abs(head.dense.weight.std().item() - 0.05) < 0.01
    assert abs(head.out.weight.std().item() - 0.05) < 0.015


def test_pooler_head_has_no_dropout_before_its_dense_layer():
    """BERT's form: dropout only between the pooler and the classifier, so every input coordinate gets a
    gradient in training; the mlp head drops some of them out."""
    x = torch.randn(4, H, requires_grad=True)
    for name, all_reach in (("pooler", True), ("mlp", False)):
        head = make(name, head_dropout=0.5).train()
        (g,) = torch.autograd.grad(head.vector(x).sum(), x)
        assert bool((g != 0).all()) is all_reach


def test_lora_pooler_model_is_transformers_peft_classifier(tiny_backbone):
    """`--method lora --head pooler --pooling cls` is the model a Hugging Face Trainer + PEFT user trains
    (BertForSequenceClassification, LoRA on query/key/value, pooler and classifier in modules_to_save):
    the same trainable parameters, and with the same values the same logits and gradients (fp32, dropout
    off; clintune's last layer computes the [CLS] row only)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from clintune.modeling import assemble

    torch.manual_seed(0)
    cfg = tiny_config(tiny_backbone, "unused.csv", head="pooler", pooling="cls", lora_r=4, lora_alpha=8,
                      target_modules=["query", "key", "value"])
    ours = assemble(cfg, K).model
    assert ours.first_token_only
    peer = AutoModelForSequenceClassification.from_pretrained(tiny_backbone, num_labels=K)
    peer = get_peft_model(peer, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "key", "value"],
                                           modules_to_save=["classifier", "pooler"]))

    def peer_name(name: str) -> str:
        if name.startswith("encoder."):
            return "base_model.model.bert." + name[len("encoder.base_model.model."):]
        layer, attr = name.split(".")[1:]
        return {"dense": "base_model.model.bert.pooler.modules_to_save.default.dense.",
                "out": "base_model.model.classifier.modules_to_save.default."}[layer] + attr

    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    theirs = dict(peer.named_parameters())
    assert {peer_name(n) for n in mine} == {n for n, p in theirs.items() if p.requires_grad}
    with torch.no_grad():
        for n, p in mine.items():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)      # LoRA's B starts at zero: give the update a value to compare
            theirs[peer_name(n)].copy_(p)
    ids = torch.randint(5, len(VOCAB), (4, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[3, 4:] = 0
    y = torch.tensor([0, 1, 2, 1])
    ours.eval(), peer.eval()
    a = ours(input_ids=ids, attention_mask=mask)
    b = peer(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.nn.functional.cross_entropy(a, y).backward()
    torch.nn.functional.cross_entropy(b, y).backward()
    for n, p in mine.items():
        torch.testing.assert_close(p.grad, theirs[peer_name(n)].grad, rtol=1e-4, atol=1e-7, msg=n)


def test_grn_gate_and_norm_follow_the_formula():
    head = make("grn").eval()
    s = torch.randn(1, 3, H)
    a = s.mean(1)
    eta = head.w1(torch.nn.functional.elu(head.w2(a)))
    g = head.gate(eta)
    glu = torch.sigmoid(g[..., H:]) * g[..., :H]
    z = torch.nn.functional.layer_norm(a + glu, (H,), head.norm.weight, head.norm.bias)
    torch.testing.assert_close(head(s, torch.ones(1, 3, dtype=torch.long)), head.out(z))


@pytest.mark.parametrize("name", ["pooler", "adapter", "lightweight", "tinyattention", "grn"])
@pytest.mark.parametrize("method", ["frozen", "full", "lora", "ia3"])
def test_every_head_trains_with_every_method(name, method, tiny_backbone, multiclass_csv, tmp_path):
    out = tmp_path / "m"
    lr = {"frozen": 1e-2, "full": 1e-3, "lora": 5e-3, "ia3": 5e-2}[method]
    res = clintune.train(tiny_config(tiny_backbone, multiclass_csv, method=method, head=name, head_dim=R,
                                     epochs=1, lr=lr, out=str(out)))
    rec = json.loads((out / "record.json").read_text())
    assert rec["config"]["head"] == name and rec["status"] == "success"
    if method == "frozen":
        assert rec["cost"]["trainable_params"] == head_params(name)
    texts = ["heart rash", "fracture today"]
    np.testing.assert_array_equal(res.classifier.predict_proba(texts), clintune.load(out).predict_proba(texts))
