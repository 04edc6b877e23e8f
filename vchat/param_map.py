"""The ONE table of parameter names and layout transforms that every converter reads, in both directions.

Each rule names a parameter twice: as the reference (and vchat_torch) state-dict key, and as the path
of the leaf in vchat_jax's NNX state, with `{}` standing for a layer index; and it names a layout
transform whose inverse sits beside it (`TRANSFORMS`). `expand(config)` instantiates the rules a
given model has. Converters (vchat_jax/state_dict.py, convert/) are strict: every source key is used once, every
target produced once, shapes are checked per key, and leftovers are listed by name.

Layouts: torch Linear weight (out, in) <-> flax kernel (in, out); torch Conv2d weight OIHW <-> flax
Conv kernel HWIO; embeddings, LayerNorm/RMSNorm vectors, biases and the free parameters (positional
tables, learned queries) are the same array in both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


def _identity(x: np.ndarray) -> np.ndarray:
    return x


TILE = 256  # _transpose2 copies large matrices tile by tile: ~1.7x numpy's strided copy (cache-friendly)


def _transpose2(x: np.ndarray) -> np.ndarray:
    if x.ndim != 2 or x.size < (1 << 20):
        return np.ascontiguousarray(np.swapaxes(x, 0, 1))
    out = np.empty((x.shape[1], x.shape[0]), x.dtype)
    for i in range(0, x.shape[0], TILE):
        for j in range(0, x.shape[1], TILE):
            out[j:j + TILE, i:i + TILE] = x[i:i + TILE, j:j + TILE].T
    return out


def _oihw_to_hwio(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(x, (2, 3, 1, 0)))


def _hwio_to_oihw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1)))


# name: (torch -> jax, jax -> torch, shape torch -> shape jax)
TRANSFORMS: dict[str, tuple[Callable, Callable, Callable]] = {
    "id": (_identity, _identity, lambda s: tuple(s)),
    "linear": (_transpose2, _transpose2, lambda s: (s[1], s[0])),
    "conv": (_oihw_to_hwio, _hwio_to_oihw, lambda s: (s[2], s[3], s[1], s[0])),
}


@dataclass(frozen=True)
class Rule:
    torch: str  # state-dict key template, `{}` = layer index
    jax: str  # dotted NNX state path template (integers are list indices)
    transform: str  # a key of TRANSFORMS
    when: str  # which models have it: "always", "untied", "clip", "qwen", "qwen_kv_proj", "baseline", "vit",
    #            "perceiver"
    layers: str | None = None  # what `{}` counts: "vision" or "llm" layers


def _linear(t: str, j: str, when: str, layers: str | None = None, bias: bool = True) -> list[Rule]:
    out = [Rule(f"{t}.weight", f"{j}.kernel", "linear", when, layers)]
    return out + ([Rule(f"{t}.bias", f"{j}.bias", "id", when, layers)] if bias else [])


def _norm(t: str, j: str, when: str, layers: str | None = None) -> list[Rule]:
    return [Rule(f"{t}.weight", f"{j}.scale", "id", when, layers), Rule(f"{t}.bias", f"{j}.bias", "id", when, layers)]


def _clip_layer(t: str, j: str, when: str, layers: str | None) -> list[Rule]:
    rules = []
    for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
        rules += _linear(f"{t}.self_attn.{proj}", f"{j}.self_attn.{proj}", when, layers)
    rules += _norm(f"{t}.layer_norm1", f"{j}.layer_norm1", when, layers)
    rules += _linear(f"{t}.mlp.fc1", f"{j}.mlp.fc1", when, layers)
    rules += _linear(f"{t}.mlp.fc2", f"{j}.mlp.fc2", when, layers)
    rules += _norm(f"{t}.layer_norm2", f"{j}.layer_norm2", when, layers)
    return rules


def _mha(t: str, j: str, when: str) -> list[Rule]:
    """torch.nn.MultiheadAttention: packed in_proj_weight (3D, D) / in_proj_bias, and out_proj."""
    packed = [Rule(f"{t}.in_proj_weight", f"{j}.in_proj.kernel", "linear", when),
              Rule(f"{t}.in_proj_bias", f"{j}.in_proj.bias", "id", when)]
    return packed + _linear(f"{t}.out_proj", f"{j}.out_proj", when)


_CV = "vis_encoder.vision_model"
_L = "lang_decoder.model.layers.{}"
_Q = "vis_encoder.transformer.resblocks.{}"

RULES: list[Rule] = [
    # -- CLIP vision tower (transformers' CLIPVisionModel) ---------------------------------------------
    Rule(f"{_CV}.embeddings.class_embedding", f"{_CV}.embeddings.class_embedding", "id", "clip"),
    Rule(f"{_CV}.embeddings.patch_embedding.weight", f"{_CV}.embeddings.patch_embedding.kernel", "conv", "clip"),
    Rule(f"{_CV}.embeddings.position_embedding.weight", f"{_CV}.embeddings.position_embedding.embedding", "id", "clip"),
    *_norm(f"{_CV}.pre_layrnorm", f"{_CV}.pre_layrnorm", "clip"),
    *_clip_layer(f"{_CV}.encoder.layers.{{}}", f"{_CV}.encoder.layers.{{}}", "clip", "vision"),
    *_norm(f"{_CV}.post_layernorm", f"{_CV}.post_layernorm", "clip"),
    # -- Qwen-VL ViT and resampler ---------------------------------------------------------------------
    Rule("vis_encoder.conv1.weight", "vis_encoder.conv1.kernel", "conv", "qwen"),
    Rule("vis_encoder.positional_embedding", "vis_encoder.positional_embedding", "id", "qwen"),
    *_norm("vis_encoder.ln_pre", "vis_encoder.ln_pre", "qwen"),
    *_norm(f"{_Q}.ln_1", f"{_Q}.ln_1", "qwen", "vision"),
    *_norm(f"{_Q}.ln_2", f"{_Q}.ln_2", "qwen", "vision"),
    *_linear(f"{_Q}.attn.in_proj", f"{_Q}.attn.in_proj", "qwen", "vision"),
    *_linear(f"{_Q}.attn.out_proj", f"{_Q}.attn.out_proj", "qwen", "vision"),
    *_linear(f"{_Q}.mlp.c_fc", f"{_Q}.mlp.c_fc", "qwen", "vision"),
    *_linear(f"{_Q}.mlp.c_proj", f"{_Q}.mlp.c_proj", "qwen", "vision"),
    Rule("vis_encoder.attn_pool.pos_embed", "vis_encoder.attn_pool.pos_embed", "id", "qwen"),
    Rule("vis_encoder.attn_pool.query", "vis_encoder.attn_pool.query", "id", "qwen"),
    Rule("vis_encoder.attn_pool.kv_proj.weight", "vis_encoder.attn_pool.kv_proj.kernel", "linear", "qwen_kv_proj"),
    *_mha("vis_encoder.attn_pool.attn", "vis_encoder.attn_pool.attn", "qwen"),
    *_norm("vis_encoder.attn_pool.ln_q", "vis_encoder.attn_pool.ln_q", "qwen"),
    *_norm("vis_encoder.attn_pool.ln_kv", "vis_encoder.attn_pool.ln_kv", "qwen"),
    *_norm("vis_encoder.ln_post", "vis_encoder.ln_post", "qwen"),
    # -- projections -------------------------------------------------------------------------------------
    *_linear("projection.0", "projection.layers.0", "baseline"),
    *_norm("projection.1", "projection.layers.1", "baseline"),
    *_clip_layer("projection.vis_layer", "projection.vis_layer", "vit", None),
    *_linear("projection.projection.0", "projection.projection.layers.0", "vit"),
    *_norm("projection.projection.1", "projection.projection.layers.1", "vit"),
    Rule("projection.pos_embed", "projection.pos_embed", "id", "perceiver"),
    Rule("projection.query", "projection.query", "id", "perceiver"),
    *_linear("projection.kv_proj", "projection.kv_proj", "perceiver"),
    *_mha("projection.attn", "projection.attn", "perceiver"),
    *_norm("projection.ln_q", "projection.ln_q", "perceiver"),
    *_norm("projection.ln_kv", "projection.ln_kv", "perceiver"),
    *_norm("projection.projection.0", "projection.projection.layers.0", "perceiver"),
    *_linear("projection.projection.1", "projection.projection.layers.1", "perceiver"),
    # -- language side -----------------------------------------------------------------------------------
    Rule("lang_embed.weight", "lang_embed.embedding", "id", "always"),
    Rule("lang_decoder.model.embed_tokens.weight", "lang_decoder.model.embed_tokens.embedding", "id", "always"),
    *[r for p in ("q_proj", "k_proj", "v_proj", "o_proj")
      for r in _linear(f"{_L}.self_attn.{p}", f"{_L}.self_attn.{p}", "always", "llm", bias=False)],
    *[r for p in ("gate_proj", "up_proj", "down_proj")
      for r in _linear(f"{_L}.mlp.{p}", f"{_L}.mlp.{p}", "always", "llm", bias=False)],
    Rule(f"{_L}.input_layernorm.weight", f"{_L}.input_layernorm.weight", "id", "always", "llm"),
    Rule(f"{_L}.post_attention_layernorm.weight", f"{_L}.post_attention_layernorm.weight", "id", "always", "llm"),
    Rule("lang_decoder.model.norm.weight", "lang_decoder.model.norm.weight", "id", "always"),
    Rule("lang_decoder.lm_head.weight", "lang_decoder.lm_head.kernel", "linear", "untied"),
]

# With llm.tie_word_embeddings the decoder's lm_head IS embed_tokens: JAX has no lm_head parameter and a
# torch state dict (which lists a tied tensor under both names) holds the alias: alias -> its source key.
TIED_ALIASES = {"lang_decoder.lm_head.weight": "lang_decoder.model.embed_tokens.weight"}


@dataclass(frozen=True)
class Entry:
    """One instantiated rule: a torch key, a JAX path and the transform pair."""

    torch: str
    jax: tuple  # NNX state path: strings and list indices
    transform: str

    def to_jax(self, x: np.ndarray) -> np.ndarray:
        return TRANSFORMS[self.transform][0](x)

    def to_torch(self, x: np.ndarray) -> np.ndarray:
        return TRANSFORMS[self.transform][1](x)

    def jax_shape(self, torch_shape) -> tuple:
        return TRANSFORMS[self.transform][2](torch_shape)


def parse_path(dotted: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


def format_path(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def active_tags(config) -> set[str]:
    """The `when` tags of the rules a ModelConfig's model has."""
    v = config.vision
    tags = {"always", v.kind, config.projection.kind}
    if not config.llm.tie_word_embeddings:
        tags.add("untied")
    if v.kind == "qwen" and v.hidden_size != v.output_dim:
        tags.add("qwen_kv_proj")
    return tags


def tied_aliases(config) -> dict[str, str]:
    """The alias keys (-> source key) a torch state dict of this model holds beside the table's keys."""
    return dict(TIED_ALIASES) if config.llm.tie_word_embeddings else {}


def expand(config) -> list[Entry]:
    """Every parameter of the model `config` describes, once, in table order."""
    tags = active_tags(config)
    counts = {"vision": config.vision.num_hidden_layers, "llm": config.llm.num_hidden_layers}
    out = []
    for r in RULES:
        if r.when not in tags:
            continue
        for i in range(counts[r.layers]) if r.layers else [None]:
            t, j = (r.torch, r.jax) if i is None else (r.torch.format(i), r.jax.format(i))
            out.append(Entry(t, parse_path(j), r.transform))
    return out
