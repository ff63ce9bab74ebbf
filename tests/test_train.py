"""End to end on a tiny BERT: every method trains, saves only what trained, reloads exactly."""
import json

import numpy as np
import pandas as pd
import pytest

import clintune
from clintune.errors import ModelDirError

from conftest import tiny_config

RECORD_COST_KEYS = {"train_seconds", "train_samples_per_s", "predict_samples_per_s", "peak_rss_mb",
                    "peak_gpu_mb", "trainable_params", "total_params"}


@pytest.mark.parametrize("method", ["full", "frozen", "lora", "ia3"])
def test_each_method_trains_saves_and_reloads_exactly(method, tiny_backbone, binary_csv, tmp_path):
    out = tmp_path / method
    lr = {"full": 1e-3, "frozen": 2e-2, "lora": 1e-2, "ia3": 1e-1}[method]   # frozen: 5e-2 overshoots with the mlp head on some seeds
    res = clintune.train(tiny_config(tiny_backbone, binary_csv, method=method, out=str(out), lr=lr, epochs=10,
                                     patience=0))
    rec = json.loads((out / "record.json").read_text())
    assert rec["status"] == "success" and rec["config"]["method"] == method and rec["config"]["head"] == "mlp"
    assert {"accuracy", "precision", "recall", "f1", "auroc"} <= set(rec["metrics"])
    assert RECORD_COST_KEYS <= set(rec["cost"])
    assert {"packages", "git_sha", "device", "threads", "threads_from"} <= set(rec["env"])
    assert rec["metrics"]["accuracy"] > 0.6, rec["metrics"]    # balanced classes: chance is 0.5
    saved = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert "head.safetensors" in saved and not any(s.endswith((".bin", ".pt", ".pkl")) for s in saved)
    if method == "full":
        assert any(s.startswith("backbone/") and s.endswith(".safetensors") for s in saved)
    elif method in ("lora", "ia3"):
        assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= saved
        assert not any(s.startswith("backbone/") for s in saved)
    else:
        assert not any(s.startswith(("backbone/", "adapter/")) for s in saved)
    texts = pd.read_csv(binary_csv)["text"].tolist()[:40]
    before = res.classifier.predict_proba(texts)
    after = clintune.load(out).predict_proba(texts)
    np.testing.assert_array_equal(before, after)
    preds = pd.read_csv(out / "test_predictions.csv")
    assert len(preds) == rec["data"]["n_test"] and {"row", "gold", "predicted_label", "prob_0", "prob_1"} <= set(preds)


def test_same_seed_same_metrics_and_weights(tiny_backbone, binary_csv):
    a = clintune.train(tiny_config(tiny_backbone, binary_csv, method="lora"))
    b = clintune.train(tiny_config(tiny_backbone, binary_csv, method="lora"))
    c = clintune.train(tiny_config(tiny_backbone, binary_csv, method="lora", seed=8))
    assert a.metrics == b.metrics
    texts = ["heart cardiac today", "rash on the arm"]
    np.testing.assert_array_equal(a.classifier.predict_proba(texts), b.classifier.predict_proba(texts))
    assert not np.array_equal(a.classifier.predict_proba(texts), c.classifier.predict_proba(texts))


def test_multiclass_string_labels_and_predict_evaluate(tiny_backbone, multiclass_csv, tmp_path):
    out = tmp_path / "m"
    clintune.train(tiny_config(tiny_backbone, multiclass_csv, method="full", lr=2e-3, epochs=4, out=str(out)))
    rec = json.loads((out / "record.json").read_text())
    assert rec["metrics"]["labels"] == ["bone", "cardio", "skin"]
    assert {"f1_macro", "f1_micro"} <= set(rec["metrics"]) and rec["metrics"]["f1"] == rec["metrics"]["f1_macro"]
    pred_out = tmp_path / "pred.jsonl"
    df = clintune.predict(out, multiclass_csv, pred_out)
    back = pd.read_json(pred_out, lines=True)
    assert len(back) == 180 and {"text", "label", "predicted_label", "prob_bone", "prob_cardio", "prob_skin"} <= set(back)
    np.testing.assert_allclose(back[["prob_bone", "prob_cardio", "prob_skin"]].sum(1), 1, atol=1e-5)
    ev = clintune.evaluate(out, multiclass_csv, out=tmp_path / "ev.json")
    assert json.loads((tmp_path / "ev.json").read_text())["metrics"]["n"] == 180
    assert ev["metrics"]["accuracy"] == pytest.approx((df["predicted_label"] == df["label"]).mean())


def test_early_stopping_restores_the_best_epoch(tiny_backbone, binary_csv):
    res = clintune.train(tiny_config(tiny_backbone, binary_csv, method="frozen", lr=0.5, epochs=12, patience=1,
                                     val_metric="loss"))
    tr = res.record["training"]
    scores = [h["val_score"] for h in tr["history"]]
    assert tr["best_epoch"] == 1 + int(np.argmax(scores))
    if tr["stopped_early"]:
        assert tr["epochs_run"] == tr["best_epoch"] + 1 and tr["epochs_run"] < 12


def test_out_dir_is_never_half_written(tiny_backbone, binary_csv, tmp_path, monkeypatch):
    out = tmp_path / "run"
    import clintune.api as api

    def boom(*a, **k):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(api, "write_table", boom)   # fails after weights were written
    with pytest.raises(RuntimeError):
        clintune.train(tiny_config(tiny_backbone, binary_csv, out=str(out), epochs=1))
    rec = json.loads((out / "record.json").read_text())
    assert rec["status"] == "failed" and "disk on fire" in rec["error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]        # no partial dirs left behind
    assert [p.name for p in out.iterdir()] == ["record.json"]           # no weights that look usable
    with pytest.raises(ModelDirError, match="holds a failed run"):
        clintune.load(out)


def test_existing_out_is_refused_before_training(tiny_backbone, binary_csv, tmp_path):
    from clintune.errors import ConfigError

    (tmp_path / "x").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        clintune.train(tiny_config(tiny_backbone, binary_csv, out=str(tmp_path / "x")))


def test_backbone_fingerprint_guards_reload(tiny_backbone, binary_csv, tmp_path):
    import shutil
    import torch
    from transformers import BertModel

    bb = tmp_path / "bb"
    shutil.copytree(tiny_backbone, bb)
    out = tmp_path / "lora"
    clintune.train(tiny_config(str(bb), binary_csv, out=str(out), epochs=1))
    m = BertModel.from_pretrained(bb)
    with torch.no_grad():
        m.embeddings.word_embeddings.weight.add_(1.0)
    m.save_pretrained(bb)
    with pytest.raises(ModelDirError, match="fingerprint mismatch"):
        clintune.load(out)


def test_a_model_trained_on_a_gpu_predicts_on_a_cpu(tiny_backbone, binary_csv, tmp_path):
    import torch
    import yaml
    from clintune.errors import ConfigError

    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    out = tmp_path / "lora"
    clintune.train(tiny_config(tiny_backbone, binary_csv, out=str(out), epochs=1))
    texts = ["patient with heart failure", "rash on the skin"]
    want = clintune.load(out).predict_proba(texts)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg.update(device="cuda", precision="fp16")           # as a run on a GPU saves it
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    clf = clintune.load(out)
    assert clf.runtime.device.type == "cpu" and clf.runtime.precision in ("bf16", "fp32")
    assert np.abs(clf.predict_proba(texts) - want).max() < 0.02
    assert clintune.load(out, precision="fp32").runtime.precision == "fp32"
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        clintune.load(out, device="cuda")


def test_micro_batches_give_the_same_training(tiny_backbone, binary_csv, tmp_path):
    import shutil
    from transformers import BertConfig

    bb = tmp_path / "nodrop"                                   # no dropout: the two runs see the same maths
    shutil.copytree(tiny_backbone, bb)
    cfg = BertConfig.from_pretrained(bb)
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
    cfg.save_pretrained(bb)
    runs = [clintune.train(tiny_config(str(bb), binary_csv, method="full", lr=1e-3, head_dropout=0.0, epochs=2,
                                       micro_batch_tokens=m)) for m in (0, 40)]
    assert [r.record["cost"]["micro_batch_tokens"] for r in runs] == [0, 40]
    texts = ["heart cardiac noted", "rash eczema today"]
    np.testing.assert_allclose(runs[0].classifier.predict_proba(texts), runs[1].classifier.predict_proba(texts),
                               atol=2e-5)


@pytest.mark.parametrize("task", ["classification", "multilabel", "ner"])
def test_loss_sums_split_into_micro_batches_add_up_to_the_mean(task):
    import torch
    from clintune.tasks import IGNORE, Targets, TokenTargets, get_task

    g = torch.Generator().manual_seed(0)
    lm = clintune.data.LabelMap(["O", "B-X", "I-X"] if task == "ner" else ["a", "b", "c"])
    if task == "classification":
        y, logits = torch.tensor([0, 2, 1, 2, 0]), torch.randn(5, 3, generator=g)
        t = Targets(y.numpy())
    elif task == "multilabel":
        y, logits = (torch.rand(5, 3, generator=g) > 0.5).float(), torch.randn(5, 3, generator=g)
        t = Targets(y.numpy())
    else:
        y = torch.tensor([[0, 1, 2, IGNORE], [IGNORE, 0, 0, 1], [1, 2, IGNORE, IGNORE], [0, 0, 0, 0], [2, 1, 0, 0]])
        logits = torch.randn(5, 4, 3, generator=g)
        t = TokenTargets([r.numpy() for r in y])
    for weighted in (False, True):
        loss = get_task(task).loss(lm, t, weighted)
        whole = loss.mean(logits, y)
        total = loss.norm(y[:2]) + loss.norm(y[2:])
        parts = (loss(logits[:2], y[:2]) + loss(logits[2:], y[2:])) / total
        torch.testing.assert_close(parts, whole)
    if task == "classification":
        torch.testing.assert_close(get_task(task).loss(lm, t, False).mean(logits, y),
                                   torch.nn.functional.cross_entropy(logits, y))


def test_no_bucket_trains_on_plain_random_batches(tiny_backbone, binary_csv, monkeypatch):
    from clintune import training
    from clintune.batching import train_batches

    lengths = np.array([3, 50, 4, 48, 5, 47, 6, 46, 7, 45, 8, 44])
    plain = train_batches(lengths, 4, np.random.default_rng(0), bucket=False)
    perm = np.random.default_rng(0).permutation(len(lengths))
    assert [b.tolist() for b in plain] == [perm[i: i + 4].tolist() for i in range(0, 12, 4)]
    bucketed = train_batches(lengths, 4, np.random.default_rng(0))
    assert sum(np.ptp(lengths[b]) for b in bucketed) < sum(np.ptp(lengths[b]) for b in plain)  # less padding

    seen = []
    monkeypatch.setattr(training, "train_batches", lambda l, b, rng, bucket: seen.append(bucket) or
                        train_batches(l, b, rng, bucket))
    for bucket in (False, True):
        res = clintune.train(tiny_config(tiny_backbone, binary_csv, method="lora", epochs=1, bucket=bucket))
        assert res.record["config"]["bucket"] is bucket
    assert seen == [False, True]


def test_cpu_evaluation_runs_in_token_capped_pieces(tiny_backbone, binary_csv, monkeypatch):
    from clintune import training
    from clintune.batching import Encoded

    enc = Encoded([np.arange(n) for n in (30, 9, 17, 3, 25, 12)], np.zeros(6, bool), 0)
    pieces = list(training.make_feed(enc).eval_batches(4, max_tokens=40))
    assert sorted(np.concatenate([idx for _, idx in pieces]).tolist()) == list(range(6))
    assert len(pieces) > 2                                   # two batches of at most 4, cut further
    for inputs, idx in pieces:   # padded tokens the model sees; one long note may stand alone
        assert len(idx) == 1 or inputs["input_ids"].numel() <= 40
    res = clintune.train(tiny_config(tiny_backbone, binary_csv, method="lora", epochs=1, precision="fp32"))
    texts = ["heart cardiac noted today", "rash", "fracture femur follow up visit review plan"] * 5
    monkeypatch.setattr(training, "EVAL_TOKENS_CPU", None)
    whole = res.classifier.predict_proba(texts)
    monkeypatch.setattr(training, "EVAL_TOKENS_CPU", 24)
    np.testing.assert_allclose(res.classifier.predict_proba(texts), whole, atol=1e-6)


def test_batches_come_in_few_shapes_padded_to_32_and_cut_into_equal_micro_batches():
    """16 notes of 130-256 tokens under 2048 tokens: two micro-batches of 8, all padded to a multiple of 32
    (oneDNN compiles kernels per shape: few shapes, little memory); short texts to multiples of 8."""
    from clintune import training
    from clintune.batching import Encoded, padded_length

    assert [padded_length(t) for t in (1, 20, 24, 64, 65, 96, 97, 130, 256)] == [8, 24, 24, 64, 96, 96, 128, 160, 256]
    lengths = [130, 256, 200, 140, 250, 190, 160, 170, 180, 210, 220, 230, 240, 135, 145, 155]
    feed = training.make_feed(Encoded([np.arange(n) for n in lengths], np.zeros(16, bool), 0))
    parts = feed.split(np.arange(16), 2048)
    assert [len(p) for p in parts] == [8, 8] and np.concatenate(parts).tolist() == list(range(16))
    assert [len(p) for p in feed.split(np.arange(16), 4096)] == [16]
    assert [len(p) for p in feed.split(np.arange(16), 1500)] == [4, 4, 4, 4]  # at most 5 of 256: 4 pieces
    assert [len(p) for p in feed.split(np.arange(13), 1500)] == [5, 4, 4]     # not 5 + 5 + 3
    shapes = {tuple(feed.make(p)["input_ids"].shape) for p in parts}
    assert shapes == {(8, 256)}
    short = feed.make(np.array([0, 3]))                       # 130 and 140 tokens -> 160
    assert tuple(short["input_ids"].shape) == (2, 160) and int(short["attention_mask"].sum()) == 270
    words = training.make_feed(Encoded([np.arange(n) for n in (17, 21)], np.zeros(2, bool), 0)).make(np.arange(2))
    assert tuple(words["input_ids"].shape) == (2, 24)         # a sentence is not padded to 32


def test_val_metric_auroc_on_a_one_class_validation_file_is_one_clear_error(tiny_backbone, binary_csv, tmp_path):
    from clintune.errors import DataError

    label = pd.read_csv(binary_csv)["label"].iloc[0]
    val = tmp_path / "val.csv"
    pd.DataFrame({"text": [f"validation note {i}" for i in range(10)], "label": label}).to_csv(val, index=False)
    with pytest.raises(DataError, match="--val-metric auroc: undefined on the validation split"):
        clintune.train(tiny_config(tiny_backbone, binary_csv, val_data=str(val), val_metric="auroc", epochs=1))


def test_default_micro_batch_tokens_follow_the_encoder_size_and_device():
    """Whole 16 x 256 batches (4,096 tokens) for encoders no bigger than MiniLM-L6 on CPU, 2,048 for larger ones
    (and where the size is unknown), none on GPUs or where no encoder trains."""
    from types import SimpleNamespace

    import torch

    from clintune.training import MICRO_TOKENS_CPU, MICRO_TOKENS_SMALL, default_micro_tokens

    def model(**cfg):
        m = torch.nn.Module()
        m.encoder = torch.nn.Linear(2, 2)
        m.encoder.config = SimpleNamespace(**cfg)
        return m

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert default_micro_tokens(model(num_hidden_layers=6, hidden_size=384), cpu) == MICRO_TOKENS_SMALL == 4096
    assert default_micro_tokens(model(n_layers=2, dim=64), cpu) == 4096                    # DistilBERT's names
    assert default_micro_tokens(model(num_hidden_layers=12, hidden_size=384), cpu) == MICRO_TOKENS_CPU == 2048
    assert default_micro_tokens(model(num_hidden_layers=6, hidden_size=768), cpu) == 2048
    assert default_micro_tokens(torch.nn.Linear(2, 2), cpu) == 2048                        # no config: unknown
    assert default_micro_tokens(model(num_hidden_layers=6, hidden_size=384), gpu) == 0
    frozen = model(num_hidden_layers=6, hidden_size=384)
    frozen.backbone_trains = False
    assert default_micro_tokens(frozen, cpu) == 0
