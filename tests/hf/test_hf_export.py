"""Round trips: HF -> vchat_torch checkpoint (streamed) -> HF is bit-exact per tensor; vchat -> HF -> vchat too;
transformers' own from_pretrained reads the exported lm/ and vision/; LoRA is merged on export."""

import argparse
import os

import numpy as np
import pytest
import torch
from hf_dirs import make_clip_dir, make_llama_dir, make_qwen_dir

from vchat_torch.checkpoint import from_pretrained
from vchat_torch.hf import from_hf
from vchat_torch.hf_convert import checkpoint_dtypes, convert_hf, read_exported, to_hf


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rt")
    return {"llama": make_llama_dir(str(root / "llama"), kv_heads=2, shard_size="20KB", dtype=torch.bfloat16),
            "llama_tied": make_llama_dir(str(root / "tied"), tie=True, pad=False, safe=False, shard_size="20KB"),
            "clip_model": make_clip_dir(str(root / "clipm"), full=True),
            "clip_vision": make_clip_dir(str(root / "clipv")),
            "qwen_vl": make_qwen_dir(str(root / "qwen")),
            "qwen_extracted": make_qwen_dir(str(root / "qx"), extracted=True)}


def same_tensors(a: dict, b: dict) -> list[str]:
    return [k for k in a if k not in b or a[k].dtype != b[k].dtype or not np.array_equal(a[k], b[k])]


@pytest.mark.parametrize("lm,tower", [("llama", "clip_model"), ("llama_tied", "clip_vision"), ("llama", "qwen_vl"),
                                      ("llama_tied", "qwen_extracted")])
def test_hf_to_vchat_to_hf_is_bit_exact(dirs, tmp_path, lm, tower):
    convert_hf(dirs[lm], dirs[tower], str(tmp_path / "vchat"))
    model = from_pretrained(str(tmp_path / "vchat"))
    assert sorted(os.listdir(tmp_path / "vchat")) == ["config.json", "model.safetensors", "preprocessor_config.json",
                                                      "tokenizer.json"]
    layout = "clip_vision" if tower == "clip_model" else tower  # a CLIPModel's text tower is not kept
    tok = open(tmp_path / "vchat" / "tokenizer.json").read()
    to_hf(model, str(tmp_path / "hf"), tok, vision_layout=layout, max_shard_bytes=40_000,
          dtypes=checkpoint_dtypes(str(tmp_path / "vchat")))
    src, out = read_exported(dirs[lm]), read_exported(str(tmp_path / "hf" / "lm"))
    vocab = src["model.embed_tokens.weight"].shape[0]
    for k in ("model.embed_tokens.weight", "lm_head.weight"):  # the exported vocabulary is the resized one
        if k in out:
            assert out[k].shape[0] == model.config.llm.vocab_size
            out[k] = out[k][:vocab]
    assert not same_tensors(src, out) and set(src) == set(out)
    vsrc, vout = read_exported(dirs[tower]), read_exported(str(tmp_path / "hf" / "vision"))
    if tower.startswith("clip"):
        vsrc = {k[len("vision_model."):] if k.startswith("vision_model.") else k: v for k, v in vsrc.items()
                if not k.startswith(("text_", "logit_scale", "visual_projection"))}
    elif tower == "qwen_vl":
        vsrc = {k: v for k, v in vsrc.items() if k.startswith("transformer.visual.") and k != "transformer.visual.proj"}
    assert set(vsrc) == set(vout) and not same_tensors(vsrc, vout)
    assert {t.dtype for t in model.state_dict().values()} == {torch.bfloat16 if lm == "llama" else torch.float32,
                                                              torch.float32}  # from_pretrained keeps each file dtype
    back = from_hf(str(tmp_path / "hf"))  # vchat -> HF -> vchat, in the files' dtypes
    a, b = model.state_dict(), back.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert back.config == model.config


def test_transformers_reads_the_export(dirs, tmp_path):
    from transformers import AutoTokenizer, CLIPVisionModel, LlamaForCausalLM

    model = from_hf(dirs["llama"], dirs["clip_vision"], dtype=torch.float32)
    to_hf(model, str(tmp_path / "hf"), model.tokenizer.backend.to_str())
    lm = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf" / "lm"), dtype=torch.float32).eval()
    ids = torch.randint(3, 60, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(None, ids, torch.ones_like(ids), pad_multiple=1).logits
        got = lm(ids).logits
    assert got.shape == want.shape and float((got - want).abs().max()) <= 1e-5
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf" / "lm"))
    assert len(tok) == model.config.llm.vocab_size and tok.pad_token_id == model.config.eos_token_id
    assert tok.convert_tokens_to_ids("<image>") == model.config.image_token_id
    tower = CLIPVisionModel.from_pretrained(str(tmp_path / "hf" / "vision")).eval()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        diff = tower(pixel_values=pixels).last_hidden_state - model.vis_encoder(pixels)  # sdpa vs eager attention
    assert float(diff.abs().max()) <= 1e-5


def test_lora_is_merged_on_export(dirs, tmp_path):
    from vchat_torch.lora import add_lora, merged_state_dict

    model = from_hf(dirs["llama"], dirs["clip_vision"], dtype=torch.float32)
    args = argparse.Namespace(lang_lora_dim=4, lang_lora_module_name="model.layers.", vis_lora_dim=0,
                              vis_lora_module_name="encoder.layers.", only_optimize_lora=False, lora_alpha=None,
                              lora_dropout=0.0, trainable=["lang_embed", "projection"])
    add_lora(model, args)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    merged, _ = merged_state_dict(model, model.state_dict())
    to_hf(model, str(tmp_path / "hf"), model.tokenizer.backend.to_str())
    out = read_exported(str(tmp_path / "hf" / "lm"))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert np.array_equal(out[key], merged["lang_decoder." + key].numpy())
    assert not any("lora" in k for k in out)
    assert not np.array_equal(out[key], read_exported(dirs["llama"])[key].astype(np.float32))
