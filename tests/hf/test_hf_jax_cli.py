"""vchat_jax's from_hf equals vchat_torch's on every layout (without importing torch), and `vchat convert`
--from hf / --to hf round trips through both frameworks."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from hf_dirs import make_clip_dir, make_llama_dir, make_qwen_dir

from convert.cli import main as convert_main
from vchat_jax.hf import from_hf as jax_from_hf
from vchat_jax.state_dict import to_state_dict
from vchat_torch.hf import from_hf as torch_from_hf

jax.config.update("jax_default_matmul_precision", "highest")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("jx")
    return {"llama": make_llama_dir(str(root / "llama"), kv_heads=2, shard_size="20KB", safe=False, pad=False),
            "tied": make_llama_dir(str(root / "tied"), tie=True, dtype=torch.bfloat16),
            "clip_model": make_clip_dir(str(root / "clipm"), full=True),
            "qwen_vl": make_qwen_dir(str(root / "qwen")),
            "qwen_extracted": make_qwen_dir(str(root / "qx"), extracted=True)}


@pytest.mark.parametrize("lm,tower", [("llama", "clip_model"), ("tied", "qwen_vl"), ("llama", "qwen_extracted")])
def test_jax_from_hf_equals_torch(dirs, lm, tower):
    jm = jax_from_hf(dirs[lm], dirs[tower], dtype="float32")
    tm = torch_from_hf(dirs[lm], dirs[tower], dtype=torch.float32)
    sj, st = to_state_dict(jm), {k: v.numpy() for k, v in tm.state_dict().items()}
    assert set(sj) <= set(st) and all(np.array_equal(sj[k], st[k]) for k in sj)
    c = tm.config
    ids = np.array([[c.bos_token_id, 7, c.image_pretoken_id, c.image_token_id, 5, 6, 7, 8, 9, 10]])
    pixels = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = tm(torch.from_numpy(pixels), torch.from_numpy(ids), torch.ones(ids.shape, dtype=torch.long),
                  image_num=[1]).logits.numpy()
    got = np.asarray(jm(pixels, ids, np.ones_like(ids), image_num=[1]).logits)
    assert float(np.abs(got - want).max()) <= 1e-5


def test_jax_from_hf_keeps_the_checkpoint_dtype(dirs):
    jm = jax_from_hf(dirs["tied"], dirs["qwen_vl"])
    assert jm.dtype == jax.numpy.bfloat16 and jm.config.llm.tie_word_embeddings


def test_vchat_jax_hf_does_not_import_torch(dirs):
    code = (f"import sys\nfrom vchat_jax.hf import from_hf\nm = from_hf({dirs['llama']!r}, {dirs['qwen_vl']!r})\n"
            "bad = sorted(x for x in sys.modules if x == 'torch' or x.startswith('torch.'))\nassert not bad, bad\n")
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_convert_cli_round_trip(dirs, tmp_path):
    from vchat_jax.checkpoint import from_pretrained as jax_load
    from vchat_torch.checkpoint import from_pretrained as torch_load

    t, h, j = (str(tmp_path / n) for n in ("torch", "hf", "jax"))
    assert convert_main(["--from", "hf", "--to", "torch", dirs["llama"], t, "--vision", dirs["qwen_vl"],
                         "--enable_mmca_attention", "--max_seq_len", "128"]) == 0
    assert convert_main(["--from", "torch", "--to", "hf", t, h, "--vision_layout", "qwen_vl",
                         "--max_shard_size", "40000"]) == 0
    assert sorted(os.listdir(h)) == ["lm", "vision", "visualchat.json", "visualchat.safetensors"]
    assert convert_main(["--from", "hf", "--to", "jax", h, j]) == 0
    tm, jm = torch_load(t), jax_load(j)
    assert tm.config == jm.config and tm.config.mmca and tm.config.llm.max_position_embeddings == 128
    sj, st = to_state_dict(jm), tm.state_dict()
    assert all(np.array_equal(sj[k], st[k].numpy()) for k in sj)
    assert open(os.path.join(t, "tokenizer.json")).read() == open(os.path.join(j, "tokenizer.json")).read()


def test_convert_cli_errors_are_one_line(dirs, tmp_path, capsys):
    assert convert_main(["--from", "hf", "--to", "torch", dirs["llama"], str(tmp_path / "o"),
                         "--vision", dirs["qwen_vl"], "--vision_model_type", "clip"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--vision_model_type clip" in err and not os.path.exists(tmp_path / "o")
