"""From Hugging Face directories to a VisualChat, without a framework: the tokenizer, the ModelConfig,
and where each of the model's tensors comes from.

    p = plan("Llama-2-7b-hf", "clip-vit-large-patch14", max_seq_len=4096, mmca=True)
    p.config                  # ModelConfig: vocab 32003, ids of "### Image:" / "<image>", pad = eos
    p.sources["lang_decoder.model.layers.0.mlp.up_proj.weight"]   # Source("file", shard path, tensor name)
    array = p.value(key, read, shapes)   # numpy: the tensor as vchat holds it (framework readers pass `read`)

As the reference (DSVC_INVENTORY M2, M7, T2, section 2): the LM directory's tokenizer gets "### Image:"
and "<image>" as special tokens, then "<PAD>" when it has no pad token, after which pad := eos; the
embeddings (and an untied lm_head) are resized to len(tokenizer), new rows drawn from
N(0, initializer_range) (transformers 4.33's `_init_weights`, the reference's pin), and `lang_embed`
is a copy of the resized table. The projection is new, initialised as torch initialises its modules.
Random draws come from numpy generators seeded per tensor, so both frameworks build the same model.

A directory written by `vchat convert --to hf` (lm/, vision/, visualchat.json, visualchat.safetensors)
reads back as it was written: its tokenizer already holds the tokens, its projection and lang_embed
come from visualchat.safetensors.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from vchat.config import ModelConfig, ProjectionConfig
from vchat.hf import HFError, VisionSource, WeightIndex, llm_config, read_json, vision_source, weight_index
from vchat.hf_io import open_weights
from vchat.param_map import expand
from vchat.template import DEFAULT_HUMAN_IMAGE_PRETOKEN, DEFAULT_IMAGE_TOKEN
from vchat.vision_math import sincos_2d

PAD_TOKEN = "<PAD>"
EXPORT_CONFIG = "visualchat.json"  # written by `--to hf` beside lm/ and vision/
EXPORT_WEIGHTS = "visualchat.safetensors"  # projection.* and lang_embed.weight
EMBED = "lang_decoder.model.embed_tokens.weight"
LM_HEAD = "lang_decoder.lm_head.weight"
# Tensors some LLaMA files carry that the model does not read (old RoPE buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# -- the tokenizer --------------------------------------------------------------------------------------
def _token(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


@dataclass(frozen=True)
class LMTokenizer:
    tokenizer: object  # tokenizers.Tokenizer with the reference's tokens added
    bos_id: int
    eos_id: int
    pad_id: int
    image_id: int
    image_pretoken_id: int
    base_size: int  # ids before the reference's tokens were added
    path: str

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


def lm_tokenizer(lm_dir: str) -> LMTokenizer:
    """`tokenizer.json` of an LM directory with the reference's special tokens (DST.add_special_token)."""
    from tokenizers import AddedToken, Tokenizer

    path = os.path.join(lm_dir, "tokenizer.json")
    if not os.path.exists(path):
        raise HFError(f"{path}: no such file (vchat reads the fast tokenizer: AutoTokenizer.from_pretrained(dir)"
                      ".save_pretrained(dir) writes it from a tokenizer.model)")
    tok = Tokenizer.from_file(path)
    tc_path = os.path.join(lm_dir, "tokenizer_config.json")
    tc = read_json(tc_path) if os.path.exists(tc_path) else {}
    st_path = os.path.join(lm_dir, "special_tokens_map.json")
    tc = {**(read_json(st_path) if os.path.exists(st_path) else {}), **tc}
    model_cfg = read_json(os.path.join(lm_dir, "config.json"))

    def special_id(name: str) -> int:
        text = _token(tc.get(f"{name}_token"))
        if text is not None:
            tid = tok.token_to_id(text)
            if tid is None:
                raise HFError(f"{tc_path}: key '{name}_token' = {text!r} is not in {path}")
            return tid
        if isinstance(model_cfg.get(f"{name}_token_id"), int):
            return model_cfg[f"{name}_token_id"]
        raise HFError(f"{tc_path}: key '{name}_token' missing (and no {name}_token_id in config.json)")

    bos, eos = special_id("bos"), special_id("eos")
    base = tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in (DEFAULT_HUMAN_IMAGE_PRETOKEN, DEFAULT_IMAGE_TOKEN)])
    if _token(tc.get("pad_token")) is None:
        tok.add_special_tokens([AddedToken(PAD_TOKEN, special=True, normalized=False)])
    return LMTokenizer(tok, bos, eos, eos, tok.token_to_id(DEFAULT_IMAGE_TOKEN),
                       tok.token_to_id(DEFAULT_HUMAN_IMAGE_PRETOKEN), base, path)


# -- new tensors ----------------------------------------------------------------------------------------------
def _rng(key: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def new_rows(key: str, n: int, width: int, std: float, seed: int) -> np.ndarray:
    """(n, width) float32 rows from N(0, std): what resize_token_embeddings gives the added tokens."""
    return (_rng(key, seed).standard_normal((n, width)) * std).astype(np.float32)


def init_projection(key: str, shapes: dict, seed: int) -> np.ndarray:
    """A new projection tensor (torch layout, float32) as torch initialises it: Linear weights and biases
    U(+-1/sqrt(fan_in)), MultiheadAttention's packed input xavier-uniform with zero biases, norms ones
    and zeros, learned queries N(0, 0.02), the sin-cos position table fixed."""
    shape, rng = tuple(shapes[key]), _rng(key, seed)
    if key.endswith("pos_embed"):
        return sincos_2d(shape[1], math.isqrt(shape[0]))
    if key.endswith(".query"):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)
    if key.endswith("in_proj_weight"):
        bound = math.sqrt(6.0 / (shape[0] + shape[1]))
    elif key.endswith(("in_proj_bias", "attn.out_proj.bias")):
        return np.zeros(shape, np.float32)
    elif len(shape) >= 2:
        bound = 1.0 / math.sqrt(int(np.prod(shape[1:])))
    else:
        weight = key[: -len("bias")] + "weight"
        if key.endswith(".weight") or len(shapes.get(weight, ())) < 2:  # a norm
            return np.full(shape, 1.0 if key.endswith(".weight") else 0.0, np.float32)
        bound = 1.0 / math.sqrt(int(np.prod(shapes[weight][1:])))
    return rng.uniform(-bound, bound, shape).astype(np.float32)


# -- the plan ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    kind: str  # "file" (a tensor of a file), "resize" (a file's table with rows added), "same" (another
    #            target's value), "init" (a new tensor)
    file: str | None = None
    key: str | None = None  # the file's tensor name, or the target copied ("same")


@dataclass(frozen=True)
class HFPlan:
    config: ModelConfig
    tokenizer: LMTokenizer
    vision: VisionSource
    lm: WeightIndex
    lm_dir: str
    file_vocab: int  # rows of the LM's embedding table in its files
    sources: dict  # vchat (torch) key -> Source, in vchat/param_map.py's order
    seed: int = 0

    def file_dtype(self, key: str) -> str | None:
        """The safetensors dtype name of the file tensor behind `key`, None for a new tensor."""
        src = self.sources[key]
        while src.kind == "same":
            src = self.sources[src.key]
        return None if src.kind == "init" else open_weights(src.file).info(src.key).dtype

    def expected_file_shape(self, key: str, target_shape: tuple) -> tuple:
        """The shape the file must hold for a target of `target_shape` (torch layout)."""
        return (self.file_vocab, target_shape[1]) if self.sources[key].kind == "resize" else tuple(target_shape)

    def check_shape(self, key: str, got: tuple, target_shape: tuple) -> None:
        want, src = self.expected_file_shape(key, target_shape), self.sources[key]
        if tuple(got) != want:
            raise HFError(f"{src.file}: tensor {src.key!r} has shape {tuple(got)}, expected {want} "
                          f"(from {os.path.join(os.path.dirname(src.file), 'config.json')})")

    def value(self, key: str, read: Callable, shapes: dict, append_rows: Callable = None):
        """The tensor vchat holds at `key` (torch layout): `read(file, name)` reads a file's tensor (numpy
        or a framework's), `shapes` maps every key to its torch-layout shape (what the framework's model
        has), `append_rows(x, rows)` appends numpy float32 rows to what `read` gave (default numpy).
        New tensors ("init") come as numpy float32."""
        src = self.sources[key]
        if src.kind == "same":
            return self.value(src.key, read, shapes, append_rows)
        if src.kind == "init":
            return init_projection(key, shapes, self.seed)
        x = read(src.file, src.key)
        self.check_shape(key, x.shape, shapes[key])
        if src.kind == "file":
            return x
        rows = shapes[key][0]
        if rows <= x.shape[0]:  # the reference's resize truncates a table longer than the tokenizer
            return x[:rows]
        extra = new_rows(key, rows - x.shape[0], x.shape[1], self.config.llm.initializer_range, self.seed)
        return (append_rows or _append_rows)(x, extra)


def _append_rows(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return np.concatenate([x, rows.astype(x.dtype)], axis=0)


def _exported(folder: str) -> bool:
    return os.path.exists(os.path.join(folder, EXPORT_CONFIG))


def plan(lm_dir: str, vision_dir: str | None = None, vision_type: str | None = None, max_seq_len: int | None = None,
         mmca: bool = True, compat: str = "fixed", projection: str = "baseline", seed: int = 0,
         **config_overrides) -> HFPlan:
    """Everything a framework needs to build VisualChat from an HF LLaMA directory and a vision directory
    (or from a directory written by `vchat convert --to hf`, given as `lm_dir` alone)."""
    exported = _exported(lm_dir)
    if exported:
        saved = ModelConfig.from_dict(read_json(os.path.join(lm_dir, EXPORT_CONFIG))["config"])
        base, lm_dir, vision_dir = lm_dir, os.path.join(lm_dir, "lm"), vision_dir or os.path.join(lm_dir, "vision")
    elif vision_dir is None:
        raise HFError(f"{lm_dir}: give the vision directory too (--vision / --vision_model_name_or_path)")
    llm = llm_config(lm_dir, max_seq_len)
    tok = lm_tokenizer(lm_dir)
    if tok.base_size > llm.vocab_size:
        raise HFError(f"{tok.path}: {tok.base_size} tokens, but {os.path.join(lm_dir, 'config.json')} key "
                      f"'vocab_size' = {llm.vocab_size}: the tokenizer does not fit the embeddings")
    vision = vision_source(vision_dir, vision_type)
    file_vocab = llm.vocab_size
    llm = dataclasses.replace(llm, vocab_size=len(tok))
    if exported:
        config = saved.replace(llm=llm, vision=vision.config, **config_overrides)
    else:
        config = ModelConfig(vision=vision.config, llm=llm, projection=ProjectionConfig(kind=projection), mmca=mmca,
                             compat=compat, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                             image_token_id=tok.image_id, image_pretoken_id=tok.image_pretoken_id, **config_overrides)
    lm = weight_index(lm_dir)
    extra = os.path.join(base, EXPORT_WEIGHTS) if exported else None
    sources = _sources(config, lm, vision, extra)
    return HFPlan(config, tok, vision, lm, lm_dir, file_vocab, sources, seed)


def _sources(config: ModelConfig, lm: WeightIndex, vision: VisionSource, extra: str | None) -> dict:
    tied = config.llm.tie_word_embeddings
    out, used_lm = {}, set()

    def from_file(index: WeightIndex, key: str, name: str) -> Source:
        if name not in index.where:
            raise HFError(f"{index.folder}: no tensor {name!r} (for vchat's {key})")
        return Source("file", index.where[name], name)

    for entry in expand(config):
        key = entry.torch
        if key.startswith("vis_encoder."):
            out[key] = from_file(vision.index, key, vision.file_key(key))
        elif key.startswith("lang_decoder."):
            src = from_file(lm, key, key[len("lang_decoder."):])
            out[key] = Source("resize", src.file, src.key) if key in (EMBED, LM_HEAD) else src
            used_lm.add(src.key)
        elif extra is not None:
            out[key] = Source("file", extra, key)
        else:
            out[key] = Source("same", key=EMBED) if key == "lang_embed.weight" else Source("init")
    unused = [k for k in lm.where if k not in used_lm and not k.endswith(_IGNORED_SUFFIXES)
              and not (tied and k == "lm_head.weight")]
    if unused:
        raise HFError(f"{lm.folder}: tensor(s) vchat's LLaMA has no place for: {', '.join(sorted(unused)[:8])}")
    used_vision = {s.key for k, s in out.items() if k.startswith("vis_encoder.")}
    unused = [k for k in vision.tower_keys() if k not in used_vision]
    if unused:
        raise HFError(f"{vision.folder}: tower tensor(s) vchat's {vision.kind} tower has no place for: "
                      f"{', '.join(sorted(unused)[:8])}")
    return out
