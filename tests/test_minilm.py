"""The embedded MiniLM backbone, trained for real (the one slower test), and backbone resolution."""
import pytest

import clintune
from clintune.backbones import resolve
from clintune.errors import BackboneError


def test_minilm_resolves_offline_from_the_package():
    src = resolve("minilm")
    assert src.kind == "embedded" and src.location.endswith("model")


def test_hub_ids_respect_offline_mode(monkeypatch):
    from clintune.backbones import load_backbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"):
        load_backbone("almanach/camembert-bio-base")


@pytest.mark.slow
def test_minilm_lora_learns_the_builtin_task(tmp_path):
    res = clintune.train(data="builtin:icd10-circulatory", backbone="minilm", method="lora", max_length=48,
                         epochs=2, batch_size=32, lr=1e-3, train_fraction=0.5, progress=False, out=str(tmp_path / "m"))
    m, c = res.metrics, res.cost
    assert m["f1"] > 0.85 and m["auroc"] > 0.95, m
    assert c["trainable_params"] == 6 * 3 * 2 * 8 * 384 + (384 * 384 + 384) + (384 * 2 + 2)  # LoRA r=8 q,k,v; mlp head
    assert c["total_params"] == 22_713_216 - (384 * 384 + 384) + c["trainable_params"]  # MiniLM minus its pooler
    again = clintune.load(tmp_path / "m")
    texts = ["Acute myocardial infarction", "Fracture of left femur"]
    assert again.predict(texts) == res.classifier.predict(texts) == [1, 0]
