"""`vchat convert --from hf` and `--to hf`: Hugging Face directories in and out (convert/cli.py dispatches here).

    vchat convert --from hf --to torch Llama-2-7b-hf out/torch --vision clip-vit-large-patch14 --max_seq_len 4096
    vchat convert --from hf --to jax Llama-2-13b-hf out/jax --vision Qwen-VL-Chat --vision_model_type qwen
    vchat convert --from torch --to hf out/torch out/hf        # out/hf/{lm,vision,visualchat.json,...}
    vchat convert --from hf --to torch out/hf out/torch-again  # an export reads back as it was written

`--from hf --to torch` streams tensor by tensor (vchat_torch/hf_convert.py): memory holds one tensor,
whatever the model's size. `--to jax` streams as well: each parameter is read, converted and written
to orbax before the next (vchat_jax/hf.py's save_hf). `--to hf` writes the layout of vchat/hf_export.py from
any source format (LoRA merged, the tensors' dtypes kept for a vchat_torch source).
"""

from __future__ import annotations

import os
import time

from vchat.checkpoint_files import TOKENIZER_NAME, WEIGHTS_NAME
from vchat.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")


def from_hf(src: str, dst: str, dst_format: str, vision: str | None, vision_type: str | None = None,
            max_seq_len: int | None = None, mmca: bool = True, compat: str | None = None,
            projection: str = "baseline", dtype: str | None = None, log=print) -> None:
    """HF LLaMA directory SRC (+ vision directory) -> a vchat `dst_format` directory DST, atomically."""
    t0 = time.perf_counter()
    kw = dict(vision_type=vision_type, max_seq_len=max_seq_len, mmca=mmca, compat=compat or "fixed",
              projection=projection)
    log(f"reading {src} (Hugging Face LLaMA) and {vision or os.path.join(src, 'vision')} (vision tower)")
    if dst_format == "torch":
        import torch

        from vchat_torch.hf_convert import convert_hf

        convert_hf(src, vision, dst, dtype=getattr(torch, dtype) if dtype else None, log=log, **kw)
    else:
        from vchat_jax.hf import save_hf

        save_hf(src, vision, dst, dtype=dtype, **kw)
    log(f"done: {dst} ({dst_format}) in {time.perf_counter() - t0:.1f}s")


def to_hf(model, src: str, src_format: str, dst: str, vision_layout: str | None = None,
          max_shard_bytes: int = 5 << 30, log=print) -> None:
    """A loaded vchat_torch model (from SRC of `src_format`) -> the HF layout at DST, atomically."""
    from vchat.hf import image_processor
    from vchat_torch.hf_convert import checkpoint_dtypes
    from vchat_torch.hf_convert import to_hf as torch_to_hf

    t0 = time.perf_counter()
    folder = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
    tok_path = os.path.join(folder, TOKENIZER_NAME)
    if not os.path.exists(tok_path):
        raise UserError(f"{tok_path}: no such file; DST/lm needs the model's tokenizer (with its added tokens)")
    with open(tok_path) as f:
        tokenizer_json = f.read()
    dtypes = checkpoint_dtypes(folder) if src_format == "torch" and os.path.exists(
        os.path.join(folder, WEIGHTS_NAME)) else None
    processor = image_processor(folder, model.config.vision)
    log(f"writing {dst}: lm/ (LlamaForCausalLM), vision/ ({model.config.vision.kind}), visualchat.json")
    torch_to_hf(model, dst, tokenizer_json, processor=processor, vision_layout=vision_layout,
                max_shard_bytes=max_shard_bytes, dtypes=dtypes)
    log(f"done: {dst} in {time.perf_counter() - t0:.1f}s")
