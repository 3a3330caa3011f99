"""Export trained weights: safetensors by original names, or a Hugging Face directory; and read them back.

Schedule-Free optimizers hold two sets of weights: ``weights="eval"`` (the default) exports the averaged
iterate x that evaluation uses, ``"train"`` the point y where gradients are taken; for other optimizers
both are the parameters. Tied tensors are written once, under their first name (as safetensors'
``save_model`` does, so ``safetensors.torch.load_model(model, path)`` loads the file); ``load(path)``
gives back every name, for ``model.load_state_dict(..., strict=True)``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import safe_open, save_file
from torch import nn

from bitpipe_fx.errors import ConfigError

WEIGHTS = ("eval", "train")
ALIASES = "bitpipe_fx.aliases"  # safetensors metadata key: {alias: name written}


def check_weights(weights: str) -> str:
    """``weights`` itself, or ConfigError naming the valid choices."""
    if weights not in WEIGHTS:
        raise ConfigError(f"weights={weights!r} is not one of {WEIGHTS}: 'eval' exports Schedule-Free's averaged "
                          "weights x (what evaluation uses), 'train' the weights y where gradients are taken")
    return weights


def mode_values(
    params: Mapping[str, nn.Parameter], optimizer: torch.optim.Optimizer | None, weights: str, training: bool
) -> dict[str, torch.Tensor]:
    """Copies of ``params`` (by name) as they are in mode ``weights``; the parameters and optimizer are unchanged.

    ``training`` says which mode the parameters hold now (it matters only for an optimizer with train()/eval()).
    """
    check_weights(weights)
    mode_weights = getattr(optimizer, "mode_weights", None)
    if callable(mode_weights):
        by_id = {id(p): value for p, value in mode_weights(weights == "train")}
        return {name: by_id.get(id(p), p.detach().clone()) for name, p in params.items()}
    swaps = callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))
    if swaps and (weights == "train") != training:
        raise ConfigError(
            f"{type(optimizer).__name__} swaps weights in train()/eval() and the pipeline is in "
            f"{'train' if training else 'eval'} mode; call pipe.{'train' if weights == 'train' else 'eval'}() "
            f"before exporting weights={weights!r} (or use bitpipe_fx.optim's Schedule-Free optimizers)"
        )
    return {name: p.detach().clone() for name, p in params.items()}


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def deduplicated(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(each distinct tensor once under its first name, contiguous copies; alias -> name kept)."""
    kept: dict[str, torch.Tensor] = {}
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        key = _storage_key(t)
        if key in first:
            aliases[name] = first[key]
            continue
        first[key] = name
        kept[name] = t.detach().to("cpu", copy=True).contiguous()
    return kept, aliases


def is_hf_model(model: nn.Module | None) -> bool:
    """True for a transformers PreTrainedModel (transformers is only looked at when already imported)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def save(path: str | Path, state: Mapping[str, torch.Tensor], model: nn.Module | None = None) -> Path:
    """Write ``state`` (a full state_dict): a ``from_pretrained`` directory for a Hugging Face model, else one
    safetensors file. Returns the path written."""
    path = Path(path)
    if is_hf_model(model):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{path} is a file; a Hugging Face model exports to a directory, pass a directory path")
        model.save_pretrained(path, state_dict=dict(state))
        return path
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; pass a file path such as {path / 'model.safetensors'}")
    tensors, aliases = deduplicated(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", ALIASES: json.dumps(aliases)})
    return path


def load(path: str | Path) -> dict[str, torch.Tensor]:
    """Every name of an exported safetensors file (tied names share one tensor), for load_state_dict(strict=True)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} is not a safetensors file; for a Hugging Face export use "
                          "AutoModel.from_pretrained(path)")
    with safe_open(str(path), framework="pt") as f:
        state = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
        aliases = json.loads((f.metadata() or {}).get(ALIASES, "{}"))
    for alias, name in aliases.items():
        state[alias] = state[name]
    return state


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state, strict=True)`` with a ConfigError naming the names or shapes that differ."""
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in want.items()
              if k in state and state[k].shape != v.shape]
    if missing or extra or shapes:
        raise ConfigError(
            f"the trained weights do not fit {type(model).__name__}: missing {missing[:3]}, unexpected {extra[:3]}, "
            f"shapes (trained vs model) {shapes[:3]}; pass a fresh instance of the model that was compiled"
        )
    model.load_state_dict(dict(state), strict=True)
