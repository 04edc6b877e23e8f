"""`vchat convert`: checkpoints between the reference (DeepSpeed-VisualChat), vchat_torch and vchat_jax.

    # a reference pytorch_model.bin (geometry from a golden-style meta.json, or a preset / config JSON)
    vchat convert --from dsvc --to jax tests/golden/qwen-mmca out/qwen-jax        # meta.json found beside it
    vchat convert --from dsvc --to torch ckpt/pytorch_model.bin out/torch --config llama2-13b-qwen
    vchat convert --from dsvc --to torch ckpt/ out/torch --meta ckpt/meta.json --compat fixed
    # `vchat train`'s DeepSpeed checkpoint (ZeRO 0-3; its ds/ directory or one step under it)
    vchat convert --from zero --to jax runs/demo/ds out/demo-jax
    vchat convert --from torch --to jax out/torch out/jax
    vchat convert --from jax --to torch out/jax out/torch-again --overwrite
    # Hugging Face directories in and out (convert/hf.py)
    vchat convert --from hf --to torch Llama-2-7b-hf out/torch --vision clip-vit-large-patch14 --max_seq_len 4096
    vchat convert --from torch --to hf out/torch out/hf      # out/hf/lm, out/hf/vision, out/hf/visualchat.json

Formats: `hf` is a Hugging Face LLaMA directory as SRC (with `--vision`, a CLIP or Qwen-VL directory;
`--vision_model_type` overrides its detected kind), or as DST the layout of vchat/hf_export.py.
`dsvc` is a reference `pytorch_model.bin` (or the directory holding it), which stores no
geometry: pass `--meta` (tests/golden/README.md's layout; a meta.json beside SRC is used when neither
option is given) or `--config` (a preset name or a vchat config.json). `torch` is a vchat_torch
directory (config.json + model.safetensors), `jax` a vchat_jax directory (config.json + params/, orbax).
`zero` is a DeepSpeed checkpoint written by `vchat train` (`<output_dir>/ds`, the step `latest`
names, or `<output_dir>/ds/stepN`), consolidated with DeepSpeed's zero_to_fp32 under ZeRO 1-3; its
geometry is the run's config.json. `--compat` sets the compat mode written to DST (default: "dsvc" for
a reference checkpoint, otherwise SRC's own).

Every conversion goes through vchat/param_map.py's table and is strict: each source tensor is used
once, each target produced once, shapes are checked per key, and the error names any key that does not
fit. DST is written atomically (a temporary sibling renamed into place at the end), so a failed
conversion leaves nothing behind; an existing DST is replaced only with `--overwrite`. A tokenizer.json
in SRC's folder is copied into DST.

Nothing but DST is ever removed: a DST inside SRC or containing it, a symlink, a regular file, or an
existing directory that is not a vchat checkpoint (no config.json) is refused. A damaged file (JSON
that does not parse, a truncated or garbage safetensors file) is named; a tensor holding NaN or Inf
is refused unless `--allow_nonfinite`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from vchat.checkpoint_files import (CONFIG_NAME, DSVC_META_NAME, DSVC_WEIGHTS_NAME, PARAMS_DIR, PREPROCESSOR_NAME,
                                    TOKENIZER_NAME, WEIGHTS_NAME)
from vchat.config import COMPAT_MODES, ModelConfig, preset
from vchat.errors import UserError, debugging
from vchat.file_checks import check_json, check_safetensors
from vchat.io import list_names

SOURCES = ("dsvc", "zero", "torch", "jax", "hf")
TARGETS = ("torch", "jax", "hf")
TOKENIZER_FILES = (TOKENIZER_NAME, PREPROCESSOR_NAME)  # carried from SRC to DST as they are


class ConvertError(UserError):
    pass


def check_paths(src: str, dst: str, overwrite: bool) -> None:
    """Refuse a DST whose replacement could remove anything but DST itself."""
    if os.path.islink(dst):
        raise ConvertError(f"DST {dst} is a symlink; give the directory to write itself")
    s, d = os.path.realpath(src), os.path.realpath(dst)
    if s == d:
        raise ConvertError("SRC and DST are the same path")
    if os.path.commonpath([s, d]) == s:
        raise ConvertError(f"DST {dst} is inside SRC {src}; choose a DST outside it")
    if os.path.commonpath([s, d]) == d:
        raise ConvertError(f"DST {dst} contains SRC {src}; replacing it would remove SRC")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise ConvertError(f"DST {dst} exists and is not a directory; remove it or choose another path")
    if os.path.exists(dst) and not overwrite:
        raise ConvertError(f"{dst} exists; pass --overwrite to replace it")
    if os.path.isdir(dst) and os.listdir(dst) and not os.path.isfile(os.path.join(dst, CONFIG_NAME)):
        raise ConvertError(f"DST {dst} is not a vchat checkpoint directory (no {CONFIG_NAME}); --overwrite "
                           f"replaces only those")


def check_source_files(src: str) -> None:
    """Name a damaged JSON or safetensors file of SRC before a loader trips over it."""
    folder = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
    for name in (CONFIG_NAME, DSVC_META_NAME):
        if os.path.isfile(os.path.join(folder, name)):
            check_json(os.path.join(folder, name))
    if os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
        check_safetensors(os.path.join(folder, WEIGHTS_NAME))


def nonfinite_tensors(model, framework: str) -> list[str]:
    """Names of the parameters holding NaN or Inf."""
    import numpy as np

    if framework == "torch":
        return [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(v.isfinite().all())]
    from flax import nnx

    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return [".".join(map(str, k)) for k, v in flat if not np.isfinite(np.asarray(v[...], np.float32)).all()]


def dsvc_config(src: str, config: str | None, meta: str | None, compat: str | None) -> tuple[ModelConfig, str]:
    """The geometry of a reference checkpoint, and where it came from."""
    compat = compat or "dsvc"
    if config and meta:
        raise ConvertError("give --config or --meta, not both")
    if config:
        return preset(config).replace(compat=compat), f"--config {config}"
    if meta is None:
        beside = os.path.join(src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src)), DSVC_META_NAME)
        if not os.path.exists(beside):
            raise ConvertError(f"a reference checkpoint stores no geometry: pass --meta META_JSON or --config "
                               f"PRESET_OR_JSON (no {DSVC_META_NAME} beside {src})")
        meta = beside
    with open(meta) as f:
        try:
            return ModelConfig.from_dsvc_meta(json.load(f), compat=compat), meta
        except KeyError as e:
            raise ConvertError(f"{meta}: no key {e} (expected the layout of tests/golden/README.md)") from None


def load_torch(fmt: str, src: str, config: ModelConfig | None, compat: str | None):
    """A vchat_torch.VisualChat from any source format, loaded strictly."""
    from vchat_torch import checkpoint as tc

    if fmt == "dsvc":
        return tc.from_dsvc(src, config)
    if fmt == "torch":
        return tc.from_pretrained(src, compat=compat)
    if fmt == "zero":
        return tc.from_zero(src, compat=compat)
    import torch

    from vchat_jax.state_dict import to_state_dict

    jax_model = load_jax("jax", src, None, compat)
    sd = {k: torch.tensor(v) for k, v in to_state_dict(jax_model).items()}  # copies: JAX arrays are read-only
    return tc.build_loaded(jax_model.config, sd, source=src)


def load_jax(fmt: str, src: str, config: ModelConfig | None, compat: str | None):
    """A vchat_jax.VisualChat from any source format, loaded strictly (no torch needed)."""
    from vchat_jax import checkpoint as jc

    if fmt == "dsvc":
        return jc.from_dsvc(src, config)
    if fmt == "zero":  # DeepSpeed's files are torch pickles: read them with torch
        torch_model = load_torch("zero", src, None, compat)
        return jc.from_state_dict(torch_model.config, {k: v.detach().float().numpy()
                                                       for k, v in torch_model.state_dict().items()})
    if fmt == "torch" and not os.path.exists(os.path.join(src, WEIGHTS_NAME)):
        raise ConvertError(f"{src}: no {WEIGHTS_NAME}; is this a vchat_torch directory?")
    if fmt == "jax" and not os.path.isdir(os.path.join(src, PARAMS_DIR)):
        raise ConvertError(f"{src}: no {PARAMS_DIR}/; is this a vchat_jax (orbax) directory?")
    return jc.from_pretrained(src, compat=compat)


def tokenizer_files(src: str) -> dict[str, str]:
    """{name: text} of the tokenizer files in SRC's folder, which DST gets too."""
    folder = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
    out = {}
    for name in TOKENIZER_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path) as f:
                out[name] = f.read()
    return out


def count_tensors(model, framework: str) -> int:
    if framework == "torch":
        return len(model.state_dict())
    from flax import nnx

    return len(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def convert(src: str, dst: str, src_format: str, dst_format: str, config: str | None = None,
            meta: str | None = None, compat: str | None = None, overwrite: bool = False, log=print,
            allow_nonfinite: bool = False, hf: dict | None = None) -> None:
    """Convert SRC (format `src_format`) into a vchat directory DST (`dst_format`). Raises on any mismatch;
    DST appears only when the whole conversion has succeeded. `hf` holds convert/hf.py's options."""
    if src_format not in SOURCES or dst_format not in TARGETS:
        raise ConvertError(f"--from must be one of {SOURCES} and --to one of {TARGETS}")
    if not os.path.exists(src):
        raise ConvertError(f"{src}: no such file or directory")
    check_paths(src, dst, overwrite)
    if src_format != "dsvc" and (config or meta):
        raise ConvertError(f"--config/--meta describe a reference checkpoint; a {src_format} directory has its "
                           f"own config.json")
    if src_format == "hf" and dst_format == "hf":
        raise ConvertError("--from hf --to hf: nothing to convert")
    if src_format == "hf":
        from .hf import from_hf

        return from_hf(src, dst, dst_format, log=log, compat=compat, **(hf or {}))
    t0 = time.perf_counter()
    cfg = None
    if src_format == "dsvc":
        cfg, origin = dsvc_config(src, config, meta, compat)
        path = os.path.join(src, DSVC_WEIGHTS_NAME) if os.path.isdir(src) else src
        log(f"reading {path} (reference checkpoint; geometry from {origin}, compat {cfg.compat!r})")
        src = path
    else:
        log(f"reading {src} (vchat {src_format} directory)")
    check_source_files(src)
    try:
        model = (load_jax if dst_format == "jax" else load_torch)(src_format, src, cfg, compat)
    except (UserError, OSError):
        raise
    except Exception as e:  # a damaged file the checks above do not know: name SRC
        raise ConvertError(f"{src}: cannot read it as a {src_format} checkpoint ({type(e).__name__}: {e})") from e
    framework = "jax" if dst_format == "jax" else "torch"
    n = count_tensors(model, framework)
    bad = nonfinite_tensors(model, framework)
    if bad and not allow_nonfinite:
        raise ConvertError(f"{len(bad)} of {n} tensors hold NaN or Inf ({list_names(bad, 5)}); "
                           f"--allow_nonfinite converts them anyway")
    c = model.config
    if dst_format == "hf":
        from .hf import to_hf

        return to_hf(model, src, src_format, dst, log=log, **(hf or {}))
    log(f"loaded {n} tensors strictly: {c.vision.kind} tower, {c.projection.kind} projection, "
        f"{c.llm.num_hidden_layers} decoder layers, heads {c.llm.num_attention_heads}/{c.llm.num_key_value_heads}, "
        f"mmca {c.mmca}, compat {c.compat!r}")
    extra = tokenizer_files(src)
    log(f"writing {dst} ({dst_format}: {WEIGHTS_NAME if dst_format == 'torch' else PARAMS_DIR + '/ (orbax)'}"
        f"{''.join(', ' + name for name in extra)})")
    model.save_pretrained(dst, extra_files=extra)  # atomic: a temporary sibling renamed into place
    log(f"done: {n} tensors in {time.perf_counter() - t0:.1f}s")


def main(argv: list[str] | None = None, prog: str = "vchat convert") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="examples:\n" + __doc__.split("\n\n")[1])
    ap.add_argument("--from", dest="src_format", choices=SOURCES, required=True, help="format of SRC")
    ap.add_argument("--to", dest="dst_format", choices=TARGETS, required=True, help="format of DST")
    ap.add_argument("src", metavar="SRC", help="a reference pytorch_model.bin (or its folder), a DeepSpeed "
                    "checkpoint of vchat train (ds/ or ds/stepN), or a vchat directory")
    ap.add_argument("dst", metavar="DST", help="the vchat directory to write")
    ap.add_argument("--config", default=None, metavar="PRESET_OR_JSON",
                    help="geometry of a reference checkpoint: a preset name or a config.json")
    ap.add_argument("--meta", default=None, metavar="META_JSON",
                    help="geometry of a reference checkpoint: a golden-style meta.json")
    ap.add_argument("--compat", choices=COMPAT_MODES, default=None,
                    help="compat mode written to DST (default: dsvc for a reference checkpoint, else SRC's)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing DST (a vchat checkpoint directory)")
    ap.add_argument("--allow_nonfinite", action="store_true", help="convert tensors holding NaN or Inf")
    h = ap.add_argument_group("Hugging Face directories (--from hf / --to hf)")
    h.add_argument("--vision", default=None, help="--from hf: the vision directory (CLIP or Qwen-VL)")
    h.add_argument("--vision_model_type", choices=("clip", "qwen"), default=None,
                   help="--from hf: the tower's kind (default: detected from the directory's config and tensors)")
    h.add_argument("--max_seq_len", type=int, default=None, help="--from hf: max_position_embeddings of the model")
    h.add_argument("--enable_mmca_attention", action="store_true", help="--from hf: the model uses MMCA")
    h.add_argument("--vis_proj", choices=("baseline", "vit", "perceiver"), default="baseline")
    h.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="--from hf: cast every tensor (default: the checkpoint's own)")
    h.add_argument("--vision_layout", choices=("clip_vision", "qwen_vl", "qwen_extracted"), default=None,
                   help="--to hf: the layout of DST/vision (default: clip_vision or qwen_extracted)")
    h.add_argument("--max_shard_size", type=int, default=5 << 30, help="--to hf: bytes per safetensors shard")
    args = ap.parse_args(argv)
    hf = (dict(vision=args.vision, vision_type=args.vision_model_type, max_seq_len=args.max_seq_len,
               mmca=args.enable_mmca_attention, projection=args.vis_proj, dtype=args.dtype)
          if args.src_format == "hf" else dict(vision_layout=args.vision_layout, max_shard_bytes=args.max_shard_size))
    try:
        convert(args.src, args.dst, args.src_format, args.dst_format, config=args.config, meta=args.meta,
                compat=args.compat, overwrite=args.overwrite, allow_nonfinite=args.allow_nonfinite, hf=hf)
    except (ValueError, OSError) as e:  # strict-load errors name the offending keys
        if debugging():
            raise
        print(f"{prog}: error: {e} (nothing written; {args.dst} is as it was)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
