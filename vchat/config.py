"""Model configuration: frozen dataclasses, JSON in/out, named presets.

One place defines every hyperparameter of a VisualChat model (the vision tower, the projection, the
LLaMA decoder, the attention mode and the token ids). Both frameworks build their modules from a
`ModelConfig`; nothing else in the code base invents a size.

The reference (DeepSpeed-VisualChat) keeps no config at all: its model is rebuilt from CLI flags and
Hub configs. `ModelConfig.from_dsvc_meta` reads the `meta.json` that describes a reference checkpoint
(the layout of `tests/golden/<case>/meta.json`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from vchat.checkpoint_files import CONFIG_NAME
from vchat.io import writing_file

VISION_KINDS = ("clip", "qwen")
PROJECTION_KINDS = ("baseline", "vit", "perceiver")
COMPAT_MODES = ("dsvc", "fixed")
# Activation names (transformers' ACT2FN spelling) both frameworks implement, for `hidden_act` fields.
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_accurate", "quick_gelu",
               "relu", "relu2", "relu6", "sigmoid", "tanh", "mish")
# MMCA kernels: "dense" is the readable twin of the numpy oracle; "sdpa" (torch: SDPA per branch) and
# "flex" (torch: FlexAttention block masks) never build an L x L tensor; JAX runs its blockwise kernel for
# every choice but "dense". "auto" = flex on CUDA, sdpa elsewhere.
ATTENTION_KINDS = ("auto", "dense", "sdpa", "flex")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class VisionConfig:
    """The frozen vision tower: an HF CLIP ViT, or Qwen-VL's ViT with its resampler.

    For `kind="clip"` the fields are CLIPVisionConfig's. For `kind="qwen"`, `hidden_size` is the ViT
    width, `intermediate_size` its MLP size, and `output_dim` / `n_queries` describe the resampler.
    """

    kind: str = "clip"
    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 48
    intermediate_size: int = 96
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    # Qwen-VL only.
    output_dim: int = 4096
    n_queries: int = 256
    pos_embed_rows: int = 256  # the ViT's positional_embedding is (256, width), resized to the grid

    def __post_init__(self):
        _check(self.kind in VISION_KINDS, f"vision.kind must be one of {VISION_KINDS}, got {self.kind!r}")
        _check(self.image_size % self.patch_size == 0, "vision.image_size must be a multiple of patch_size")
        _check(self.hidden_size % self.num_attention_heads == 0,
               "vision.hidden_size must be divisible by num_attention_heads")
        _check(self.hidden_act in ACTIVATIONS, f"vision.hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        if self.kind == "qwen":
            _check(int(self.n_queries**0.5) ** 2 == self.n_queries, "vision.n_queries must be a square")
            _check(self.output_dim % 128 == 0, "vision.output_dim must be a multiple of 128 (heads of 128)")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_tokens(self) -> int:
        """Tokens the tower emits per image: CLS + patches (CLIP) or the resampler queries (Qwen)."""
        return self.num_patches + 1 if self.kind == "clip" else self.n_queries

    @property
    def out_dim(self) -> int:
        """Width of the tower's output features."""
        return self.hidden_size if self.kind == "clip" else self.output_dim


@dataclass(frozen=True)
class LLMConfig:
    """The LLaMA decoder (every field LLaMA-2 7B/13B/70B need)."""

    vocab_size: int = 96
    hidden_size: int = 128
    intermediate_size: int = 192
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    def __post_init__(self):
        _check(self.hidden_size % self.num_attention_heads == 0,
               "llm.hidden_size must be divisible by num_attention_heads")
        _check(self.num_attention_heads % self.num_key_value_heads == 0,
               "llm.num_attention_heads must be divisible by num_key_value_heads")
        _check(self.head_dim % 2 == 0, "llm head_dim must be even (RoPE rotates halves)")
        _check(self.hidden_act in ACTIVATIONS, f"llm.hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        _check(self.initializer_range > 0, f"llm.initializer_range must be positive, got {self.initializer_range}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


@dataclass(frozen=True)
class ProjectionConfig:
    """Vision -> language projection (`--vis_proj` of the reference)."""

    kind: str = "baseline"
    perceiver_grid: int = 16  # the perceiver has grid**2 learned queries

    def __post_init__(self):
        _check(self.kind in PROJECTION_KINDS, f"projection.kind must be one of {PROJECTION_KINDS}, got {self.kind!r}")


@dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    mmca: bool = True
    compat: str = "fixed"
    attention: str = "auto"
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 2
    image_token_id: int = 95  # "<image>"
    image_pretoken_id: int = 94  # "### Image:"

    def __post_init__(self):
        _check(self.compat in COMPAT_MODES, f"compat must be one of {COMPAT_MODES}, got {self.compat!r}")
        _check(self.attention in ATTENTION_KINDS,
               f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        _check(not (self.vision.kind == "qwen" and self.projection.kind != "baseline"),
               "the Qwen-VL vision tower only supports the 'baseline' projection (as the reference)")
        if self.projection.kind == "perceiver":
            _check(self.llm.hidden_size % 128 == 0, "the perceiver projection needs llm.hidden_size % 128 == 0")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "image_token_id", "image_pretoken_id"):
            tok = getattr(self, name)
            _check(0 <= tok < self.llm.vocab_size, f"{name}={tok} is outside the vocabulary ({self.llm.vocab_size})")

    @property
    def image_tokens(self) -> int:
        """Embeddings each `<image>` token is replaced by."""
        if self.projection.kind == "perceiver":
            return self.projection.perceiver_grid**2
        return self.vision.num_tokens

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # -- JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        subs = {"vision": VisionConfig, "llm": LLMConfig, "projection": ProjectionConfig}
        for key, sub in subs.items():
            if key in d:
                d[key] = _build(sub, d[key], key)
        return _build(cls, d, "config")

    def save(self, path: str) -> None:
        with writing_file(path) as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str) -> "ModelConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    # -- the reference's checkpoint description -----------------------------------------------------
    @classmethod
    def from_dsvc_meta(cls, meta: dict, compat: str = "dsvc") -> "ModelConfig":
        """Build the config of a reference checkpoint from its `meta.json` (see tests/golden/README.md)."""
        vis = meta["vision"]
        if meta["vision_encoder"] == "qwen":
            q = meta["qwen"]
            vision = VisionConfig(kind="qwen", image_size=q["image_size"], patch_size=q["patch_size"],
                                  hidden_size=q["width"], intermediate_size=q["mlp_size"],
                                  num_hidden_layers=q["layers"], num_attention_heads=q["heads"],
                                  layer_norm_eps=1e-6, hidden_act="gelu", output_dim=q["output_dim"],
                                  n_queries=q["n_queries"])
        else:
            vision = VisionConfig(kind="clip", image_size=vis["image_size"], patch_size=vis["patch_size"],
                                  hidden_size=vis["hidden_size"], intermediate_size=vis["intermediate_size"],
                                  num_hidden_layers=vis["num_hidden_layers"],
                                  num_attention_heads=vis["num_attention_heads"],
                                  num_channels=vis.get("num_channels", 3),
                                  layer_norm_eps=vis.get("layer_norm_eps", 1e-5),
                                  hidden_act=vis.get("hidden_act", "quick_gelu"))
        ll = meta["llama"]
        llm = LLMConfig(vocab_size=ll["vocab_size"], hidden_size=ll["hidden_size"],
                        intermediate_size=ll["intermediate_size"], num_hidden_layers=ll["num_hidden_layers"],
                        num_attention_heads=ll["num_attention_heads"],
                        num_key_value_heads=ll.get("num_key_value_heads", ll["num_attention_heads"]),
                        rms_norm_eps=ll["rms_norm_eps"], rope_theta=ll.get("rope_theta", 10000.0),
                        max_position_embeddings=ll["max_position_embeddings"])
        image_id = meta["image_token_id"]
        return cls(vision=vision, llm=llm, projection=ProjectionConfig(kind=meta["vis_proj"]),
                   mmca=bool(meta["enable_mmca_attention"]), compat=compat,
                   pad_token_id=meta["pad_token_id"], eos_token_id=meta.get("generation", {}).get("eos_token_id", 2),
                   image_token_id=image_id, image_pretoken_id=image_id - 1)




def load_checkpoint_config(path: str, compat: str | None = None) -> ModelConfig:
    """The `config.json` of a vchat checkpoint directory (torch or JAX), compat overridden if given."""
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME}; is this a vchat checkpoint directory?")
    config = ModelConfig.load(cfg_path)
    return config if compat is None else config.replace(compat=compat)


def _build(cls, d: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; expected some of {sorted(names)}")
    return cls(**d)


# -- presets ---------------------------------------------------------------------------------------

CLIP_L14_224 = VisionConfig(kind="clip", image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096,
                            num_hidden_layers=24, num_attention_heads=16, layer_norm_eps=1e-5,
                            hidden_act="quick_gelu")
QWEN_VIT_BIGG_448 = VisionConfig(kind="qwen", image_size=448, patch_size=14, hidden_size=1664,
                                 intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16,
                                 layer_norm_eps=1e-6, hidden_act="gelu", output_dim=4096, n_queries=256)
# Llama-2 vocabulary (32000) plus the reference's three added tokens.
_LLAMA2 = dict(vocab_size=32003, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096)
LLAMA2_7B = LLMConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, **_LLAMA2)
LLAMA2_13B = LLMConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, **_LLAMA2)
LLAMA2_70B = LLMConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, **_LLAMA2)
_LLAMA2_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2, image_pretoken_id=32000, image_token_id=32001)

PRESETS: dict[str, ModelConfig] = {
    # The geometry of the goldens: 96 ids, CLIP 32px/8, LLaMA hidden 128.
    "tiny": ModelConfig(llm=LLMConfig(max_position_embeddings=1024)),
    # The main job's model (`make demo`): small enough to train on two CPU cores in minutes.
    # 48 px images with 16 px patches: one patch per cell of the synthetic shapes' 3x3 grid. Eight heads
    # and a wider initialisation (0.1 rather than LLaMA's 0.02, which suits a 4096-wide model) roughly
    # halved the steps the decoder needed to learn which "### Image k:" an image token follows.
    "demo": ModelConfig(vision=VisionConfig(image_size=48, patch_size=16, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4),
                        llm=LLMConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                                      initializer_range=0.1),
                        mmca=True, compat="fixed"),
    "llama2-7b-clip-l14": ModelConfig(vision=CLIP_L14_224, llm=LLAMA2_7B, **_LLAMA2_IDS),
    "llama2-13b-qwen": ModelConfig(vision=QWEN_VIT_BIGG_448, llm=LLAMA2_13B, **_LLAMA2_IDS),
    "llama2-70b-qwen": ModelConfig(vision=QWEN_VIT_BIGG_448, llm=LLAMA2_70B, **_LLAMA2_IDS),
}


def preset(name: str) -> ModelConfig:
    """A named preset, or a path to a config JSON."""
    if name in PRESETS:
        return PRESETS[name]
    if os.path.exists(name):
        return ModelConfig.load(name)
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)} (or a path to a config.json)")
