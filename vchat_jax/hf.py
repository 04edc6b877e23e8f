"""VisualChat (JAX) from Hugging Face directories, without torch: a LLaMA directory and a CLIP or Qwen-VL one.

    model = from_hf("Llama-2-7b-hf", "clip-vit-large-patch14", max_seq_len=4096, mesh=mesh)
    model.tokenizer, model.image_processor    # as vchat_torch's from_hf
    save_hf("Llama-2-7b-hf", "clip-vit-large-patch14", "out/jax")   # `vchat convert --from hf --to jax`

The model is abstract first (`nnx.eval_shape`: shapes and shardings, no arrays); each parameter is then
read from the files with vchat/hf_io.py (safetensors headers, `pytorch_model.bin` zips: numpy, no
torch), put in JAX's layout through vchat/param_map.py's table, and placed with its NamedSharding on
`mesh` as it is read, so a host holds the model once. The plan (vchat/hf_plan.py) is the one
vchat_torch reads, so both frameworks build the same model from the same directories, new tensors
(projection, added embedding rows) included. save_hf writes the same model as a vchat_jax checkpoint
without building it: each parameter is read, converted and written to orbax before the next.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vchat.checkpoint_files import TOKENIZER_NAME
from vchat.hf import image_processor
from vchat.hf_io import numpy_dtype, open_weights
from vchat.hf_plan import EMBED, HFPlan, plan
from vchat.param_map import TRANSFORMS, expand

from .model import VisualChat


def read_numpy(path: str, name: str) -> np.ndarray:
    return open_weights(path).read(name)


def _read(p: HFPlan, e, shapes: dict) -> np.ndarray:
    """Param-map entry `e`'s tensor, read through the plan and put in JAX's layout (numpy)."""
    return e.to_jax(np.asarray(p.value(e.torch, read_numpy, shapes)))


def torch_shape(transform: str, jax_shape: tuple) -> tuple:
    """The torch-layout shape of a parameter of JAX shape `jax_shape` (the inverse of param_map's shapes)."""
    if transform == "linear":
        return (jax_shape[1], jax_shape[0])
    if transform == "conv":  # HWIO -> OIHW
        return (jax_shape[3], jax_shape[2], jax_shape[0], jax_shape[1])
    assert TRANSFORMS[transform][2](jax_shape) == tuple(jax_shape)
    return tuple(jax_shape)


def model_dtype(p: HFPlan, dtype):
    """The one dtype of the JAX model: `dtype`, else that of the LM's embedding table in its files."""
    return jnp.dtype(dtype) if dtype is not None else jnp.dtype(numpy_dtype(p.file_dtype(EMBED)))


def _abstract(lm_dir: str, vision_dir: str | None, dtype, **plan_kw):
    """The plan, the model's dtype, the abstract model, its flat parameters {path: Variable} and the
    param-map entries, with the torch-layout shapes the plan reads them in."""
    p = plan(lm_dir, vision_dir, **plan_kw)
    dt = model_dtype(p, dtype)
    model = nnx.eval_shape(lambda: VisualChat(p.config, nnx.Rngs(0)))
    flat = {tuple(path): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    entries = expand(p.config)
    if {e.jax for e in entries} != set(flat):
        raise RuntimeError(f"vchat_jax's parameters and the param map differ: {set(flat) ^ {e.jax for e in entries}}")
    shapes = {e.torch: torch_shape(e.transform, flat[e.jax].get_value().shape) for e in entries}
    return p, dt, model, flat, entries, shapes


def from_hf(lm_dir: str, vision_dir: str | None = None, vision_type: str | None = None, dtype=None,
            max_seq_len: int | None = None, mmca: bool = True, compat: str = "fixed", projection: str = "baseline",
            seed: int = 0, mesh=None, **config_overrides) -> VisualChat:
    """vchat_jax.VisualChat from an HF LLaMA directory and a vision directory (or a `vchat convert --to hf`
    output). The whole model is in `dtype` (default: the LM checkpoint's); `mesh` shards it as it loads."""
    p, dt, model, _, entries, shapes = _abstract(
        lm_dir, vision_dir, dtype, vision_type=vision_type, max_seq_len=max_seq_len, mmca=mmca, compat=compat,
        projection=projection, seed=seed, **config_overrides)
    from .checkpoint import filled

    model = filled(p.config, {e.jax: (lambda e=e: _read(p, e, shapes)) for e in entries}, mesh, model, dtype=dt)
    model.astype(dt)  # flax layers carry their compute dtype
    model.tokenizer = tokenizer_of(p)
    model.image_processor = image_processor(p.vision.folder, p.config.vision)
    return model


def save_hf(lm_dir: str, vision_dir: str | None, dst: str, dtype=None, **plan_kw) -> None:
    """from_hf(...).save_pretrained(dst) with tokenizer.json and preprocessor_config.json, streamed: each
    parameter is read, converted and written before the next (vchat_jax.checkpoint.save_lazily), so
    memory holds one tensor whatever the model's size. `plan_kw` as from_hf's."""
    from vchat.hf_export import preprocessor_json

    from .checkpoint import LazyLeaf, save_lazily

    p, dt, _, flat, entries, shapes = _abstract(lm_dir, vision_dir, dtype, **plan_kw)
    params: dict = {}
    for e in entries:
        node = params
        for key in e.jax[:-1]:
            node = node.setdefault(key, {})
        node[e.jax[-1]] = LazyLeaf(flat[e.jax].get_value().shape, dt,
                                    lambda e=e: np.asarray(_read(p, e, shapes), dtype=dt))
    extra = {TOKENIZER_NAME: tokenizer_of(p).backend.to_str(), "preprocessor_config.json": json.dumps(
        preprocessor_json(image_processor(p.vision.folder, p.config.vision)), indent=2)}
    save_lazily(p.config, dst, params, extra_files=extra)


def tokenizer_of(p: HFPlan):
    from vchat.data import TextTokenizer

    t = p.tokenizer
    return TextTokenizer(t.tokenizer, t.bos_id, t.eos_id, t.pad_id, t.image_id, t.image_pretoken_id)
