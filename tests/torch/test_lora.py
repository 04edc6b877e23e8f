"""LoRA through PEFT: which layers the reference's filters pick, the merged export, a LoRA training
run (what moves, what the checkpoint holds), ZeRO-3 export and resume.

The reference's LoRA is `W x + (x R L) / r` with L zeros at the start (inventory L3); its exports
hold the fused weight under the plain layer name (L5). The expectations below are computed here from
those definitions, not by the code under test.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vchat.config import preset
from vchat_torch import VisualChat
from vchat_torch.checkpoint import load_state_dict_strict, save_pretrained
from vchat_torch.distributed import export_state_dict
from vchat_torch.lora import lora_layers, merge_lora
from vchat_torch.train import build_model
from torch_helpers import args_for, tiny_qwen_json

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
IMG, PRE = 95, 94
DECODER_LAYERS = {f"model.layers.{i}.{m}" for i in range(2) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
CLIP_LAYERS = {f"vision_model.encoder.layers.{i}.{m}" for i in range(2) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")}


def batch(seed=0):
    """Two samples, text before the first image, two images in the first and one in the second."""
    rng = np.random.default_rng(seed)
    text = lambda n: rng.integers(3, 90, n).tolist()
    a = [1] + text(5) + [PRE, IMG] + text(3) + [PRE, IMG] + text(6)
    b = [1] + text(2) + [PRE, IMG] + text(9)
    T = max(len(a), len(b))
    ids = torch.full((2, T), 2)
    mask = torch.zeros((2, T), dtype=torch.long)
    for i, row in enumerate((a, b)):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    images = torch.from_numpy(rng.standard_normal((3, 3, 32, 32)).astype(np.float32))
    return dict(images=images, input_ids=ids, attention_mask=mask, image_num=[2, 1])


def logits(model, b):
    with torch.no_grad():
        return model(**b).logits


def randomize_adapters(model, seed=0):
    """Training would move B away from zero; do it here so the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# -- which layers, which tensors train -------------------------------------------------------------
def test_default_filters_pick_the_reference_layers():
    model = build_model(args_for("--lang_lora_dim", "4", "--vis_lora_dim", "4"))
    assert set(lora_layers(model.lang_decoder)) == DECODER_LAYERS
    assert set(lora_layers(model.vis_encoder)) == CLIP_LAYERS
    for layer in lora_layers(model).values():
        assert layer.scaling["default"] == pytest.approx(1 / 4)  # the reference's lora_scaling / r
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert torch.all(b == 0) and a.abs().max() <= 0.5 and a.abs().max() > 0.3  # U(-1/sqrt(r), 1/sqrt(r))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if "lora_" in n}
    assert trainable - lora == {"lang_embed.weight", "projection.0.weight", "projection.0.bias",
                                "projection.1.weight", "projection.1.bias"}
    # r * (in + out) per adapted layer: decoder 4x(128+128) x4 + 4x(128+192) x3, CLIP 4x(48+48) x4 + 4x(48+96) x2
    assert sum(p.numel() for n, p in model.named_parameters() if n in lora) == 2 * (4096 + 3840) + 2 * (1536 + 1152)


def test_only_optimize_lora_freezes_the_rest_of_the_part():
    flags = ("--lang_lora_dim", "4", "--trainable", "lang_embed,projection,lang_decoder")
    model = build_model(args_for(*flags))
    dec = {n for n, p in model.lang_decoder.named_parameters() if p.requires_grad}
    assert {"lm_head.weight", "model.norm.weight", "model.embed_tokens.weight"} <= dec  # --trainable lang_decoder
    assert not any(n.endswith("base_layer.weight") for n in dec)  # wrapped weights stay frozen, as the reference
    model = build_model(args_for(*flags, "--only_optimize_lora"))
    dec = {n for n, p in model.lang_decoder.named_parameters() if p.requires_grad}
    assert dec and all("lora_" in n for n in dec)
    assert model.lang_embed.weight.requires_grad and model.projection[0].weight.requires_grad  # as the reference
    with pytest.raises(SystemExit, match="--only_optimize_lora needs --lang_lora_dim or --vis_lora_dim"):
        build_model(args_for("--only_optimize_lora"))


def test_a_filter_that_matches_nothing_is_an_error(tmp_path):
    qwen = tiny_qwen_json(tmp_path)
    with pytest.raises(SystemExit) as e:  # the CLIP default on Qwen's tower (silently a no-op in the reference)
        build_model(args_for("--vis_lora_dim", "4", model=qwen))
    assert str(e.value).startswith("--vis_lora_module_name 'encoder.layers.' matches no nn.Linear in vis_encoder")
    assert "transformer.resblocks.0.attn.in_proj" in str(e.value)
    with pytest.raises(SystemExit, match="--lang_lora_module_name 'decoder.block.' matches no nn.Linear in "
                                         "lang_decoder"):
        build_model(args_for("--lang_lora_dim", "4", "--lang_lora_module_name", "decoder.block."))
    # Qwen's own names work; the resampler's nn.MultiheadAttention projections are never wrapped
    model = build_model(args_for("--vis_lora_dim", "4", "--vis_lora_module_name", "attn", model=qwen))
    assert set(lora_layers(model.vis_encoder)) == {"attn_pool.kv_proj"} | {
        f"transformer.resblocks.{i}.attn.{m}" for i in range(2) for m in ("in_proj", "out_proj")}  # no attn_pool.attn.*


# -- the merged export -----------------------------------------------------------------------------
def test_merged_export_equals_the_live_lora_model():
    model = build_model(args_for("--lang_lora_dim", "4", "--vis_lora_dim", "4")).eval()
    randomize_adapters(model)
    b = batch()
    live = logits(model, b)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    sd = export_state_dict(model, zero3=False, rank=0)
    plain = VisualChat(model.config).eval()
    load_state_dict_strict(plain, sd, source="export")  # every key of a plain model, nothing else
    torch.testing.assert_close(logits(plain, b), live, atol=1e-5, rtol=0)

    # the export left the training model alone
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, b), live)
    # the adapters matter: the base weights alone give other logits
    base = {k.replace(".base_layer.", "."): v for k, v in before.items() if "lora_" not in k}
    load_state_dict_strict(plain, base, source="base")
    assert (logits(plain, b) - live).abs().max() > 1e-2
    # PEFT's own in-place merge agrees
    assert merge_lora(model) == len(DECODER_LAYERS) + len(CLIP_LAYERS)
    torch.testing.assert_close(logits(model, b), live, atol=1e-5, rtol=0)


def test_trainable_only_export_holds_the_merged_layers(tmp_path):
    model = build_model(args_for("--lang_lora_dim", "4")).eval()  # seeds 1234 before building
    randomize_adapters(model)
    sd = export_state_dict(model, zero3=False, rank=0, trainable_only=True)
    assert set(sd) == {f"lang_decoder.{n}.weight" for n in DECODER_LAYERS} | {
        "lang_embed.weight", "projection.0.weight", "projection.0.bias", "projection.1.weight", "projection.1.bias"}
    save_pretrained(model, str(tmp_path / "partial"), trainable_only=True, state_dict=sd)
    torch.manual_seed(1234)  # the untrained model the run started from
    VisualChat(model.config).save_pretrained(str(tmp_path / "base"))
    loaded = VisualChat.from_pretrained(str(tmp_path / "partial"), base=str(tmp_path / "base"))
    b = batch(seed=1)
    torch.testing.assert_close(logits(loaded, b), logits(model, b), atol=1e-5, rtol=0)


# -- training runs ---------------------------------------------------------------------------------
def env():
    e = dict(os.environ, DS_ACCELERATOR="cpu", PATH=f"{BIN}:{os.environ['PATH']}", OMP_NUM_THREADS="1")
    e.pop("RANK", None)
    return e


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def train(out, *extra):
    common = ["--lm_model_name_or_path", "tiny", "--dataset_names", "synthetic", "--synthetic_samples", "24",
              "--precision", "fp32", "--per_device_train_batch_size", "4", "--num_train_epochs", "1",
              "--enable_mmca_attention", "--quiet", "--learning_rate", "1e-2", "--lang_lora_dim", "4",
              "--vis_lora_dim", "4"]
    r = subprocess.run([sys.executable, "-m", "vchat.cli", "train", *common, "--output_dir", str(out), *extra],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    train(tmp / "z0")
    train(tmp / "z3", "--zero_stage", "3")
    train(tmp / "z3cut", "--zero_stage", "3", "--stop_after_steps", "2")
    resumed = train(tmp / "z3cut", "--zero_stage", "3")
    return tmp, resumed


@pytest.mark.slow  # multi-process DeepSpeed end to end: `make test-slow`
def test_lora_run_moves_only_trainable_tensors_and_exports_merged(runs):
    tmp, _ = runs
    ds = torch.load(tmp / "z0" / "ds" / "step5" / "mp_rank_00_model_states.pt", map_location="cpu",
                    weights_only=False)["module"]  # the live (unmerged) model after training
    torch.manual_seed(1234)  # the trainer's seed: its initial weights
    start = VisualChat(preset("tiny").replace(mmca=True)).state_dict()
    trained = {"lang_embed.weight", "projection.0.weight", "projection.0.bias", "projection.1.weight",
               "projection.1.bias"}
    for key, value in ds.items():
        if "lora_B" in key:
            assert value.abs().max() > 0, key  # started at zero, trained
        elif "lora_A" not in key:
            ref = start[key.replace(".base_layer.", ".")]
            assert torch.equal(value, ref) != (key in trained), key  # frozen ones exactly as they started

    final = weights(tmp / "z0" / "final")
    assert set(final) == set(start)  # the reference's names: no base_layer, no lora_ keys
    for layer in sorted(DECODER_LAYERS) + sorted(CLIP_LAYERS):
        part = "lang_decoder" if layer.startswith("model.") else "vis_encoder"
        p = f"{part}.{layer}"
        b_, a_ = ds[f"{p}.lora_B.default.weight"], ds[f"{p}.lora_A.default.weight"]
        expect = ds[f"{p}.base_layer.weight"] + (b_ @ a_) / 4  # scaling 1 / r
        torch.testing.assert_close(final[f"{p}.weight"], expect, atol=1e-6, rtol=0)
        assert not torch.equal(final[f"{p}.weight"], start[f"{p}.weight"])
    assert torch.equal(final["lang_decoder.lm_head.weight"], start["lang_decoder.lm_head.weight"])

    loaded = VisualChat.from_pretrained(str(tmp / "z0" / "final"))  # strict: every key used, every one filled
    live = build_model(args_for("--lang_lora_dim", "4", "--vis_lora_dim", "4")).eval()
    live.load_state_dict(ds)
    b = batch(seed=3)
    torch.testing.assert_close(logits(loaded, b), logits(live, b), atol=1e-5, rtol=0)


@pytest.mark.slow  # multi-process DeepSpeed end to end: `make test-slow`
def test_zero3_export_and_resume(runs):
    tmp, resumed = runs
    z0, z3 = weights(tmp / "z0" / "final"), weights(tmp / "z3" / "final")
    assert set(z0) == set(z3)
    folded = [f"lang_decoder.{n}.weight" for n in DECODER_LAYERS] + [f"vis_encoder.{n}.weight" for n in CLIP_LAYERS]
    assert max((z0[k] - z3[k]).abs().max().item() for k in folded) <= 1e-6
    assert max((z0[k] - z3[k]).abs().max().item() for k in z0) <= 1e-4  # Adam on near-zero embedding rows
    assert "resumed from" in resumed.stdout and "step 2" in resumed.stdout
    cut = weights(tmp / "z3cut" / "final")
    assert all(torch.equal(cut[k], z3[k]) for k in z3)
    losses = lambda d: [r["loss"] for r in map(json.loads, open(d / "train_log.jsonl")) if "loss" in r]
    assert losses(tmp / "z3cut") == losses(tmp / "z3")
