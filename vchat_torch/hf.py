"""VisualChat (torch) from Hugging Face directories: a LLaMA directory and a CLIP or Qwen-VL vision directory.

    model = VisualChat.from_hf("Llama-2-7b-hf", "clip-vit-large-patch14", max_seq_len=4096)
    model.tokenizer          # vchat.data.TextTokenizer with "### Image:", "<image>" (ids in model.config)
    model.image_processor    # from the vision directory's preprocessor_config.json

The model is built on the meta device (nothing allocated, nothing initialised) and each tensor is
then read from the files (vchat/hf_io.py: a safetensors header and a seek, or one storage of a
`pytorch_model.bin` zip, per tensor) and put in place, in the checkpoint's dtype unless `dtype` is given (read into memory of its own, so no file stays
mapped); the new tensors (projection, added embedding
rows) come from vchat/hf_plan.py's seeded numpy draws. Under ZeRO-3 (`zero3=True`, inside DeepSpeed's
distributed setup) the model is built inside `deepspeed.zero.Init`, so parameters are partitioned as
they are created, and each tensor is written into its partitioned parameter by rank 0 under
`GatheredParameters(modifier_rank=0)`, one parameter at a time: no rank ever holds the whole model.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from vchat.hf import image_processor
from vchat.hf_io import open_weights
from vchat.hf_plan import EMBED, HFPlan, plan

from .checkpoint import materialize_buffers
from .model import VisualChat

TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}
ST_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


class TorchReader:
    """`read(file, name)` -> a torch tensor of its own (no file stays mapped: RSS holds what is loaded)."""

    def __init__(self):
        self.handles: dict[str, object] = {}

    def __call__(self, path: str, name: str) -> torch.Tensor:
        if path not in self.handles:
            self.handles = {path: open_weights(path)}  # one file open at a time
        f = self.handles[path]
        info = f.info(name)
        return torch.frombuffer(f.read_bytes(name), dtype=TORCH_DTYPES[info.dtype]).reshape(info.shape)


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes (C order) as a uint8 array, for vchat.hf_io's writers."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def append_rows(x: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    return torch.cat([x, torch.from_numpy(rows).to(x.dtype)], dim=0)


def tensor_value(p: HFPlan, key: str, read, shapes: dict, dtype: torch.dtype | None,
                 new_dtype: torch.dtype) -> torch.Tensor:
    """One vchat tensor (torch layout) in `dtype` (default: the file's; `new_dtype` for new tensors)."""
    x = p.value(key, read, shapes, append_rows)
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x).to(dtype or new_dtype)
    return x.to(dtype) if dtype is not None else x


def _set(model: nn.Module, key: str, value: torch.Tensor) -> None:
    mod_name, _, name = key.rpartition(".")
    module = model.get_submodule(mod_name)
    old = module._parameters[name]
    module._parameters[name] = nn.Parameter(value.contiguous(), requires_grad=old.requires_grad)


def _new_dtype(p: HFPlan, dtype: torch.dtype | None) -> torch.dtype:
    """dtype of the new tensors: `dtype`, else the LM's embedding table's."""
    if dtype is not None:
        return dtype
    return TORCH_DTYPES.get(p.file_dtype(EMBED), torch.float32)


def from_hf(lm_dir: str, vision_dir: str | None = None, vision_type: str | None = None,
            dtype: torch.dtype | None = None, max_seq_len: int | None = None, mmca: bool = True,
            compat: str = "fixed", projection: str = "baseline", seed: int = 0, zero3: bool = False,
            ds_config: dict | None = None, **config_overrides) -> VisualChat:
    """VisualChat from an HF LLaMA directory and a vision directory (or a `vchat convert --to hf` output).
    `config_overrides` are ModelConfig fields (e.g. attention="dense"). The model is in eval mode, its
    tower and decoder frozen, `model.tokenizer` and `model.image_processor` set."""
    p = plan(lm_dir, vision_dir, vision_type=vision_type, max_seq_len=max_seq_len, mmca=mmca, compat=compat,
             projection=projection, seed=seed, **config_overrides)
    if zero3:
        model = _load_zero3(p, dtype, ds_config)
    else:
        with torch.device("meta"):
            model = VisualChat(p.config)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        read, new_dtype = TorchReader(), _new_dtype(p, dtype)
        for key in p.sources:  # a tied lm_head has no source: it is tied below
            _set(model, key, tensor_value(p, key, read, shapes, dtype, new_dtype))
        if p.config.llm.tie_word_embeddings:
            model.lang_decoder.lm_head.weight = model.lang_decoder.model.embed_tokens.weight
        materialize_buffers(model)
        left = [n for n, t in model.state_dict().items() if t.is_meta]
        if left:
            raise RuntimeError(f"tensors never loaded: {left[:8]}")
    attach_tokenizer(model, p)
    return model.eval()


def attach_tokenizer(model: VisualChat, p: HFPlan) -> None:
    from vchat.data import TextTokenizer

    t = p.tokenizer
    model.tokenizer = TextTokenizer(t.tokenizer, t.bos_id, t.eos_id, t.pad_id, t.image_id, t.image_pretoken_id)
    model.image_processor = image_processor(p.vision.folder, p.config.vision)


def _load_zero3(p: HFPlan, dtype: torch.dtype | None, ds_config: dict | None) -> VisualChat:
    """Build inside zero.Init (parameters partitioned at creation), then fill each parameter on rank 0
    under GatheredParameters(modifier_rank=0), which scatters it back to its owners."""
    import deepspeed
    import torch.distributed as dist
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    new_dtype = _new_dtype(p, dtype)
    target = dtype or new_dtype  # under ZeRO-3 every parameter has one dtype, the training one
    # zero.Init takes the dtype from the config (DeepSpeed 0.19 ignores its `dtype=` off fp16 devices)
    cfg = dict(ds_config or {"train_micro_batch_size_per_gpu": 1})
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": target == torch.bfloat16}
    cfg["fp16"] = {**cfg.get("fp16", {}), "enabled": target == torch.float16}
    # transformers' own ZeRO-3 build: no init of the (empty) partitioned weights, RoPE tables in float32
    with no_init_weights(), prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=cfg):
        model = VisualChat(p.config)
    shapes = {k: tuple(getattr(v, "ds_shape", v.shape)) for k, v in model.named_parameters()}
    rank, read = dist.get_rank(), TorchReader()
    params = dict(model.named_parameters(remove_duplicate=False))
    for key in p.sources:
        param = params[key]
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                param.data.copy_(tensor_value(p, key, read, shapes, dtype, new_dtype))
    return model
