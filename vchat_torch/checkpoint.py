"""Checkpoints: the reference's `pytorch_model.bin`, and vchat's own `config.json` + `model.safetensors`.

Loading is strict: every key of the file is used once, every parameter of the model is filled, and
shapes are checked per key; a mismatch raises an error that lists the keys by name (the reference
loads with `strict=False` and silently hides such mismatches, bug B10). Writing is atomic: files go
to a temporary directory that is renamed into place at the end.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from vchat.config import CONFIG_NAME, ModelConfig, load_checkpoint_config
from vchat.io import list_names as _names
from vchat.io import writing_dir

from .model import VisualChat

WEIGHTS_NAME = "model.safetensors"
DSVC_WEIGHTS_NAME = "pytorch_model.bin"
META_NAME = "vchat.json"


class CheckpointError(ValueError):
    pass


def check_state_dict(model: torch.nn.Module, sd: dict, source: str, partial: bool = False) -> None:
    """Raise CheckpointError naming every missing, unexpected or mis-shaped key."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    problems = []
    missing = set(expected) - set(sd)
    if missing and not partial:
        problems.append(f"missing keys: {_names(missing)}")
    unexpected = set(sd) - set(expected)
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    shapes = [f"{k} (file {tuple(sd[k].shape)}, model {tuple(expected[k])})"
              for k in sorted(set(sd) & set(expected)) if tuple(sd[k].shape) != tuple(expected[k])]
    if shapes:
        problems.append(f"wrong shapes: {'; '.join(shapes)}")
    if problems:
        raise CheckpointError(f"{source}: " + " | ".join(problems))


def load_state_dict_strict(model: torch.nn.Module, sd: dict, source: str, partial: bool = False) -> None:
    check_state_dict(model, sd, source, partial=partial)
    model.load_state_dict(sd, strict=not partial)


def read_dsvc_state_dict(path: str) -> dict:
    """A reference checkpoint (a `pytorch_model.bin` or the directory holding it) as a state dict."""
    if os.path.isdir(path):
        path = os.path.join(path, DSVC_WEIGHTS_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no reference checkpoint at {path}")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    # The reference's non-ZeRO-3 saves keep unfused LoRA factors beside the fused weights.
    return {k: v for k, v in sd.items() if "lora_right_weight" not in k and "lora_left_weight" not in k}


def from_dsvc(path: str, config: ModelConfig) -> VisualChat:
    """Build a model from a reference checkpoint; `config` gives the geometry (the reference stores none)."""
    model = VisualChat(config)
    load_state_dict_strict(model, read_dsvc_state_dict(path), source=path)
    return model.eval()


def save_pretrained(model: VisualChat, path: str, trainable_only: bool = False, extra_files: dict | None = None,
                    state_dict: dict | None = None) -> None:
    """Write `config.json` + `model.safetensors` (all tensors, or only the trainable ones). A given
    `state_dict` (e.g. gathered from ZeRO-3, LoRA merged) is written as it is instead of the model's."""
    with writing_dir(path) as tmp:
        model.config.save(os.path.join(tmp, CONFIG_NAME))
        if state_dict is None:
            names = {n for n, p in model.named_parameters() if p.requires_grad} if trainable_only else None
            state_dict = {k: v for k, v in model.state_dict().items() if names is None or k in names}
        sd = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        save_file(sd, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt", "trainable_only": str(trainable_only)})
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)


def from_pretrained(path: str, base: str | None = None, compat: str | None = None) -> VisualChat:
    """Load a vchat directory. A trainable-only checkpoint needs `base`, a full one to start from
    (a vchat directory or a reference checkpoint)."""
    config = load_checkpoint_config(path, compat)
    weights = os.path.join(path, WEIGHTS_NAME)
    sd = load_file(weights)
    with open(weights, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(header_len)).get("__metadata__", {})
    partial = meta.get("trainable_only") == "True"
    if partial and base is None:
        raise CheckpointError(f"{weights} holds only the trainable tensors; pass base= a full checkpoint")
    model = VisualChat(config)
    if partial:
        base_sd = load_file(os.path.join(base, WEIGHTS_NAME)) if os.path.isdir(base) and os.path.exists(
            os.path.join(base, WEIGHTS_NAME)) else read_dsvc_state_dict(base)
        load_state_dict_strict(model, base_sd, source=base)
    load_state_dict_strict(model, sd, source=weights, partial=partial)
    return model.eval()
