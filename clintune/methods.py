"""Adaptation methods: how much of the backbone trains, and how it is saved.

A method is registered by name (``@register_method("lora")``) and implements four steps:
``apply`` (make the right parameters trainable, wrapping the encoder if needed), ``save`` (write only
what was trained), ``load`` (rebuild from the base encoder plus what was saved) and ``for_inference``
(an equivalent, faster module for prediction, e.g. LoRA merged into the weights).

* ``full``: every backbone weight trains; the whole encoder is saved (safetensors).
* ``frozen``: the backbone is fixed and runs in eval mode; only the head trains (Setup 2 of Le et al.,
  arXiv 2407.19299). Nothing of the backbone is saved.
* ``lora``: low-rank updates through Hugging Face ``peft``: h = W0 x + (alpha / r) B A x with
  A in R^{r x d_in}, B in R^{d_out x r}, B initialised to 0 (Hu et al., arXiv 2106.09685).
* ``ia3``: learned rescaling vectors through ``peft``: keys and values are scaled elementwise by l_k,
  l_v and the feed-forward input by l_ff, all initialised to 1 (Liu et al., arXiv 2205.05638). With peft's
  defaults for BERT-like encoders (targets ``key``, ``value``, ``output.dense``; feed-forward ``output.dense``),
  the name ``output.dense`` also matches attention's output projection, so each layer has a fourth vector
  scaling that projection's input (d): per layer d + d + d + d_ff parameters (16,128 on MiniLM-L6 before the
  head), as in Taylor et al.'s peft runs and the Trainer + PEFT peer. ``--target-modules`` and
  ``--feedforward-modules`` choose others. The vectors are not weight-decayed (they start at 1).

LoRA and IA3 adapters are saved in peft's own format (``adapter/adapter_model.safetensors`` and
``adapter_config.json``), loadable with ``peft.PeftModel.from_pretrained``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError

METHODS: dict[str, "Method"] = {}


def register_method(name: str):
    def deco(cls):
        inst = cls()
        inst.name = name
        METHODS[name] = inst
        return cls
    return deco


class Method:
    name = ""
    #: does the backbone run in train mode (dropout) and need gradients?
    backbone_trains = True
    #: does reloading start from the original pretrained backbone (False: the saved one suffices)?
    needs_base = True

    def apply(self, encoder: nn.Module, cfg) -> nn.Module:
        raise NotImplementedError

    def save(self, encoder: nn.Module, directory: Path) -> None:
        raise NotImplementedError

    def load(self, base: nn.Module, directory: Path) -> nn.Module:
        raise NotImplementedError

    def for_inference(self, encoder: nn.Module) -> nn.Module:
        return encoder

    def resolved(self, encoder: nn.Module, cfg) -> dict:
        """Config values this method resolved (e.g. default target modules), for the saved config."""
        return {}


@register_method("full")
class Full(Method):
    needs_base = False

    def apply(self, encoder, cfg):
        encoder.requires_grad_(True)
        return encoder

    def save(self, encoder, directory):
        from .backbones import quiet_transformers

        with quiet_transformers():  # no "Writing model shards" progress bar
            encoder.save_pretrained(directory / "backbone", safe_serialization=True)

    def load(self, base, directory):
        from .backbones import load_encoder

        return load_encoder(str(directory / "backbone"))


@register_method("frozen")
class Frozen(Method):
    backbone_trains = False

    def apply(self, encoder, cfg):
        encoder.requires_grad_(False)
        return encoder.eval()

    def save(self, encoder, directory):
        pass

    def load(self, base, directory):
        return base.requires_grad_(False).eval()


# Default target modules by `config.model_type`. LoRA adapts the attention projections (query, key,
# value), as in Taylor et al. (arXiv 2402.10597); IA3 follows peft's own defaults.
LORA_TARGETS = {
    "bert": ["query", "key", "value"], "roberta": ["query", "key", "value"],
    "camembert": ["query", "key", "value"], "xlm-roberta": ["query", "key", "value"],
    "electra": ["query", "key", "value"], "ernie": ["query", "key", "value"],
    "distilbert": ["q_lin", "k_lin", "v_lin"], "deberta-v2": ["query_proj", "key_proj", "value_proj"],
    "deberta": ["in_proj"], "mpnet": ["q", "k", "v"], "modernbert": ["Wqkv"],
    "clintune-scratch": ["q_proj", "k_proj", "v_proj"],
}
IA3_TARGETS = {
    "distilbert": (["k_lin", "v_lin", "lin2"], ["lin2"]),
    "clintune-scratch": (["k_proj", "v_proj", "fc2"], ["fc2"]),
}


def _model_type(encoder: nn.Module) -> str:
    return getattr(getattr(encoder, "config", None), "model_type", "") or ""


def lora_targets(encoder: nn.Module, cfg) -> list[str]:
    if cfg.target_modules:
        return list(cfg.target_modules)
    mt = _model_type(encoder)
    if mt in LORA_TARGETS:
        return LORA_TARGETS[mt]
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as M
    if mt in M:
        return list(M[mt])
    raise ConfigError(f"--target-modules: no default LoRA targets for model type '{mt}'; name them, "
                      "e.g. --target-modules query,value")


def ia3_targets(encoder: nn.Module, cfg) -> tuple[list[str], list[str]]:
    mt = _model_type(encoder)
    if mt in IA3_TARGETS:
        targets, ff = IA3_TARGETS[mt]
    else:
        from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as F,
                                          TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as T)
        if mt in T:
            targets, ff = T[mt], F.get(mt, [])
        elif mt in ("camembert", "xlm-roberta", "electra", "ernie"):
            targets, ff = T["roberta"], F["roberta"]
        else:
            targets, ff = None, None
    targets = list(cfg.target_modules) if cfg.target_modules else targets
    ff = list(cfg.feedforward_modules) if cfg.feedforward_modules is not None else ff
    if not targets:
        raise ConfigError(f"--target-modules: no default IA3 targets for model type '{mt}'; name them "
                          "with --target-modules and --feedforward-modules")
    ff = [m for m in (ff or []) if m in targets]
    return list(targets), ff


class _Peft(Method):
    def peft_config(self, encoder, cfg):
        raise NotImplementedError

    def apply(self, encoder, cfg):
        from peft import get_peft_model

        try:
            return get_peft_model(encoder, self.peft_config(encoder, cfg))
        except ValueError as e:
            if "not found" in str(e) or "Target modules" in str(e):
                raise ConfigError(f"--target-modules: {str(e).splitlines()[0]}") from None
            raise

    def save(self, encoder, directory):
        encoder.save_pretrained(str(directory / "adapter"), safe_serialization=True)

    def load(self, base, directory):
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(directory / "adapter"), is_trainable=False)

    def for_inference(self, encoder):
        # Merge the adapter into the base weights: same function, no extra matmuls at predict time.
        return encoder.merge_and_unload()


@register_method("lora")
class Lora(_Peft):
    def peft_config(self, encoder, cfg):
        from peft import LoraConfig

        return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=lora_targets(encoder, cfg), bias="none")

    def resolved(self, encoder, cfg):
        return {"target_modules": lora_targets(encoder, cfg)}


@register_method("ia3")
class IA3(_Peft):
    def peft_config(self, encoder, cfg):
        from peft import IA3Config

        targets, ff = ia3_targets(encoder, cfg)
        return IA3Config(target_modules=targets, feedforward_modules=ff)

    def resolved(self, encoder, cfg):
        targets, ff = ia3_targets(encoder, cfg)
        return {"target_modules": targets, "feedforward_modules": ff}


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors are counted once."""
    seen, trainable, total = set(), 0, 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
