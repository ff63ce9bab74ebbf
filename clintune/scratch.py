"""Small Transformer encoders trained from scratch, with a tokenizer learned from the user's notes.

Le et al. (arXiv 2407.19299) found that simple Transformers trained from scratch on the hospital's own
notes matched or beat adapter-augmented biomedical encoders, in under 6 hours of training against
over 1,000. ``scratch-small`` and ``scratch-base`` are Hugging Face BERT encoders (the same building
blocks as every other backbone: SDPA attention, post-LayerNorm blocks) with random initialisation:

    scratch-small: 2 layers, hidden 128, 2 heads, feed-forward 512
    scratch-base:  4 layers, hidden 256, 4 heads, feed-forward 1024

(``--scratch-layers/--scratch-hidden/--scratch-heads`` override either). They are trained end to end
(``--method full``) with the same loop, heads, metrics and cost accounting as pretrained backbones.

The tokenizer is a WordPiece (or byte-level BPE) model trained with Hugging Face ``tokenizers`` on the
*training split only* (never validation or test texts), with NFC normalisation, lower-casing and
accents kept (French clinical text: "fièvre" and "fievre" stay distinct words, "œ" is kept), and
saved with the model. It holds sub-words from the notes, so a saved model is as private as the notes.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import BackboneError, ConfigError

PRESETS = {
    "scratch-small": {"layers": 2, "hidden": 128, "heads": 2},
    "scratch-base": {"layers": 4, "hidden": 256, "heads": 4},
}
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def is_scratch(name: str) -> bool:
    return name.startswith("scratch-")


@dataclass
class ScratchSpec:
    layers: int
    hidden: int
    heads: int

    @classmethod
    def from_config(cls, cfg) -> "ScratchSpec":
        if cfg.backbone not in PRESETS:
            raise BackboneError(f"backbone '{cfg.backbone}': unknown scratch model (known: {', '.join(PRESETS)})")
        p = PRESETS[cfg.backbone]
        spec = cls(cfg.scratch_layers or p["layers"], cfg.scratch_hidden or p["hidden"], cfg.scratch_heads or p["heads"])
        if spec.hidden % spec.heads:
            raise ConfigError(f"--scratch-hidden {spec.hidden} must be divisible by --scratch-heads {spec.heads}")
        return spec


def train_tokenizer(texts: list[str], vocab_size: int, model: str = "wordpiece"):
    """Learn a tokenizer from ``texts`` (the training split) and wrap it as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if model == "wordpiece":
        tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tk.normalizer = normalizers.Sequence([
            normalizers.NFC(),
            normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=True)])
        tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tk.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS)
    elif model == "bpe":
        tk = Tokenizer(models.BPE(unk_token="[UNK]"))
        tk.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:  # pragma: no cover - validated by the config
        raise ConfigError(f"--tokenizer-model: unknown '{model}'")
    tk.train_from_iterator(texts, trainer=trainer, length=len(texts))
    cls_id, sep_id = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def build_scratch(cfg, train_texts: list[str]):
    """(randomly initialised BERT encoder, tokenizer learned from ``train_texts``)."""
    from transformers import BertConfig, BertModel

    spec = ScratchSpec.from_config(cfg)
    tokenizer = train_tokenizer(train_texts, cfg.vocab_size, cfg.tokenizer_model)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                        num_attention_heads=spec.heads, intermediate_size=4 * spec.hidden,
                        max_position_embeddings=max(cfg.max_length, 8), type_vocab_size=1,
                        pad_token_id=tokenizer.pad_token_id)
    config._attn_implementation = "sdpa"
    encoder = BertModel(config, add_pooling_layer=False)
    return encoder, tokenizer


def param_count(spec: ScratchSpec, vocab: int, max_positions: int) -> int:
    """Parameters of a scratch encoder (for tests and sizing): embeddings + layers, no pooler."""
    h, f = spec.hidden, 4 * spec.hidden
    emb = vocab * h + max_positions * h + 1 * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * f + f) + (f * h + h) + 2 * h
    return emb + spec.layers * layer
