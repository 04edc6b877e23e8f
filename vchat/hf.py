"""Hugging Face checkpoint directories, read without a framework: LLaMA, CLIP and Qwen-VL's vision tower.

    llm = llm_config("Llama-2-7b-hf", max_seq_len=4096)        # LLMConfig from config.json (vocab unresized)
    idx = weight_index("Llama-2-7b-hf")                          # {tensor name: file}, shards and index checked
    vis = vision_source("clip-vit-large-patch14")                # kind, layout, VisionConfig, key prefix

What the reference's `create_dsvl_model_and_transforms` takes from these directories (DSVC_INVENTORY
M2-M6, D8), read from the directories' own files: the LLaMA geometry from config.json (with
`max_position_embeddings := --max_seq_len`), the vision kind from the vision directory's config or
tensor names rather than from substrings of its path (bug B14), the Qwen ViT's geometry from its
tensors, and the image preprocessing from `preprocessor_config.json`. A field vchat cannot honour is
refused; every error is one line naming the file and the key.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from vchat.config import LLMConfig, VisionConfig
from vchat.errors import UserError
from vchat.hf_io import INDEX_SUFFIX, TensorFileError, open_weights

VISION_LAYOUTS = ("clip_model", "clip_vision", "qwen_vl", "qwen_extracted")
QWEN_VL_PREFIX = "transformer.visual."
QWEN_VL_DROPPED = "transformer.visual.proj"  # the helper drops Qwen-VL's final 4096x4096 projection
# Weight files in the order transformers looks for them.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class HFError(UserError):
    """A Hugging Face directory vchat cannot read; the message names the file and the key."""


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            out = json.load(f)
    except FileNotFoundError:
        raise HFError(f"{path}: no such file") from None
    except (OSError, json.JSONDecodeError) as e:
        raise HFError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(out, dict):
        raise HFError(f"{path}: expected a JSON object")
    return out


def is_hf_lm_dir(path: str) -> bool:
    """A Hugging Face model directory (its config.json has a model_type; a vchat one has none), or a
    `vchat convert --to hf` output."""
    if os.path.exists(os.path.join(path, "visualchat.json")):
        return True
    cfg = os.path.join(path, "config.json")
    return os.path.isfile(cfg) and "model_type" in read_json(cfg)


# -- LLaMA -----------------------------------------------------------------------------------------------
def rope_theta(cfg: dict, where: str) -> float:
    """RoPE base from a LLaMA config.json: transformers 4's `rope_theta`/`rope_scaling`, or 5's
    `rope_parameters`; anything but plain RoPE is refused."""
    if cfg.get("rope_scaling"):
        raise HFError(f"{where}: key 'rope_scaling' = {json.dumps(cfg['rope_scaling'])}: vchat implements plain "
                      "RoPE only")
    params = cfg.get("rope_parameters") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise HFError(f"{where}: key 'rope_parameters.rope_type' = {kind!r}: vchat implements plain RoPE only")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def llm_config(lm_dir: str, max_seq_len: int | None = None) -> LLMConfig:
    """The LLMConfig of an HF LLaMA directory (vocab as in the file: resizing comes later)."""
    where = os.path.join(lm_dir, "config.json")
    if not os.path.isdir(lm_dir):
        raise HFError(f"{lm_dir}: no such directory")
    cfg = read_json(where)
    if cfg.get("model_type") != "llama":
        raise HFError(f"{where}: key 'model_type' = {cfg.get('model_type')!r}: vchat's language model is LLaMA "
                      "(model_type 'llama')")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise HFError(f"{where}: key {key!r} = true: vchat's LLaMA has no biases")
    if cfg.get("hidden_act", "silu") != "silu":
        raise HFError(f"{where}: key 'hidden_act' = {cfg['hidden_act']!r}: vchat's LLaMA MLP is SiLU-gated")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(cfg.get(key), int):
            raise HFError(f"{where}: key {key!r} missing or not an integer")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim * heads != cfg["hidden_size"]:
        raise HFError(f"{where}: key 'head_dim' = {head_dim}: vchat needs head_dim * num_attention_heads == "
                      f"hidden_size ({cfg['hidden_size']})")
    try:
        return LLMConfig(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                         intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
                         num_attention_heads=heads, num_key_value_heads=cfg.get("num_key_value_heads") or heads,
                         rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=rope_theta(cfg, where),
                         max_position_embeddings=int(max_seq_len or cfg.get("max_position_embeddings", 4096)),
                         tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                         initializer_range=float(cfg.get("initializer_range", 0.02)))
    except ValueError as e:
        raise HFError(f"{where}: {e}") from None


# -- weight files ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightIndex:
    """Where each tensor of a checkpoint directory lives."""

    folder: str
    where: dict  # tensor name -> file path

    def info(self, key: str):
        return open_weights(self.where[key]).info(key)

    def files(self) -> list[str]:
        return sorted(set(self.where.values()))


def weight_index(folder: str) -> WeightIndex:
    """The tensors of `model.safetensors`, `pytorch_model.bin`, or their shards named in the index JSON."""
    if not os.path.isdir(folder):
        raise HFError(f"{folder}: no such directory")
    for name in WEIGHT_FILES:
        index = os.path.join(folder, name + INDEX_SUFFIX)
        if os.path.exists(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise HFError(f"{index}: key 'weight_map' missing or empty")
            for key, shard in weight_map.items():
                if not os.path.exists(os.path.join(folder, shard)):
                    raise HFError(f"{index}: key 'weight_map.{key}' names {shard}, which is missing")
            return WeightIndex(folder, {k: os.path.join(folder, v) for k, v in weight_map.items()})
        path = os.path.join(folder, name)
        if os.path.exists(path):
            try:
                return WeightIndex(folder, {k: path for k in open_weights(path).keys()})
            except TensorFileError as e:
                raise HFError(str(e)) from None
    raise HFError(f"{folder}: not a Hugging Face checkpoint: no model.safetensors, pytorch_model.bin or their "
                  f"{INDEX_SUFFIX} shard index")


# -- vision towers -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VisionSource:
    """A vision directory: its kind ("clip" | "qwen"), its layout (VISION_LAYOUTS), its geometry, and
    how vchat's `vis_encoder.*` names map to its tensors (`prefix` + vchat's name below vis_encoder)."""

    folder: str
    kind: str
    layout: str
    config: VisionConfig
    prefix: str  # the file's prefix of the tower's tensors
    index: WeightIndex

    def file_key(self, vchat_key: str) -> str:
        """`vis_encoder.vision_model.x` / `vis_encoder.x` -> the file's name of that tensor."""
        rest = vchat_key[len("vis_encoder."):]
        if self.kind == "clip":
            rest = rest[len("vision_model."):]
        return self.prefix + rest

    def tower_keys(self) -> list[str]:
        """Every tensor of the file that belongs to the tower (those a conversion must use)."""
        keys = [k for k in self.index.where if k.startswith(self.prefix)]
        return [k for k in keys if not k.startswith(QWEN_VL_DROPPED)] if self.layout == "qwen_vl" else keys


CLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     num_channels=3, image_size=224, patch_size=32, layer_norm_eps=1e-5, hidden_act="quick_gelu")


def _clip_config(cfg: dict, where: str) -> VisionConfig:
    fields = {k: cfg.get(k, v) for k, v in CLIP_DEFAULTS.items()}
    try:
        return VisionConfig(kind="clip", **fields)
    except ValueError as e:
        raise HFError(f"{where}: {e}") from None


def _qwen_config(index: WeightIndex, prefix: str, cfg: dict, where: str) -> VisionConfig:
    """Qwen-VL's ViT geometry from its tensors; heads and image size from the config (defaults 16, 448)."""

    def shape(name):
        key = prefix + name
        if key not in index.where:
            raise HFError(f"{index.folder}: no tensor {key!r}, which a Qwen-VL vision tower has")
        return index.info(key).shape

    width, _, patch, _ = shape("conv1.weight")
    layers = 0
    while prefix + f"transformer.resblocks.{layers}.ln_1.weight" in index.where:
        layers += 1
    visual = cfg.get("visual") or {}
    heads = visual.get("heads", (cfg.get("vision_config") or cfg).get("num_attention_heads", 16))
    image_size = visual.get("image_size") or _crop_size(index.folder) or 448  # the reference's hard-coded 448
    n_queries, output_dim = shape("attn_pool.query")
    try:
        return VisionConfig(kind="qwen", image_size=image_size, patch_size=patch, hidden_size=width,
                            intermediate_size=shape("transformer.resblocks.0.mlp.c_fc.weight")[0],
                            num_hidden_layers=layers, num_attention_heads=heads, layer_norm_eps=1e-6,
                            hidden_act="gelu", output_dim=output_dim, n_queries=n_queries,
                            pos_embed_rows=shape("positional_embedding")[0])
    except ValueError as e:
        raise HFError(f"{where}: {e}") from None


def _crop_size(folder: str) -> int | None:
    path = os.path.join(folder, "preprocessor_config.json")
    crop = read_json(path).get("crop_size") if os.path.exists(path) else None
    return crop.get("height") if isinstance(crop, dict) else crop


def vision_source(folder: str, kind: str | None = None) -> VisionSource:
    """Detect a vision directory's kind and layout from its config.json and tensor names; `kind`
    ("clip" | "qwen", `--vision_model_type`) overrides the detection of the kind."""
    if kind not in (None, "clip", "qwen"):
        raise HFError(f"--vision_model_type {kind}: must be clip or qwen")
    where = os.path.join(folder, "config.json")
    cfg = read_json(where) if os.path.exists(where) else {}
    index = weight_index(folder)
    model_type = cfg.get("model_type")
    # Tensor names first: the reference helper's folder may carry a CLIP config.json beside Qwen weights.
    if any(k.startswith(QWEN_VL_PREFIX) for k in index.where):
        found, layout = "qwen", "qwen_vl"
    elif "conv1.weight" in index.where and "attn_pool.query" in index.where:
        found, layout = "qwen", "qwen_extracted"
    elif model_type == "clip" or (kind == "clip" and "vision_config" in cfg):
        found, layout = "clip", "clip_model"
    elif model_type == "clip_vision_model" or (kind == "clip" and "hidden_size" in cfg):
        found, layout = "clip", "clip_vision"
    else:
        raise HFError(f"{where}: key 'model_type' = {model_type!r}: not a vision directory vchat knows (a CLIPModel "
                      "or CLIPVisionModel checkpoint, a Qwen-VL checkpoint (transformer.visual.*), or the extracted "
                      "Qwen-VL tower); pass --vision_model_type clip|qwen")
    if kind is not None and kind != found:
        raise HFError(f"{where}: --vision_model_type {kind}, but the directory holds a {found} tower ({layout})")
    if found == "clip":
        prefix = "vision_model." if any(k.startswith("vision_model.") for k in index.where) else ""
        if layout == "clip_model" and not prefix:
            raise HFError(f"{folder}: a CLIPModel checkpoint without vision_model.* tensors")
        vcfg = cfg.get("vision_config") or {} if layout == "clip_model" else cfg
        return VisionSource(folder, "clip", layout, _clip_config(vcfg, where), prefix, index)
    prefix = QWEN_VL_PREFIX if layout == "qwen_vl" else ""
    return VisionSource(folder, "qwen", layout, _qwen_config(index, prefix, cfg, where), prefix, index)


def saved_processor(folder: str, vision: VisionConfig):
    """A vchat checkpoint's own image preprocessing (its preprocessor_config.json), or None without one."""
    return image_processor(folder, vision) if os.path.exists(os.path.join(folder, "preprocessor_config.json")) else None


def image_processor(folder: str, vision: VisionConfig):
    """The ImageProcessor of a directory's `preprocessor_config.json` (CLIPImageProcessor's fields),
    or vchat's default for the tower when there is none."""
    from vchat.data.preprocess import ImageProcessor

    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.exists(path):
        return ImageProcessor.for_vision(vision)
    cfg = read_json(path)

    def side(key, sub):
        v = cfg.get(key)
        v = v.get(sub) if isinstance(v, dict) else v
        if not isinstance(v, int):
            raise HFError(f"{path}: key {key!r} = {cfg.get(key)!r}: expected an integer or {{{sub!r}: int}}")
        return v

    crop = side("crop_size", "height") if cfg.get("do_center_crop", True) else side("size", "shortest_edge")
    if crop != vision.image_size:
        raise HFError(f"{path}: key 'crop_size' = {crop}, but the tower takes {vision.image_size} px images")
    size = side("size", "shortest_edge") if cfg.get("do_resize", True) else crop
    try:
        return ImageProcessor(size=size, crop_size=crop, mean=tuple(cfg.get("image_mean", ImageProcessor.mean)),
                              std=tuple(cfg.get("image_std", ImageProcessor.std)))
    except ValueError as e:
        raise HFError(f"{path}: {e}") from None
