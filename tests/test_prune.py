"""The last layer computing only the first token's row: the same logits and gradients as the whole layer."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

import clintune
from clintune import prune
from clintune.config import TrainConfig
from clintune.modeling import assemble

from conftest import tiny_config


def _tiny(kind: str, impl: str):
    from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    if kind == "bert":
        cfg = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)
        cls = BertModel
    else:
        cfg = DistilBertConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)
        cls = DistilBertModel
    cfg._attn_implementation = impl
    return cls(cfg)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 40, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    return ids, mask


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
@pytest.mark.parametrize("impl", ["sdpa", "eager", "clintune"])
def test_first_row_equals_the_whole_layers_first_row_with_its_gradients(kind, impl):
    from clintune import fast

    fast.register()
    model = _tiny(kind, impl).eval()
    ids, mask = _batch()
    results = []
    for trimmed in (False, True):
        if trimmed:
            assert prune.first_token_only(model) and prune.first_token_only(model)     # idempotent
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert out.shape == ((3, 1, 32) if trimmed else (3, 12, 32))
        (out[:, 0] * torch.linspace(-1, 1, 32)).sum().backward()
        results.append((out[:, 0].detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                             if p.grad is not None}))
    (full, g_full), (first, g_first) = results
    torch.testing.assert_close(first, full, rtol=1e-6, atol=1e-6)
    assert g_first.keys() == g_full.keys() and len(g_full) > 10
    for n in g_full:                      # every weight of the last layer still learns, from the first row
        torch.testing.assert_close(g_first[n], g_full[n], rtol=1e-5, atol=1e-6, msg=n)
    prune.restore(model)
    assert model(input_ids=ids, attention_mask=mask).last_hidden_state.shape == (3, 12, 32)
    assert not any(hasattr(type(m), "_first_token_of") for m in model.modules())


def test_trimmed_model_keeps_its_state_dict_and_leaves_other_encoders_alone():
    model = _tiny("bert", "sdpa")
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    prune.first_token_only(model)
    assert {k: v for k, v in model.state_dict().items()}.keys() == keys.keys()
    assert all(torch.equal(v, keys[k]) for k, v in model.state_dict().items())
    assert not prune.first_token_only(torch.nn.Sequential(torch.nn.Linear(4, 4)))


@pytest.mark.parametrize("head,pooling,method,trimmed", [
    ("pooler", "cls", "lora", True), ("linear", "cls", "full", True), ("grn", "cls", "ia3", True),
    ("linear", "mean", "lora", False), ("adapter", "cls", "lora", False), ("tinyattention", "cls", "full", False),
    ("linear", "cls", "frozen", False)])
def test_assembly_trims_exactly_when_the_head_reads_only_the_first_token(tiny_backbone, head, pooling, method,
                                                                          trimmed):
    cfg = TrainConfig(data="x", backbone=tiny_backbone, method=method, head=head, pooling=pooling)
    model = assemble(cfg, 2).model
    assert model.first_token_only is trimmed
    ids, mask = _batch()
    assert model.encode(ids, mask).shape[1] == (1 if trimmed else 12)
    no = assemble(cfg.replace(fast=False), 2).model
    assert not no.first_token_only and no.encode(ids, mask).shape[1] == 12


def test_lora_trains_the_same_and_reloads_exactly_with_the_trimmed_last_layer(tiny_backbone, binary_csv, tmp_path):
    """No dropout anywhere: the trimmed and the whole last layer train to the same model (fp32 noise only);
    the saved model reloads trimmed and gives the same probabilities bit for bit."""
    import shutil
    from transformers import BertConfig

    bb = tmp_path / "nodrop"
    shutil.copytree(tiny_backbone, bb)
    c = BertConfig.from_pretrained(bb)
    c.hidden_dropout_prob = c.attention_probs_dropout_prob = 0.0
    c.save_pretrained(bb)
    kw = dict(method="lora", head="pooler", pooling="cls", lora_dropout=0.0, head_dropout=0.0, epochs=2)
    trimmed = clintune.train(tiny_config(str(bb), binary_csv, out=str(tmp_path / "t"), **kw))
    whole = clintune.train(tiny_config(str(bb), binary_csv, fast=False, **kw))
    texts = pd.read_csv(binary_csv)["text"].tolist()[:30]
    a, b = trimmed.classifier.predict_proba(texts), whole.classifier.predict_proba(texts)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert trimmed.record["cost"]["speedups"]["last_layer"] == "first token only"
    reloaded = clintune.load(tmp_path / "t")
    assert reloaded.model.first_token_only
    np.testing.assert_array_equal(reloaded.predict_proba(texts), a)
    rec = json.loads((tmp_path / "t" / "record.json").read_text())
    assert rec["metrics"] == trimmed.metrics
