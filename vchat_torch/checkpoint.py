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

from vchat.checkpoint_files import CONFIG_NAME, DSVC_WEIGHTS_NAME, WEIGHTS_NAME
from vchat.config import ModelConfig, load_checkpoint_config
from vchat.errors import UserError
from vchat.io import list_names as _names
from vchat.io import writing_dir
from vchat.param_map import tied_aliases

from .model import VisualChat


class CheckpointError(UserError):
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


def with_tied(config: ModelConfig, sd: dict) -> dict:
    """`sd` with a tied lm_head (not stored in files) filled from its source key."""
    aliases = tied_aliases(config)
    return {**{a: sd[s] for a, s in aliases.items() if a not in sd and s in sd}, **sd}


def load_state_dict_strict(model: torch.nn.Module, sd: dict, source: str, partial: bool = False) -> None:
    """Load after check_state_dict; a tied lm_head (not stored in files) is filled from its source key."""
    sd = with_tied(model.config, sd) if hasattr(model, "config") else sd
    check_state_dict(model, sd, source, partial=partial)
    model.load_state_dict(sd, strict=not partial)


def build_loaded(config: ModelConfig, sd: dict, source: str) -> VisualChat:
    """A VisualChat holding exactly the tensors of `sd` (checked against the model, in their own dtype):
    built on the meta device and the tensors assigned, so no model is initialised only to be
    overwritten and a bf16 file gives a bf16 model."""
    with torch.device("meta"):
        model = VisualChat(config)
    sd = with_tied(config, sd)
    check_state_dict(model, sd, source)
    model.load_state_dict(sd, strict=True, assign=True)
    if config.llm.tie_word_embeddings:  # assign made two parameters of one tensor: tie them again
        model.lang_decoder.lm_head.weight = model.lang_decoder.model.embed_tokens.weight
    materialize_buffers(model)
    return model.eval()


def materialize_buffers(model: torch.nn.Module) -> None:
    """Compute the buffers a meta-device build left empty: RoPE tables and CLIP's position ids."""
    for mod_name, module in model.named_modules():
        meta = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
        if not meta:
            continue
        if set(meta) <= {"inv_freq", "original_inv_freq"}:  # transformers' rotary embedding
            fresh = type(module)(module.config)
            for n in meta:
                module._buffers[n] = fresh._buffers[n]
        elif meta == ["position_ids"] and hasattr(module, "num_positions"):  # CLIPVisionEmbeddings
            module._buffers["position_ids"] = torch.arange(module.num_positions).expand((1, -1))
        else:
            raise RuntimeError(f"{mod_name}: buffers {meta} left on the meta device; vchat does not know them")


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
    return build_loaded(config, read_dsvc_state_dict(path), source=path)


def save_pretrained(model: VisualChat, path: str, trainable_only: bool = False, extra_files: dict | None = None,
                    state_dict: dict | None = None) -> None:
    """Write `config.json` + `model.safetensors` (all tensors, or only the trainable ones). A given
    `state_dict` (e.g. gathered from ZeRO-3, LoRA merged) is written as it is instead of the model's."""
    with writing_dir(path) as tmp:
        model.config.save(os.path.join(tmp, CONFIG_NAME))
        if state_dict is None:
            names = {n for n, p in model.named_parameters() if p.requires_grad} if trainable_only else None
            state_dict = {k: v for k, v in model.state_dict().items() if names is None or k in names}
        aliases = tied_aliases(model.config)  # a tied lm_head is embed_tokens: stored once
        sd = {k: v.detach().contiguous().cpu() for k, v in state_dict.items() if k not in aliases}
        save_file(sd, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt", "trainable_only": str(trainable_only)})
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)


def from_pretrained(path: str, base: str | None = None, compat: str | None = None) -> VisualChat:
    """Load a vchat directory, or `vchat train`'s DeepSpeed checkpoint directory (see `from_zero`).
    A trainable-only checkpoint needs `base`, a full one to start from (a vchat directory or a
    reference checkpoint)."""
    if not os.path.exists(os.path.join(path, CONFIG_NAME)) or not os.path.exists(os.path.join(path, WEIGHTS_NAME)):
        try:
            zero_checkpoint(path)
        except CheckpointError:
            pass
        else:
            return from_zero(path, compat=compat)
    config = load_checkpoint_config(path, compat)
    weights = os.path.join(path, WEIGHTS_NAME)
    sd = load_file(weights)
    with open(weights, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(header_len)).get("__metadata__", {})
    partial = meta.get("trainable_only") == "True"
    if partial and base is None:
        raise CheckpointError(f"{weights} holds only the trainable tensors; pass base= a full checkpoint")
    if partial:
        base_sd = load_file(os.path.join(base, WEIGHTS_NAME)) if os.path.isdir(base) and os.path.exists(
            os.path.join(base, WEIGHTS_NAME)) else read_dsvc_state_dict(base)
        with torch.device("meta"):
            check_state_dict(VisualChat(config), sd, source=weights, partial=True)
        sd = {**base_sd, **sd}
    model = build_loaded(config, sd, source=weights if not partial else f"{weights} over {base}")
    attach_processor(model, path)
    return model


def attach_processor(model, path: str) -> None:
    """`model.image_processor` from the checkpoint's preprocessor_config.json, when it has one (a model
    built from a Hugging Face vision directory keeps its preprocessing through training and conversion)."""
    from vchat.hf import saved_processor

    processor = saved_processor(path, model.config.vision)
    if processor is not None:
        model.image_processor = processor


# -- DeepSpeed checkpoints (`vchat train`'s ds/ directory) -----------------------------------------
def zero_checkpoint(path: str) -> tuple[str, str]:
    """(checkpoint_dir, tag) of a DeepSpeed checkpoint: `path` is the directory holding `latest`
    (`<output_dir>/ds`) or one tag directory under it (`<output_dir>/ds/step120`)."""
    if os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            return path, f.read().strip()
    if os.path.isdir(path) and any(n.endswith("model_states.pt") for n in os.listdir(path)):
        path = os.path.abspath(path)
        return os.path.dirname(path), os.path.basename(path)
    raise CheckpointError(f"{path}: not a DeepSpeed checkpoint (no 'latest' file and no *model_states.pt)")


def read_zero_state_dict(path: str) -> dict:
    """Full float32 weights of a DeepSpeed checkpoint (ZeRO 0-3, any number of ranks). ZeRO 1-3 go
    through DeepSpeed's own zero_to_fp32 (the optimizer's fp32 masters, frozen tensors included);
    ZeRO-0 keeps whole weights in the module state. A LoRA run's adapters are not merged here: its
    exported final/ directory holds the merged weights."""
    ckpt_dir, tag = zero_checkpoint(path)
    tag_dir = os.path.join(ckpt_dir, tag)
    if not os.path.isdir(tag_dir):
        raise CheckpointError(f"{ckpt_dir}/latest names {tag!r}, but {tag_dir} does not exist")
    files = sorted(os.listdir(tag_dir))
    if any(n.endswith("optim_states.pt") and n.startswith(("zero_pp_rank", "bf16_zero_pp_rank")) for n in files):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag)
    else:
        states = [n for n in files if n.endswith("model_states.pt")]
        if not states:
            raise CheckpointError(f"{tag_dir}: no *model_states.pt")
        # DeepSpeed pickles its client state (RNG states, counters) beside the weights: not weights_only
        sd = torch.load(os.path.join(tag_dir, states[0]), map_location="cpu", weights_only=False)["module"]
        sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    if any(".base_layer." in k or "lora_A" in k for k in sd):
        raise CheckpointError(f"{tag_dir} holds LoRA adapters; load the run's exported final/ directory "
                              "(adapters merged) instead")
    return sd


def from_zero(path: str, config: ModelConfig | str | None = None, compat: str | None = None) -> VisualChat:
    """A VisualChat from `vchat train`'s DeepSpeed checkpoint (`<output_dir>/ds` or a tag under it).
    The geometry comes from `config` (a ModelConfig, a preset name or a config.json), else from the
    run's config.json (`ds/config.json`, or `<output_dir>/final/` or `best/`)."""
    from vchat.config import preset

    ckpt_dir, _ = zero_checkpoint(path)
    if config is None:
        out = os.path.dirname(os.path.abspath(ckpt_dir))
        found = [d for d in (ckpt_dir, os.path.join(out, "final"), os.path.join(out, "best"))
                 if os.path.exists(os.path.join(d, CONFIG_NAME))]
        if not found:
            raise CheckpointError(f"{path}: no {CONFIG_NAME} in {ckpt_dir} or beside it (final/, best/); "
                                  "pass the model's config")
        cfg = load_checkpoint_config(found[0], compat)
    else:
        cfg = preset(config) if isinstance(config, str) else config
        cfg = cfg.replace(compat=compat) if compat else cfg
    model = build_loaded(cfg, read_zero_state_dict(path), source=path)
    attach_processor(model, ckpt_dir)
    return model
