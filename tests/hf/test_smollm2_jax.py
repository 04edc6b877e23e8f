"""SmolLM2-135M-Instruct through vchat_jax's from_hf (no torch in the loading path): text-only logits and a
greedy continuation equal transformers' LlamaForCausalLM; with an image in the prompt, JAX equals torch."""

import jax
import numpy as np
import pytest
import torch
from smollm2 import PARAGRAPH, reference_outputs

from vchat_jax.hf import from_hf as jax_from_hf
from vchat_torch.hf import from_hf as torch_from_hf

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def models(smollm2_dir, clip_dir):
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return jax_from_hf(smollm2_dir, clip_dir, mmca=True, compat="fixed"), ref


def paragraph_ids(model) -> np.ndarray:
    return np.array([[model.config.bos_token_id] + model.tokenizer.encode(PARAGRAPH)])


def test_smollm2_jax_text_logits_equal_transformers(models):
    jm, ref = models
    ids = paragraph_ids(jm)
    assert ids.shape[1] >= 48
    want, _ = reference_outputs(ref, ids)
    got = np.asarray(jm(None, ids, np.ones_like(ids), pad_multiple=1).logits)[..., : want.shape[-1]]
    diff = float(np.abs(got - want).max())
    print(f"SmolLM2 text-only logits, vchat_jax vs transformers LlamaForCausalLM: max abs diff {diff:.2e}")
    assert diff <= 1e-4


def test_smollm2_jax_greedy_equals_transformers(models):
    jm, ref = models
    _, want = reference_outputs(ref, paragraph_ids(jm))
    got = np.asarray(jm.generate(None, paragraph_ids(jm), max_new_tokens=20, eos_token_id=-1).ids[0])
    assert got.tolist() == want


def test_smollm2_torch_vs_jax_with_an_image(models, smollm2_dir, clip_dir):
    jm, _ = models
    tm = torch_from_hf(smollm2_dir, clip_dir, mmca=True, compat="fixed")
    c = tm.config
    text = tm.tokenizer.encode("### Image:\n<image>\n\n### Question:\nWhat is in the picture?\n\n### Answer:\n")
    ids = np.array([[c.bos_token_id] + tm.tokenizer.encode("A photo of the river.") + text])
    assert c.image_token_id in ids
    pixels = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        out = tm(torch.from_numpy(pixels), torch.from_numpy(ids), torch.ones(ids.shape, dtype=torch.long),
                 image_num=[1])
    want, modality = out.logits.numpy(), out.modality.numpy()
    got = np.asarray(jm(pixels, ids, np.ones_like(ids), image_num=[1]).logits)
    diff = np.abs(got - want).max(-1)  # (1, L)
    text, scale = float(diff[modality == 1].max()), float(np.abs(want).max())
    print(f"SmolLM2 + CLIP with an image: vchat_torch vs vchat_jax logits max abs diff {text:.2e} at text positions, "
          f"{float(diff.max()):.2e} at image positions too (|logits| up to {scale:.1f})")
    # The untrained projection's features (std 1) are ~7x SmolLM2's embeddings: the image positions' hidden
    # states are out of distribution and their logits large, so there the bound is relative.
    assert text <= 1e-4 and float(diff.max()) <= 1e-4 * scale
