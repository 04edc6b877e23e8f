"""VisualChat out to Hugging Face directories, tensor by tensor, without a framework.

    export_hf("out/hf", config, infos, read, tokenizer_json, vision_layout="clip_vision")

writes
    out/hf/lm/                 LlamaForCausalLM: config.json, model*.safetensors (+ index), tokenizer files,
                               the vocabulary as vchat resized it (the reference's added tokens included)
    out/hf/vision/             the tower in its layout: a CLIPVisionModel directory, or Qwen-VL's tower as a
                               Qwen-VL checkpoint (transformer.visual.*) or the reference helper's bare names
    out/hf/visualchat.json     {"config": the ModelConfig, "vision_layout": ...}
    out/hf/visualchat.safetensors   projection.* and lang_embed.weight
which vchat/hf_plan.py's `plan(out/hf)` reads back. `infos` gives each vchat tensor's (dtype name, torch
shape) before anything is written (safetensors headers come first); `read(key)` returns one tensor's
bytes (or a numpy array) in the torch layout, called once per tensor in order. The directory is written
atomically (vchat/io.py): a failure leaves nothing.
"""

from __future__ import annotations

import json
import os
from typing import Callable

from vchat.checkpoint_files import PREPROCESSOR_NAME, TOKENIZER_NAME
from vchat.config import CONFIG_NAME, ModelConfig
from vchat.hf import QWEN_VL_PREFIX, VISION_LAYOUTS
from vchat.hf_io import ShardedWriter, TensorInfo
from vchat.hf_plan import EXPORT_CONFIG, EXPORT_WEIGHTS
from vchat.io import writing_dir
from vchat.param_map import expand

DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def default_layout(config: ModelConfig) -> str:
    return "clip_vision" if config.vision.kind == "clip" else "qwen_extracted"


def export_name(key: str, config: ModelConfig, layout: str) -> tuple[str, str]:
    """(sub-directory or "", name in that directory's files) of a vchat tensor."""
    if key.startswith("lang_decoder."):
        return "lm", key[len("lang_decoder."):]
    if key.startswith("vis_encoder."):
        rest = key[len("vis_encoder."):]
        if config.vision.kind == "clip":
            return "vision", rest[len("vision_model."):]
        return "vision", (QWEN_VL_PREFIX if layout == "qwen_vl" else "") + rest
    return "", key


def llama_config_json(config: ModelConfig, dtype: str) -> dict:
    c = config.llm
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "hidden_act": c.hidden_act,
            "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_theta, "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": c.tie_word_embeddings, "initializer_range": c.initializer_range,
            "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id, "torch_dtype": DTYPE_NAMES.get(dtype, "float32"), "use_cache": True}


def vision_config_json(config: ModelConfig, layout: str) -> dict:
    v = config.vision
    if v.kind == "clip":
        return {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model",
                "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
                "num_channels": v.num_channels, "image_size": v.image_size, "patch_size": v.patch_size,
                "layer_norm_eps": v.layer_norm_eps, "hidden_act": v.hidden_act}
    visual = {"image_size": v.image_size, "patch_size": v.patch_size, "width": v.hidden_size,
              "layers": v.num_hidden_layers, "heads": v.num_attention_heads,
              "mlp_ratio": v.intermediate_size / v.hidden_size, "output_dim": v.output_dim}
    return {"model_type": "qwen", "visual": visual} if layout == "qwen_vl" else {"visual": visual}


def preprocessor_json(processor) -> dict:
    """CLIPImageProcessor's preprocessor_config.json for a vchat.data.ImageProcessor."""
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
            "size": {"shortest_edge": processor.size}, "resample": 3, "do_center_crop": True,
            "crop_size": {"height": processor.crop_size, "width": processor.crop_size}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(processor.mean),
            "image_std": list(processor.std), "do_convert_rgb": True}


def checkpoint_extras(tokenizer_json: str, processor=None) -> dict[str, str]:
    """{file name: text} a trained vchat checkpoint carries beside its weights: the tokenizer, and the image
    preprocessing of the vision directory it was built from (`vchat chat` and `eval` read both back)."""
    extras = {TOKENIZER_NAME: tokenizer_json}
    if processor is not None:
        extras[PREPROCESSOR_NAME] = json.dumps(preprocessor_json(processor), indent=2) + "\n"
    return extras


def tokenizer_config_json(tokenizer_json: str, config: ModelConfig) -> dict:
    vocab = {}
    data = json.loads(tokenizer_json)
    for t in data.get("added_tokens", []):
        vocab[t["id"]] = t["content"]

    def name(tid: int) -> str:
        if tid in vocab:
            return vocab[tid]
        model_vocab = data.get("model", {}).get("vocab", {})
        found = [w for w, i in (model_vocab.items() if isinstance(model_vocab, dict) else []) if i == tid]
        if not found:
            raise ValueError(f"tokenizer.json has no token with id {tid}")
        return found[0]

    eos = name(config.eos_token_id)
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(config.bos_token_id), "eos_token": eos,
            "pad_token": eos, "padding_side": "right", "model_max_length": config.llm.max_position_embeddings}


def export_hf(dst: str, config: ModelConfig, infos: dict[str, tuple[str, tuple]], read: Callable,
              tokenizer_json: str, processor=None, vision_layout: str | None = None,
              max_shard_bytes: int = 5 << 30) -> None:
    """Write `dst` (see the module docstring); `processor` is the tower's vchat ImageProcessor (written as
    vision/preprocessor_config.json)."""
    layout = vision_layout or default_layout(config)
    if layout not in VISION_LAYOUTS:
        raise ValueError(f"vision layout must be one of {VISION_LAYOUTS}, got {layout!r}")
    if layout.startswith("clip_"):
        layout = "clip_vision"  # the text tower is not kept: a CLIPModel comes back as its vision model
    keys = [e.torch for e in expand(config)]  # a tied lm_head is no tensor of its own
    groups: dict[str, list[TensorInfo]] = {"lm": [], "vision": [], "": []}
    names = {}
    for key in keys:
        sub, name = export_name(key, config, layout)
        dtype, shape = infos[key]
        groups[sub].append(TensorInfo(name, dtype, tuple(shape)))
        names[key] = (sub, name)
    lm_dtype = infos["lang_decoder.model.embed_tokens.weight"][0]
    with writing_dir(dst) as tmp:
        for sub in ("lm", "vision"):
            os.makedirs(os.path.join(tmp, sub))
        _write_json(os.path.join(tmp, "lm", CONFIG_NAME), llama_config_json(config, lm_dtype))
        _write_json(os.path.join(tmp, "vision", CONFIG_NAME), vision_config_json(config, layout))
        with open(os.path.join(tmp, "lm", "tokenizer.json"), "w") as f:
            f.write(tokenizer_json)
        _write_json(os.path.join(tmp, "lm", "tokenizer_config.json"), tokenizer_config_json(tokenizer_json, config))
        if processor is not None:
            _write_json(os.path.join(tmp, "vision", "preprocessor_config.json"), preprocessor_json(processor))
        _write_json(os.path.join(tmp, EXPORT_CONFIG), {"format": "vchat hf export", "config": config.to_dict(),
                                                       "vision_layout": layout})
        writers = {"lm": ShardedWriter(os.path.join(tmp, "lm"), groups["lm"], max_shard_bytes),
                   "vision": ShardedWriter(os.path.join(tmp, "vision"), groups["vision"], max_shard_bytes),
                   "": ShardedWriter(tmp, groups[""], max_shard_bytes=1 << 62, prefix=EXPORT_WEIGHTS[:-12])}
        by_name = {v: k for k, v in names.items()}
        for sub in ("lm", "vision", ""):  # each writer gets its tensors in its header's order
            for info in groups[sub]:
                writers[sub].write(info.name, read(by_name[(sub, info.name)]))
            writers[sub].close()


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
