"""Benchmark (not a test): convert a LLaMA-2-7B-shaped Hugging Face checkpoint to vchat_torch and vchat_jax,
reporting each conversion's peak RSS and throughput (targets: <= 3 GB, >= 200 MB/s).

    python -m convert.bench_hf --root /tmp/bench7b            # makes the checkpoint once, then converts it
    python -m convert.bench_hf --root /tmp/bench7b --targets torch --keep
    python -m convert.bench_hf --root /tmp/bench-small --layers 1     # a quick check of the script

The checkpoint has Llama-2-7b-hf's geometry and file layout (config.json, two bf16 safetensors shards with
their index, a 32000-token tokenizer.json) with random weights (13.5 GB), written shard by shard, and a
CLIP ViT-L/14-shaped vision directory (float32, 1.2 GB). Disk: about 15 GB for the source and as much
per converted copy (deleted after measuring unless --keep). Each conversion runs as `vchat convert` in
a child process of its own; peak RSS is that child's ru_maxrss.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from vchat.hf_export import vision_config_json
from vchat.hf_io import ShardedWriter, TensorInfo

LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,
             "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "hidden_act": "silu", "max_position_embeddings": 4096,
             "rms_norm_eps": 1e-5, "rope_scaling": None, "tie_word_embeddings": False, "bos_token_id": 1,
             "eos_token_id": 2, "torch_dtype": "float16", "initializer_range": 0.02}


def llama_infos(c: dict) -> list[TensorInfo]:
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    out = [TensorInfo("model.embed_tokens.weight", "BF16", (v, h))]
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [TensorInfo(p + f"self_attn.{x}_proj.weight", "BF16", (h, h)) for x in "qkvo"]
        out += [TensorInfo(p + "mlp.gate_proj.weight", "BF16", (i, h)), TensorInfo(p + "mlp.up_proj.weight", "BF16", (i, h)),
                TensorInfo(p + "mlp.down_proj.weight", "BF16", (h, i)),
                TensorInfo(p + "input_layernorm.weight", "BF16", (h,)),
                TensorInfo(p + "post_attention_layernorm.weight", "BF16", (h,))]
    return out + [TensorInfo("model.norm.weight", "BF16", (h,)), TensorInfo("lm_head.weight", "BF16", (v, h))]


def clip_l14_infos() -> list[TensorInfo]:
    w, mlp, layers, patches = 1024, 4096, 24, 257
    out = [TensorInfo("vision_model.embeddings.class_embedding", "F32", (w,)),
           TensorInfo("vision_model.embeddings.patch_embedding.weight", "F32", (w, 3, 14, 14)),
           TensorInfo("vision_model.embeddings.position_embedding.weight", "F32", (patches, w)),
           TensorInfo("vision_model.pre_layrnorm.weight", "F32", (w,)), TensorInfo("vision_model.pre_layrnorm.bias", "F32", (w,))]
    for n in range(layers):
        p = f"vision_model.encoder.layers.{n}."
        for x in ("k_proj", "v_proj", "q_proj", "out_proj"):
            out += [TensorInfo(p + f"self_attn.{x}.weight", "F32", (w, w)), TensorInfo(p + f"self_attn.{x}.bias", "F32", (w,))]
        out += [TensorInfo(p + "mlp.fc1.weight", "F32", (mlp, w)), TensorInfo(p + "mlp.fc1.bias", "F32", (mlp,)),
                TensorInfo(p + "mlp.fc2.weight", "F32", (w, mlp)), TensorInfo(p + "mlp.fc2.bias", "F32", (w,))]
        for ln in ("layer_norm1", "layer_norm2"):
            out += [TensorInfo(p + f"{ln}.weight", "F32", (w,)), TensorInfo(p + f"{ln}.bias", "F32", (w,))]
    return out + [TensorInfo("vision_model.post_layernorm.weight", "F32", (w,)),
                  TensorInfo("vision_model.post_layernorm.bias", "F32", (w,))]


def write_random(folder: str, infos: list[TensorInfo], max_shard_bytes: int, seed: int) -> None:
    """Random tensors (N(0, 0.02); norms ones), shard after shard, one tensor in memory at a time."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    w = ShardedWriter(folder, infos, max_shard_bytes=max_shard_bytes)
    for info in infos:
        x = np.ones(info.shape, np.float32) if len(info.shape) == 1 else (
            rng.standard_normal(info.shape, dtype=np.float32) * 0.02)
        w.write(info.name, x.astype(ml_dtypes.bfloat16 if info.dtype == "BF16" else np.float32))
    w.close()


def make_checkpoint(root: str, layers: int = 32) -> tuple[str, str]:
    """`root`/llama (LLaMA-2-7B-shaped; `layers` decoder layers) and `root`/clip (CLIP ViT-L/14-shaped),
    made once."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    lm, clip = os.path.join(root, "llama"), os.path.join(root, "clip")
    if not os.path.exists(os.path.join(lm, "done")):
        os.makedirs(lm, exist_ok=True)
        config = {**LLAMA2_7B, "num_hidden_layers": layers}
        with open(os.path.join(lm, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 32000)}}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.save(os.path.join(lm, "tokenizer.json"))
        with open(os.path.join(lm, "tokenizer_config.json"), "w") as f:
            json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f)
        write_random(lm, llama_infos(config), max_shard_bytes=10 << 30, seed=0)  # Llama-2-7b-hf: 2 shards
        open(os.path.join(lm, "done"), "w").close()
    if not os.path.exists(os.path.join(clip, "done")):
        from vchat.config import CLIP_L14_224, ModelConfig

        os.makedirs(clip, exist_ok=True)
        cfg = vision_config_json(ModelConfig(vision=CLIP_L14_224), "clip_vision")
        with open(os.path.join(clip, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        write_random(clip, clip_l14_infos(), max_shard_bytes=5 << 30, seed=1)
        open(os.path.join(clip, "done"), "w").close()
    return lm, clip


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


_CHILD = ("import resource, sys\nfrom convert.cli import main\nrc = main(sys.argv[1:])\n"
          "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(rc)")


def run_conversion(lm: str, clip: str, dst: str, target: str) -> dict:
    """`vchat convert --from hf --to target` in a child process of its own: wall time and its peak RSS."""
    shutil.rmtree(dst, ignore_errors=True)
    args = ["--from", "hf", "--to", target, lm, dst, "--vision", clip, "--enable_mmca_attention"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"vchat convert {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    peak_kib = int(proc.stdout.split("PEAK_RSS_KIB")[1].split()[0])
    src = folder_bytes(lm) + folder_bytes(clip)
    return {"target": target, "seconds": round(wall, 1), "source_GB": round(src / 1e9, 2),
            "MB_per_s": round(src / 1e6 / wall, 1), "peak_rss_GB": round(peak_kib * 1024 / 1e9, 2),
            "written_GB": round(folder_bytes(dst) / 1e9, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True, help="folder for the checkpoint and the converted copies")
    ap.add_argument("--targets", nargs="+", choices=("torch", "jax"), default=["torch", "jax"])
    ap.add_argument("--keep", action="store_true", help="keep the converted copies")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (fewer: a quick check of the script)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    lm, clip = make_checkpoint(args.root, args.layers)
    print(f"[bench] source: {lm} ({folder_bytes(lm) / 1e9:.1f} GB), {clip} ({folder_bytes(clip) / 1e9:.1f} GB); "
          f"ready in {time.perf_counter() - t0:.0f}s", flush=True)
    for target in args.targets:
        dst = os.path.join(args.root, f"out-{target}")
        r = run_conversion(lm, clip, dst, target)
        print(f"[bench] --to {target}: {r['seconds']}s, {r['MB_per_s']} MB/s (target >= 200), peak RSS "
              f"{r['peak_rss_GB']} GB (target <= 3)", flush=True)
        print(json.dumps(r))
        if not args.keep:
            shutil.rmtree(dst, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
