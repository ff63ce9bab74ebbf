"""Exact trainable-parameter counts per method, and gradients reaching only what should train."""
import pytest
import torch

from clintune.batching import collate, encode
from clintune.config import TrainConfig
from clintune.methods import count_parameters
from clintune.modeling import assemble

from conftest import TINY

H, L, FF, K = TINY["hidden_size"], TINY["num_hidden_layers"], TINY["intermediate_size"], 2
HEAD = (H * H + H) + (H * K + K)       # default mlp head: dense (H x H) + bias, out (K x H) + bias


def encoder_params(vocab: int) -> int:
    emb = vocab * H + TINY["max_position_embeddings"] * H + TINY["type_vocab_size"] * H + 2 * H
    layer = 4 * (H * H + H) + 2 * H + (H * FF + FF) + (FF * H + H) + 2 * H
    return emb + L * layer             # no pooler: clintune pools token states itself


EXPECTED = {
    "full": lambda v: encoder_params(v) + HEAD,
    "frozen": lambda v: HEAD,
    # LoRA r=4 on query, key, value (H -> H): A (r x H) + B (H x r) per module, 3 modules per layer
    "lora": lambda v: L * 3 * (2 * 4 * H) + HEAD,
    # IA3 (peft's BERT defaults): key, value scale outputs (H each); attention.output.dense and the FFN
    # output.dense are feed-forward modules scaled on their inputs (H and FF)
    "ia3": lambda v: L * (H + H + H + FF) + HEAD,
}


def build(method, tiny_backbone):
    cfg = TrainConfig(backbone=tiny_backbone, method=method, lora_r=4, lora_alpha=8, progress=False)
    torch.manual_seed(0)
    return assemble(cfg, K)


@pytest.mark.parametrize("method", ["full", "frozen", "lora", "ia3"])
def test_trainable_parameter_counts_are_exact(method, tiny_backbone):
    asm = build(method, tiny_backbone)
    vocab = asm.model.encoder.config.vocab_size if method in ("full", "frozen") else \
        asm.model.encoder.base_model.model.config.vocab_size
    trainable, total = count_parameters(asm.model)
    assert trainable == EXPECTED[method](vocab)
    assert total == encoder_params(vocab) + (trainable - HEAD if method in ("lora", "ia3") else 0) + HEAD


@pytest.mark.parametrize("method", ["full", "frozen", "lora", "ia3"])
def test_gradients_reach_exactly_the_trainable_parameters(method, tiny_backbone):
    asm = build(method, tiny_backbone)
    model = asm.model.train()
    enc = encode(asm.tokenizer, ["heart failure noted", "rash on the left arm today"], 32)
    ids, mask = collate(enc.ids, enc.pad_id)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = torch.nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask), torch.tensor([1, 0]))
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    got_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    if method == "frozen":
        assert got_grad == {"head.dense.weight", "head.dense.bias", "head.out.weight", "head.out.bias"}
    if method == "lora":  # B starts at zero, so only B (and the head) get a non-zero gradient at step 0
        assert all("lora_B" in n or n.startswith("head.") for n in got_grad) and len(got_grad) == 4 + L * 3
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed  # something trained


def test_frozen_backbone_runs_without_dropout_even_in_train_mode(tiny_backbone):
    asm = build("frozen", tiny_backbone)
    asm.model.train()
    assert not asm.model.encoder.training and asm.model.head.training


def test_lora_targets_can_be_chosen_and_bad_targets_are_clear(tiny_backbone):
    from clintune.errors import ConfigError

    cfg = TrainConfig(backbone=tiny_backbone, method="lora", lora_r=2, target_modules=["query"], progress=False)
    trainable, _ = count_parameters(assemble(cfg, K).model)
    assert trainable == L * 2 * 2 * H + HEAD
    with pytest.raises(ConfigError, match="--target-modules"):
        assemble(cfg.replace(target_modules=["nonexistent_proj"]), K)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_weight_decay_spares_biases_norms_and_ia3_scales(method, tiny_backbone):
    from clintune.training import _param_groups

    model = build(method, tiny_backbone).model
    decay, no_decay = _param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    spared = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    if method == "ia3":        # all L * 4 scaling vectors start at 1: no decay toward 0
        assert sum("ia3_l" in n for n in spared) == L * 4 and not any("ia3_l" in n for n in decayed)
    else:
        assert sum("lora_" in n for n in decayed) == L * 3 * 2
    assert all(n.endswith("bias") for n in spared if "ia3_l" not in n)
    assert spared | decayed == {n for n, p in model.named_parameters() if p.requires_grad}
