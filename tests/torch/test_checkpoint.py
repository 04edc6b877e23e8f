"""Strict loading of reference checkpoints, and vchat's own format."""

import os

import pytest
import torch

from vchat.golden import load_case
from vchat_torch import VisualChat
from vchat_torch.checkpoint import CheckpointError, from_dsvc, from_pretrained, load_state_dict_strict


@pytest.fixture(scope="module")
def golden(golden_dir):
    case_dir = os.path.join(golden_dir, "baseline-mmca-gqa")
    config, case = load_case(case_dir)
    sd = torch.load(os.path.join(case_dir, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    return config, case, sd


def test_missing_key_is_named(golden):
    config, _, sd = golden
    sd = dict(sd)
    del sd["lang_decoder.model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys: lang_decoder\.model\.layers\.1\.mlp\.up_proj\.weight"):
        load_state_dict_strict(VisualChat(config), sd, source="ckpt")


def test_unexpected_key_is_named(golden):
    config, _, sd = golden
    sd = dict(sd, **{"projection.2.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected keys: projection\.2\.weight"):
        load_state_dict_strict(VisualChat(config), sd, source="ckpt")


def test_wrong_shape_is_named(golden):
    config, _, sd = golden
    sd = dict(sd)
    sd["lang_embed.weight"] = torch.zeros(97, 128)
    with pytest.raises(CheckpointError, match=r"wrong shapes: lang_embed\.weight \(file \(97, 128\), model \(96, 128\)\)"):
        load_state_dict_strict(VisualChat(config), sd, source="ckpt")


def test_config_mismatch_is_caught(golden, golden_dir):
    config, _, _ = golden
    wrong = config.replace(llm=config.llm.__class__(**{**config.llm.__dict__, "num_key_value_heads": 4}))
    with pytest.raises(CheckpointError, match="k_proj.weight"):
        from_dsvc(os.path.join(golden_dir, "baseline-mmca-gqa"), wrong)


def forward(model, case):
    t = torch.from_numpy
    with torch.no_grad():
        return model(t(case["images"]), t(case["input_ids"]), t(case["attention_mask"]), labels=t(case["labels"]),
                     image_num=t(case["image_num"]))


def test_save_and_load_round_trip(golden, golden_dir, tmp_path):
    config, case, _ = golden
    model = from_dsvc(os.path.join(golden_dir, "baseline-mmca-gqa"), config)
    before = forward(model, case)
    model.save_pretrained(str(tmp_path / "full"))
    assert sorted(os.listdir(tmp_path / "full")) == ["config.json", "model.safetensors"]
    again = VisualChat.from_pretrained(str(tmp_path / "full"))
    assert again.config == config
    after = forward(again, case)
    assert torch.equal(before.logits, after.logits) and torch.equal(before.loss, after.loss)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp dirs left


def test_trainable_only_checkpoint_needs_a_base(golden, golden_dir, tmp_path):
    config, case, _ = golden
    model = from_dsvc(os.path.join(golden_dir, "baseline-mmca-gqa"), config)
    with torch.no_grad():
        model.lang_embed.weight.mul_(1.5)
    model.save_pretrained(str(tmp_path / "small"), trainable_only=True)
    with pytest.raises(CheckpointError, match="only the trainable tensors"):
        from_pretrained(str(tmp_path / "small"))
    again = from_pretrained(str(tmp_path / "small"), base=os.path.join(golden_dir, "baseline-mmca-gqa"))
    assert torch.equal(forward(model, case).logits, forward(again, case).logits)


def test_failed_save_leaves_the_old_checkpoint(golden, golden_dir, tmp_path, monkeypatch):
    config, _, _ = golden
    model = from_dsvc(os.path.join(golden_dir, "baseline-mmca-gqa"), config)
    model.save_pretrained(str(tmp_path / "ck"))
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()
    import vchat_torch.checkpoint as ckpt

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with torch.no_grad():
        model.lang_embed.weight.zero_()
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(str(tmp_path / "ck"))
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_loaders_keep_the_file_dtype_and_never_initialise(golden, golden_dir, tmp_path, monkeypatch):
    """A bf16 checkpoint loads as bf16, bit-equal, tied weights tied; no loader runs an initialiser (the
    model is built on the meta device and each tensor assigned from the file)."""
    from vchat.config import preset

    config = preset("tiny").replace(llm=preset("tiny").llm.__class__(
        **{**preset("tiny").llm.__dict__, "tie_word_embeddings": True}))
    model = VisualChat(config).to(torch.bfloat16)
    model.save_pretrained(str(tmp_path / "bf16"))
    want = {k: v.clone() for k, v in model.state_dict().items()}

    def never_on_real_tensors():
        def init(t, *a, **k):
            if not t.is_meta:
                raise AssertionError("a loader initialised weights it was about to overwrite")
            return t
        return init

    for name in ("normal_", "uniform_", "fill_", "zero_"):  # what every initialiser comes down to
        monkeypatch.setattr(torch.Tensor, name, never_on_real_tensors())
    back = from_pretrained(str(tmp_path / "bf16"))
    got = back.state_dict()
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    assert back.lang_decoder.lm_head.weight is back.lang_decoder.model.embed_tokens.weight
    assert not any(t.is_meta for t in list(back.parameters()) + list(back.buffers()))
    from_dsvc(os.path.join(golden_dir, "baseline-mmca-gqa"), golden[0])  # the reference's files too
    monkeypatch.undo()
    with pytest.raises(AssertionError, match="initialised"):  # the check itself catches a real build
        monkeypatch.setattr(torch.Tensor, "normal_", never_on_real_tensors())
        VisualChat(config)
