"""VisualChat.from_hf (torch) on tiny checkpoints written by transformers' own save_pretrained: LLaMA with GQA,
tied and untied embeddings, sharded safetensors and sharded .bin, a tokenizer without a pad token; CLIPModel
and CLIPVisionModel towers; a whole Qwen-VL checkpoint and the reference helper's extracted tower."""

import numpy as np
import pytest
import torch
from hf_dirs import make_clip_dir, make_llama_dir, make_qwen_dir, qwen_state_dict

from vchat.hf_plan import plan
from vchat_torch.hf import from_hf

LLAMAS = {  # name: make_llama_dir arguments
    "gqa-untied-sharded-safetensors": dict(kv_heads=2, tie=False, shard_size="20KB"),
    "tied-sharded-bin-nopad": dict(kv_heads=4, tie=True, shard_size="20KB", safe=False, pad=False),
    "gqa-tied-single-bf16": dict(kv_heads=1, tie=True, dtype=torch.bfloat16),
}


@pytest.fixture(scope="module", params=list(LLAMAS))
def llama(request, tmp_path_factory):
    return request.param, make_llama_dir(str(tmp_path_factory.mktemp("llama") / request.param), **LLAMAS[request.param])


@pytest.fixture(scope="module")
def towers(tmp_path_factory, clip_dir):
    root = tmp_path_factory.mktemp("towers")
    return {"clip_vision": clip_dir, "clip_model": make_clip_dir(str(root / "clipm"), full=True, seed=1),
            "qwen_vl": make_qwen_dir(str(root / "qwen")), "qwen_extracted": make_qwen_dir(str(root / "qx"), True)}


def reference_tokenizer(lm_dir):
    """The reference's setup (DST.add_special_token, modeling_dsvl.py) on transformers' own tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lm_dir, local_files_only=True)
    tok.add_tokens(["### Image:", "<image>"], special_tokens=True)
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<PAD>"})
    tok.pad_token = tok.eos_token
    return tok


def test_text_logits_equal_transformers_llama(llama, clip_dir):
    from transformers import LlamaForCausalLM

    name, lm_dir = llama
    model = from_hf(lm_dir, clip_dir, dtype=torch.float32)
    ref = LlamaForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).eval()
    ids = torch.randint(3, 60, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
        got = model(None, ids, torch.ones_like(ids), pad_multiple=1).logits[..., : want.shape[-1]]
    assert float((got - want).abs().max()) <= 1e-5, name
    assert (model.lang_decoder.lm_head.weight is model.lang_decoder.model.embed_tokens.weight) == LLAMAS[name].get("tie")


def test_tokenizer_and_resized_embeddings_follow_the_reference(llama, clip_dir):
    name, lm_dir = llama
    ref_tok = reference_tokenizer(lm_dir)
    model = from_hf(lm_dir, clip_dir)
    c = model.config
    assert c.llm.vocab_size == len(ref_tok) == 64 + (2 if LLAMAS[name].get("pad", True) else 3)
    assert (c.image_pretoken_id, c.image_token_id) == tuple(ref_tok.convert_tokens_to_ids(["### Image:", "<image>"]))
    assert c.pad_token_id == c.eos_token_id == ref_tok.pad_token_id and c.bos_token_id == ref_tok.bos_token_id
    text = "the cat ### Image: <image> sat on the mat"
    assert model.tokenizer.encode(text) == ref_tok(text, add_special_tokens=False).input_ids
    from transformers import LlamaForCausalLM

    embed = model.lang_decoder.model.embed_tokens.weight
    ref = LlamaForCausalLM.from_pretrained(lm_dir).model.embed_tokens.weight  # the file's rows stay
    assert torch.equal(embed[:64], ref.to(embed.dtype))
    assert torch.equal(model.lang_embed.weight, embed) and model.lang_embed.weight is not embed
    assert model.lang_embed.weight.requires_grad and not embed.requires_grad
    again = from_hf(lm_dir, clip_dir)
    assert torch.equal(again.lang_embed.weight, model.lang_embed.weight)  # seeded: the same model every time
    assert torch.equal(again.projection[0].weight, model.projection[0].weight)


def test_new_rows_are_drawn_like_resize_token_embeddings(tmp_path, clip_dir):
    lm_dir = make_llama_dir(str(tmp_path / "lm"), pad=False, initializer_range=0.05)
    model = from_hf(lm_dir, clip_dir)
    assert model.config.llm.vocab_size == 64 + 3
    new = model.lang_decoder.model.embed_tokens.weight[64:].detach().numpy()
    head = model.lang_decoder.lm_head.weight[64:].detach().numpy()
    assert new.shape == (3, 64) and not np.array_equal(new, head)
    assert 0.03 < float(np.concatenate([new, head]).std()) < 0.07


def test_a_table_longer_than_the_tokenizer_is_cut_as_the_reference(tmp_path, clip_dir):
    from safetensors.torch import load_file

    lm_dir = make_llama_dir(str(tmp_path / "lm"), vocab=64, tokenizer_size=32)
    model = from_hf(lm_dir, clip_dir)
    assert model.config.llm.vocab_size == 32 + 2  # resize_token_embeddings(len(tokenizer)) keeps the first rows
    file = load_file(f"{lm_dir}/model.safetensors")
    assert torch.equal(model.lang_decoder.model.embed_tokens.weight, file["model.embed_tokens.weight"][:34])
    assert torch.equal(model.lang_decoder.lm_head.weight, file["lm_head.weight"][:34])


def test_towers_load_in_their_layouts(towers, llama):
    from transformers import CLIPVisionModel

    _, lm_dir = llama
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for layout, folder in towers.items():
        model = from_hf(lm_dir, folder)
        assert plan(lm_dir, folder).vision.layout == layout
        if layout.startswith("clip"):
            ref = CLIPVisionModel.from_pretrained(folder).eval()
            with torch.no_grad():
                want = ref(pixel_values=pixels).last_hidden_state
                got = model.vis_encoder(pixels)
            assert float((got - want).abs().max()) <= 1e-5, layout
        else:
            sd = qwen_state_dict()
            got = {k[len("vis_encoder."):]: v for k, v in model.state_dict().items() if k.startswith("vis_encoder.")}
            assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd), layout
            assert model.config.vision.image_size == 32 and model.config.vision.num_attention_heads == 4
        assert model.image_processor.crop_size == 32
        with torch.no_grad():
            ids = torch.tensor([[1, model.config.image_pretoken_id, model.config.image_token_id, 5, 6, 7]])
            out = model(pixels[:1], ids, torch.ones_like(ids), image_num=[1])
        assert torch.isfinite(out.logits).all()


def test_vision_model_type_override(towers, llama):
    _, lm_dir = llama
    assert plan(lm_dir, towers["qwen_extracted"], vision_type="qwen").vision.kind == "qwen"
    assert plan(lm_dir, towers["clip_model"], vision_type="clip").vision.layout == "clip_model"


def test_dtype_follows_the_checkpoint_unless_asked(llama, clip_dir):
    name, lm_dir = llama
    want = LLAMAS[name].get("dtype", torch.float32)
    model = from_hf(lm_dir, clip_dir)
    assert model.lang_decoder.model.layers[0].mlp.up_proj.weight.dtype == want
    assert model.projection[0].weight.dtype == want  # new tensors in the LM's dtype
    assert model.vis_encoder.vision_model.embeddings.class_embedding.dtype == torch.float32  # CLIP's own
    cast = from_hf(lm_dir, clip_dir, dtype=torch.float16)
    assert {p.dtype for p in cast.parameters()} == {torch.float16}
