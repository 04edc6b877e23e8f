"""SmolLM2-135M-Instruct, a real pretrained LLaMA, through VisualChat.from_hf (torch) with a tiny random CLIP
tower: text-only input under MMCA (compat "fixed") is exactly the plain causal LM."""

import pytest
import torch
from smollm2 import PARAGRAPH, reference_outputs

from vchat_torch.hf import from_hf


@pytest.fixture(scope="module")
def models(smollm2_dir, clip_dir):
    from transformers import LlamaForCausalLM

    vc = from_hf(smollm2_dir, clip_dir, mmca=True, compat="fixed")
    ref = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return vc, ref


def paragraph_ids(model) -> torch.Tensor:
    ids = [model.config.bos_token_id] + model.tokenizer.encode(PARAGRAPH)
    assert len(ids) >= 48
    return torch.tensor([ids])


def test_smollm2_geometry(models):
    vc, _ = models
    c = vc.config.llm
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert c.tie_word_embeddings and c.rope_theta == 1e5
    assert c.vocab_size == 49152 + 2  # "### Image:" and "<image>"; the tokenizer has a pad token, no "<PAD>"
    assert vc.lang_decoder.lm_head.weight is vc.lang_decoder.model.embed_tokens.weight


def test_smollm2_text_logits_equal_transformers(models):
    vc, ref = models
    ids = paragraph_ids(vc)
    want, _ = reference_outputs(ref, ids.numpy())
    with torch.no_grad():
        got = vc(None, ids, torch.ones_like(ids), pad_multiple=1).logits[:, :, : want.shape[-1]].numpy()
    diff = float(abs(got - want).max())
    print(f"SmolLM2 text-only logits, vchat_torch vs transformers LlamaForCausalLM: max abs diff {diff:.2e}")
    assert diff <= 1e-4


def test_smollm2_greedy_equals_transformers(models):
    vc, ref = models
    ids = paragraph_ids(vc)
    _, want = reference_outputs(ref, ids.numpy())
    got = vc.generate(None, ids, max_new_tokens=20, eos_token_id=-1).ids[0]
    assert got.tolist() == want
    assert any(c.isalpha() for c in vc.tokenizer.decode(got.tolist()))


def test_vchat_chat_on_converted_smollm2_answers_in_english(smollm2_dir, clip_dir, tmp_path, monkeypatch, capsys):
    import io
    import re

    from vchat.cli import main as vchat_main
    from vchat_torch.hf_convert import convert_hf

    convert_hf(smollm2_dir, clip_dir, str(tmp_path / "ckpt"), mmca=True, compat="fixed")
    lines = ["na", "What is the capital of France?", "quit"]
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    assert vchat_main(["chat", str(tmp_path / "ckpt"), "--max_new_tokens", "24"]) == 0
    out = capsys.readouterr().out
    answer = out.split("=========== Round 1 ===========")[1]
    print(f"SmolLM2 through `vchat chat`: {answer.strip()!r}")
    words = re.findall(r"[A-Za-z]+", answer)
    assert len(words) >= 3 and "Paris" in answer
