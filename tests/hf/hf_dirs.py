"""Tiny Hugging Face checkpoint directories, written by transformers' own save_pretrained (LLaMA, CLIP,
tokenizers) or, for Qwen-VL (which transformers does not ship), by huggingface_hub's sharded writer."""

from __future__ import annotations

import json
import os

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

WORDS = ("the a cat dog sat on mat is red blue green what colour of image picture two three one and "
         "in there are shapes left right small big question answer yes no").split()


def make_tokenizer(path: str, pad: bool = True, size: int = 64) -> int:
    """A word-level tokenizer of `size` ids (<unk> <s> </s> [<pad>], words, then filler), saved with
    PreTrainedTokenizerFast.save_pretrained; returns its size."""
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"] + (["<pad>"] if pad else [])
    vocab = specials + list(WORDS) + [f"w{i}" for i in range(size)]
    vocab = {w: i for i, w in enumerate(vocab[:size])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   **({"pad_token": "<pad>"} if pad else {}))
    fast.save_pretrained(path)
    return len(vocab)


def make_llama_dir(path: str, tie: bool = False, kv_heads: int = 2, shard_size: str | None = None,
                   safe: bool = True, pad: bool = True, dtype=torch.float32, seed: int = 0, vocab: int = 64,
                   tokenizer_size: int | None = None, **cfg) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, tie_word_embeddings=tie,
                         rope_theta=5000.0, rms_norm_eps=1e-5, max_position_embeddings=256, bos_token_id=1,
                         eos_token_id=2, **cfg)
    model = LlamaForCausalLM(config).to(dtype)
    if safe:
        model.save_pretrained(path, **({"max_shard_size": shard_size} if shard_size else {}))
    else:  # transformers 5 writes safetensors only; huggingface_hub still writes .bin shards and their index
        from huggingface_hub import save_torch_state_dict

        model.config.save_pretrained(path)
        sd = {k: v for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}
        save_torch_state_dict(sd, path, safe_serialization=False, max_shard_size=shard_size or "5GB")
    make_tokenizer(path, pad=pad, size=tokenizer_size or vocab)
    return path


CLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                   patch_size=8)


def make_clip_dir(path: str, full: bool = False, seed: int = 0, preprocessor: bool = True) -> str:
    """A CLIPModel (full=True) or CLIPVisionModel checkpoint with a 32 px CLIPImageProcessor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    if full:
        cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=4, vocab_size=99, bos_token_id=0, eos_token_id=1,
                                          pad_token_id=1),
                         vision_config=CLIP_VISION, projection_dim=16)
        model = CLIPModel(cfg)
    else:
        model = CLIPVisionModel(CLIPVisionConfig(**CLIP_VISION))
    with torch.no_grad():  # CLIP initialises norms to ones/zeros: make every tensor distinct
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(path)
    if preprocessor:
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


QWEN_VISUAL = dict(image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp=64, output_dim=128, n_queries=4)


def qwen_state_dict(seed: int = 0) -> dict:
    """Qwen-VL's vision tower (vchat's own implementation of it), random, under its own names."""
    from vchat.config import VisionConfig
    from vchat_torch.vision import QwenVisionTransformer

    q = QWEN_VISUAL
    torch.manual_seed(seed)
    tower = QwenVisionTransformer(VisionConfig(kind="qwen", image_size=q["image_size"], patch_size=q["patch_size"],
                                               hidden_size=q["width"], intermediate_size=q["mlp"],
                                               num_hidden_layers=q["layers"], num_attention_heads=q["heads"],
                                               layer_norm_eps=1e-6, hidden_act="gelu", output_dim=q["output_dim"],
                                               n_queries=q["n_queries"], pos_embed_rows=16))
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return {k: v.detach().clone().contiguous() for k, v in tower.state_dict().items()}


def make_qwen_dir(path: str, extracted: bool = False, shard_size: str = "20KB", seed: int = 0) -> str:
    """A whole Qwen-VL-style checkpoint (transformer.visual.* among the LM's tensors, sharded safetensors
    with an index, config.json with `visual`), or the reference helper's extracted pytorch_model.bin."""
    from huggingface_hub import save_torch_state_dict

    sd = qwen_state_dict(seed)
    os.makedirs(path, exist_ok=True)
    if extracted:  # the helper's pytorch_model.bin, with its CLIP-style config.json and 32 px preprocessing
        from transformers import CLIPImageProcessor

        torch.save(sd, os.path.join(path, "pytorch_model.bin"))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"model_type": "clip_vision_model", "hidden_size": 32, "num_attention_heads": 4,
                       "image_size": 224}, f)
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
        return path
    q = QWEN_VISUAL
    full = {f"transformer.visual.{k}": v for k, v in sd.items()}
    g = torch.Generator().manual_seed(seed)
    full["transformer.visual.proj"] = torch.randn(q["output_dim"], q["output_dim"], generator=g)
    full["transformer.wte.weight"] = torch.randn(50, 16, generator=g)
    full["transformer.h.0.attn.c_attn.weight"] = torch.randn(48, 16, generator=g)
    full["lm_head.weight"] = torch.randn(50, 16, generator=g)
    save_torch_state_dict(full, path, max_shard_size=shard_size)
    visual = {k: q[k] for k in ("image_size", "patch_size", "width", "layers", "heads", "output_dim")}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "qwen", "architectures": ["QWenLMHeadModel"], "hidden_size": 16,
                   "visual": {**visual, "mlp_ratio": q["mlp"] / q["width"]}}, f)
    return path
