"""Hugging Face directories <-> vchat_torch checkpoints, one tensor at a time.

    convert_hf("Llama-2-7b-hf", "clip-vit-large-patch14", "out/torch")  # streamed: no model is built
    to_hf(model, "out/hf", tokenizer_json)                              # LoRA merged, tensor by tensor

`convert_hf` reads each tensor (vchat/hf_plan.py says from where), puts it in vchat's layout and
appends it to `model.safetensors` (vchat/hf_io.py's writer: the header first, then tensor after
tensor), so memory holds one tensor at a time whatever the model's size. `to_hf` writes the layout of
vchat/hf_export.py from a model in memory.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from vchat.checkpoint_files import CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_NAME
from vchat.hf import image_processor
from vchat.hf_export import export_hf, preprocessor_json
from vchat.hf_io import SafetensorsWriter, TensorInfo, open_weights
from vchat.hf_plan import LM_HEAD, plan
from vchat.io import writing_dir
from vchat.param_map import tied_aliases

from .hf import ST_NAMES, TORCH_DTYPES, TorchReader, _new_dtype, tensor_bytes, tensor_value
from .model import VisualChat


def _write_json(path: str, obj: dict) -> None:
    import json

    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def convert_hf(lm_dir: str, vision_dir: str | None, dst: str, dtype: torch.dtype | None = None, log=None,
               **plan_kw) -> VisualChat | None:
    """Write a vchat_torch checkpoint directory (config.json, model.safetensors, tokenizer.json,
    preprocessor_config.json) from HF directories, streaming; atomic. Returns nothing."""
    p = plan(lm_dir, vision_dir, **plan_kw)
    with torch.device("meta"):
        model = VisualChat(p.config)
    meta = model.state_dict()  # a tied lm_head is in it, as an alias of embed_tokens
    alias = tied_aliases(p.config)
    if {alias.get(k, k) for k in meta} != set(p.sources):
        raise RuntimeError(f"vchat_torch's tensors and the param map differ: {sorted(set(meta) ^ set(p.sources))}")
    shapes = {k: tuple(v.shape) for k, v in meta.items()}
    new_dtype = _new_dtype(p, dtype)

    def target_dtype(key: str) -> str:
        return ST_NAMES[dtype] if dtype is not None else p.file_dtype(key) or ST_NAMES[new_dtype]

    infos = [TensorInfo(k, target_dtype(alias.get(k, k)), shapes[k]) for k in meta]
    read = TorchReader()
    with writing_dir(dst) as tmp:
        p.config.save(os.path.join(tmp, CONFIG_NAME))
        with open(os.path.join(tmp, TOKENIZER_NAME), "w") as f:
            f.write(p.tokenizer.tokenizer.to_str())
        _write_json(os.path.join(tmp, "preprocessor_config.json"),
                    preprocessor_json(image_processor(p.vision.folder, p.config.vision)))
        writer = SafetensorsWriter(os.path.join(tmp, WEIGHTS_NAME), infos,
                                   {"format": "pt", "trainable_only": "False"})
        for i, info in enumerate(infos):
            t = tensor_value(p, alias.get(info.name, info.name), read, shapes, dtype, new_dtype)
            writer.write(info.name, tensor_bytes(t))
            if log and (i + 1) % 50 == 0:
                log(f"  {i + 1}/{len(infos)} tensors")
        writer.close()
    return None


def state_dict_for_export(model: VisualChat) -> dict[str, torch.Tensor]:
    """The model's tensors under vchat's names, LoRA adapters merged into their weights."""
    sd = model.state_dict()
    if any("lora_" in k for k in sd):
        from .lora import merged_state_dict

        sd, _ = merged_state_dict(model, sd)
    return sd


def checkpoint_dtypes(path: str) -> dict[str, str]:
    """{key: dtype name} of a vchat_torch checkpoint's model.safetensors (from_pretrained loads in float32)."""
    f = open_weights(os.path.join(path, WEIGHTS_NAME))
    return {k: f.info(k).dtype for k in f.keys()}


def to_hf(model: VisualChat, dst: str, tokenizer_json: str, processor=None, vision_layout: str | None = None,
          max_shard_bytes: int = 5 << 30, dtypes: dict[str, str] | None = None) -> None:
    """Export a model (see vchat/hf_export.py): DST/lm, DST/vision, visualchat.json / .safetensors.
    `dtypes` ({key: "BF16", ...}, e.g. `checkpoint_dtypes(src)`) casts tensors back to their file's dtype."""
    sd = state_dict_for_export(model)
    if dtypes:
        sd = {k: v.to(TORCH_DTYPES[dtypes[k]]) if k in dtypes else v for k, v in sd.items()}
    infos = {k: (ST_NAMES[v.dtype], tuple(v.shape)) for k, v in sd.items()}
    if model.config.llm.tie_word_embeddings and LM_HEAD in sd:
        if not torch.equal(sd[LM_HEAD], sd["lang_decoder.model.embed_tokens.weight"]):
            raise ValueError("tie_word_embeddings is set but lm_head differs from embed_tokens")
    processor = processor or getattr(model, "image_processor", None)
    export_hf(dst, model.config, infos, lambda key: tensor_bytes(sd[key]), tokenizer_json, processor=processor,
              vision_layout=vision_layout, max_shard_bytes=max_shard_bytes)


def read_exported(path: str) -> dict[str, np.ndarray]:
    """Every tensor of an HF directory as numpy (for tests and checks)."""
    from vchat.hf import weight_index

    idx = weight_index(path)
    return {k: open_weights(f).read(k) for k, f in idx.where.items()}
