"""`vchat convert` (convert/cli.py): reference -> JAX -> torch -> JAX is bit-exact, the converted torch
checkpoint reproduces the golden logits, and a failed conversion leaves no DST behind."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from convert.cli import main
from vchat.torch_pickle import read_torch_bin
from vchat_jax.state_dict import to_state_dict
from vchat.golden import load_case
from vchat_jax.checkpoint import from_pretrained as jax_from_pretrained
from vchat_torch.checkpoint import from_dsvc
from vchat_torch.checkpoint import from_pretrained as torch_from_pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CASE = "qwen-mmca"  # the most keys: Qwen ViT, resampler with kv_proj, baseline projection


def assert_same(a: dict, b: dict, what: str):
    assert sorted(a) == sorted(b), what
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and np.array_equal(a[k], b[k]), f"{what}: {k}"


def test_reference_to_jax_to_torch_to_jax_is_bit_exact(golden_dir, tmp_path, capsys):
    case = os.path.join(golden_dir, CASE)
    ref = read_torch_bin(os.path.join(case, "pytorch_model.bin"))
    jax1, tdir, jax2 = tmp_path / "jax1", tmp_path / "torch", tmp_path / "jax2"

    assert main(["--from", "dsvc", "--to", "jax", case, str(jax1)]) == 0  # meta.json found beside the .bin
    out = capsys.readouterr().out
    assert "reading" in out and "meta.json" in out and f"loaded {len(ref)} tensors" in out and str(jax1) in out
    assert main(["--from", "jax", "--to", "torch", str(jax1), str(tdir)]) == 0
    assert main(["--from", "torch", "--to", "jax", str(tdir), str(jax2)]) == 0

    assert_same(ref, to_state_dict(jax_from_pretrained(str(jax1))), "reference -> jax")
    assert_same(ref, load_file(str(tdir / "model.safetensors")), "jax -> torch")
    assert_same(ref, to_state_dict(jax_from_pretrained(str(jax2))), "torch -> jax")
    assert sorted(os.listdir(tmp_path)) == ["jax1", "jax2", "torch"]  # no temporary directories left


def test_converted_torch_checkpoint_reproduces_the_golden(golden_dir, tmp_path):
    case_dir = os.path.join(golden_dir, CASE)
    dst = tmp_path / "torch"
    assert main(["--from", "dsvc", "--to", "torch", os.path.join(case_dir, "pytorch_model.bin"), str(dst),
                 "--meta", os.path.join(case_dir, "meta.json")]) == 0
    model = torch_from_pretrained(str(dst))
    assert model.config.compat == "dsvc"
    _, case = load_case(case_dir)
    t = torch.from_numpy
    args = (t(case["images"]), t(case["input_ids"]), t(case["attention_mask"]))
    with torch.no_grad():
        got = model(*args, labels=t(case["labels"]), image_num=t(case["image_num"]))
        direct = from_dsvc(case_dir, model.config)(*args, labels=t(case["labels"]), image_num=t(case["image_num"]))
    assert torch.equal(got.logits, direct.logits)  # the same weights as loading the reference directly
    valid = case["spliced_mask"] > 0
    assert np.abs(got.logits.numpy() - case["logits"])[valid].max() <= 1e-5
    assert abs(float(got.loss) - float(case["loss"])) <= 1e-5


def test_compat_and_preset_config(golden_dir, tmp_path):
    case = os.path.join(golden_dir, "baseline-mmca")
    dst = tmp_path / "jax"
    # The goldens' geometry is the `tiny` preset (max_position_embeddings aside, which holds no weights).
    assert main(["--from", "dsvc", "--to", "jax", case, str(dst), "--config", "tiny", "--compat", "fixed"]) == 0
    model = jax_from_pretrained(str(dst))
    assert model.config.compat == "fixed"
    assert_same(read_torch_bin(os.path.join(case, "pytorch_model.bin")), to_state_dict(model), "tiny preset")


def test_wrong_config_fails_naming_keys_and_leaves_nothing(golden_dir, tmp_path, capsys):
    case = os.path.join(golden_dir, CASE)  # a Qwen checkpoint read with the CLIP geometry of `tiny`
    for to in ("torch", "jax"):
        dst = tmp_path / f"out-{to}"
        assert main(["--from", "dsvc", "--to", to, case, str(dst), "--config", "tiny"]) == 1
        err = capsys.readouterr().err
        assert "vis_encoder.attn_pool.query" in err or "vis_encoder.vision_model" in err, err
        assert "nothing written" in err
    assert os.listdir(tmp_path) == []


def test_refusals(golden_dir, tmp_path, capsys):
    case = os.path.join(golden_dir, CASE)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    assert main(["--from", "dsvc", "--to", "jax", case, str(existing)]) == 1
    assert "--overwrite" in capsys.readouterr().err and os.listdir(existing) == ["keep.txt"]

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "pytorch_model.bin").symlink_to(os.path.join(case, "pytorch_model.bin"))
    assert main(["--from", "dsvc", "--to", "jax", str(bare), str(tmp_path / "a")]) == 1
    assert "--meta" in capsys.readouterr().err  # no geometry: the error says how to give it

    assert main(["--from", "torch", "--to", "jax", str(bare), str(tmp_path / "b")]) == 1
    assert "model.safetensors" in capsys.readouterr().err
    assert main(["--from", "jax", "--to", "torch", case, str(tmp_path / "c"), "--config", "tiny"]) == 1
    assert "config.json" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["bare", "existing"]


@pytest.mark.parametrize("argv", [["--help"], ["--from", "dsvc", "--to", "gguf", "a", "b"]])
def test_command_line(argv):
    r = subprocess.run([sys.executable, "-m", "convert.cli", *argv], cwd=ROOT, capture_output=True, text=True)
    if argv == ["--help"]:
        assert r.returncode == 0 and "--from {dsvc,zero,torch,jax,hf}" in r.stdout and "vchat convert --from" in r.stdout
    else:
        assert r.returncode == 2 and "invalid choice: 'gguf'" in r.stderr
