"""Shared pieces of the cross-framework tests: a torch VisualChat and its vchat_jax twin on the same weights
(converted with vchat_jax/state_dict.py), the long multi-image test batch, and one jitted JAX loss/grad function.

    pair = make_pair(config)                 # (torch model, jax model), identical weights
    batch = make_batch(config)               # ids, mask, labels, images, image_num

The weights start from the torch model's own random init and are then redrawn with a seeded numpy RNG at
unit-ish scale (norm weights 1 + noise, biases and free tables noise, matrices 1/sqrt(fan_in)): with the
default 0.02 init every attention row is near-uniform and a RoPE or mask mistake barely moves the logits.
`lang_embed` is made to differ from `embed_tokens`, so the compat modes' decode embeddings differ.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from vchat.param_map import expand
from vchat_jax.state_dict import load_state_dict
from vchat.config import LLMConfig, ModelConfig, ProjectionConfig, VisionConfig
from vchat_jax import VisualChat as JaxVisualChat
from vchat_jax.model import forward_planned
from vchat_torch import VisualChat as TorchVisualChat

BOS, PAD, PRE, IMG = 1, 2, 94, 95
TRAINABLE = ("lang_embed", "projection")

RESULTS: dict[str, dict[str, float]] = {}  # combo id -> {measure: worst torch-vs-JAX difference}
COLUMNS = ("logits", "loss", "grad_rel", "step_logits", "ids_equal")
BF16_RESULTS: dict[str, dict[str, float]] = {}  # combo id -> {kl_max, kl_mean, top1, ids_agree}


def make_config(tower: str = "clip", projection: str = "baseline", kv_heads: int = 4, mmca: bool = True,
                compat: str = "fixed") -> ModelConfig:
    """A tiny model: hidden 128, 2 decoder layers, 4 query heads; 32x32 images in 8x8 patches (16 patches)."""
    if tower == "qwen":  # width 64 != output_dim 128: the resampler's kv_proj exists
        vision = VisionConfig(kind="qwen", image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, layer_norm_eps=1e-6, hidden_act="gelu",
                              output_dim=128, n_queries=16)
    else:
        vision = VisionConfig(kind="clip", image_size=32, patch_size=8, hidden_size=48, intermediate_size=96,
                              num_hidden_layers=2, num_attention_heads=4)
    llm = LLMConfig(vocab_size=96, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=1024)
    return ModelConfig(vision=vision, llm=llm, projection=ProjectionConfig(kind=projection, perceiver_grid=4),
                       mmca=mmca, compat=compat)


def _redraw(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in sd.items():
        shape = tuple(v.shape)
        if len(shape) >= 2:
            x = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        elif k.endswith("weight") or k.endswith("scale"):  # LayerNorm / RMSNorm gains
            x = 1.0 + 0.2 * rng.standard_normal(shape)
        else:  # biases, class embedding
            x = 0.2 * rng.standard_normal(shape)
        out[k] = torch.from_numpy(x.astype(np.float32))
    table = out["lang_decoder.model.embed_tokens.weight"]  # (V, D)
    noise = 0.5 * rng.standard_normal(tuple(table.shape)) / np.sqrt(table.shape[1])
    out["lang_embed.weight"] = table + torch.from_numpy(noise.astype(np.float32))
    return out


def make_pair(config: ModelConfig, seed: int = 0) -> tuple[TorchVisualChat, JaxVisualChat]:
    """A random torch VisualChat and the vchat_jax model built from its state dict by vchat_jax.state_dict."""
    torch.manual_seed(seed)
    tm = TorchVisualChat(config)
    sd = _redraw(tm.state_dict(), seed)
    tm.load_state_dict(sd, strict=True)
    tm.eval()
    jm = JaxVisualChat(config, nnx.Rngs(seed + 1))  # different init: every leaf must come from the converter
    load_state_dict(jm, {k: v.numpy() for k, v in tm.state_dict().items()})
    return tm, jm


def make_batch(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Three samples, right-padded: a long multi-turn one with text before its first image and 3 images
    (>= 300 spliced positions), a shorter one with 2 images (padding), and a text-only one. The last 6
    tokens of each sample are supervised."""
    rng = np.random.default_rng(seed)

    def text(n):
        return list(rng.integers(3, 90, size=n))

    long = [BOS, *text(60), PRE, IMG, *text(40), PRE, IMG, PRE, IMG, *text(150)]
    short = [BOS, *text(20), PRE, IMG, *text(30), PRE, IMG, *text(25)]
    only = [BOS, *text(90)]
    rows = [long, short, only]
    T = max(map(len, rows))
    ids = np.full((3, T), PAD, np.int64)
    mask = np.zeros((3, T), np.int64)
    labels = np.full((3, T), -100, np.int64)
    for b, r in enumerate(rows):
        ids[b, :len(r)], mask[b, :len(r)] = r, 1
        labels[b, len(r) - 6:len(r)] = r[-6:]
    image_num = np.array([3, 2, 0], np.int64)
    images = rng.standard_normal((int(image_num.sum()), 3, config.vision.image_size,
                                  config.vision.image_size)).astype(np.float32)
    return {"ids": ids, "mask": mask, "labels": labels, "images": images, "image_num": image_num}


def left_pad(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded prompts -> left-padded ones (generation's layout)."""
    out, m = np.full_like(ids, PAD), np.zeros_like(mask)
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        out[b, ids.shape[1] - n:], m[b, ids.shape[1] - n:] = ids[b, :n], 1
    return out, m


# -- JAX: one jitted loss + logits + trainable gradients, shared by every combination --------------------

def _trainable_filter():
    return nnx.All(nnx.Param, nnx.Any(*(nnx.PathContains(n) for n in TRAINABLE)))


@partial(jax.jit, static_argnums=0)
def _loss_logits_grads(graphdef, trainable, rest, plan, images):
    def f(tr):
        out = forward_planned(nnx.merge(graphdef, tr, rest), plan, images)
        return out.loss, out.logits

    (loss, logits), grads = jax.value_and_grad(f, has_aux=True)(trainable)
    return loss, logits, grads


def jax_loss_logits_grads(model: JaxVisualChat, batch: dict) -> tuple[float, np.ndarray, np.ndarray, dict]:
    """Loss, logits (B, L, V), modality (B, L) and {torch key: gradient in torch layout} of the trainable
    parameters (lang_embed, projection)."""
    p = model.plan(batch["ids"], batch["mask"], batch["image_num"], batch["labels"])
    graphdef, trainable, rest = nnx.split(model, _trainable_filter(), ...)
    loss, logits, grads = _loss_logits_grads(graphdef, trainable, rest, p, jnp.asarray(batch["images"]))
    flat = {tuple(path): np.asarray(v[...]) for path, v in nnx.to_flat_state(grads)}
    by_torch = {e.torch: e.to_torch(flat[e.jax]) for e in expand(model.config) if e.jax in flat}
    return float(loss), np.asarray(logits), p.modality, by_torch


def torch_loss_logits_grads(model: TorchVisualChat, batch: dict) -> tuple[float, np.ndarray, np.ndarray, dict]:
    model.zero_grad(set_to_none=True)
    t = torch.from_numpy
    out = model(t(batch["images"]), t(batch["ids"]), t(batch["mask"]), labels=t(batch["labels"]),
                image_num=t(batch["image_num"]))
    out.loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.requires_grad}
    return float(out.loss.detach()), out.logits.detach().numpy(), out.modality.numpy(), grads
