"""vchat_jax.train and vchat_jax.optim: one step equals a hand-written AdamW over the reference's groups, the loss falls on the
synthetic data, the step does not depend on the mesh (8 forced host devices, in a subprocess), and an orbax
train state round-trips bit-exactly and training goes on identically. One Trainer (one compiled step) is
shared by the tests of this process."""

import functools
import os
import subprocess
import sys

import pytest
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vchat.config import PRESETS
from vchat.data import (Budget, EncodedDataset, ImageProcessor, SyntheticDataset, iterate_batches,
                        synthetic_text_tokenizer)
from vchat_jax import VisualChat
from vchat.param_groups import GROUPS, group_of
from vchat_jax.optim import OptimizerConfig, lr_lambda, param_labels
from vchat_jax.train import Trainer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CFG = PRESETS["tiny"].replace(mmca=True, compat="fixed")
B = 8
OPT = OptimizerConfig(learning_rate=1e-2, learning_rate_pretraining_components=3e-3, weight_decay=0.1,
                      lr_scheduler_type="linear", num_warmup_steps=0, total_steps=40)


@functools.lru_cache(maxsize=None)
def batches(n: int = 20) -> list:
    data = EncodedDataset(SyntheticDataset(n * B + 8, seed=0, image_size=32), synthetic_text_tokenizer(),
                          ImageProcessor.for_vision(CFG.vision), Budget(1024, CFG.image_tokens, 4))
    return list(iterate_batches(data, B, seed=0, drop_last=True))[:n]


@functools.lru_cache(maxsize=None)
def model() -> VisualChat:
    return VisualChat(CFG, nnx.Rngs(0))


@functools.lru_cache(maxsize=None)
def trainer() -> Trainer:
    # fixed shapes (4 images a sample, L a multiple of 256): the step compiles once for every test
    return Trainer(model(), OPT, B, seq_multiple=256, images_per_sample=4)


def copy(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def test_schedules():
    """transformers' multipliers with 3 warmup steps of 10 (tests/cross/test_cross_train.py checks them against
    transformers.get_scheduler itself)."""
    want = {"linear": [0, 1 / 3, 2 / 3, 1, 6 / 7, 5 / 7, 0, 0],
            "cosine": [0, 1 / 3, 2 / 3, 1, 0.5 * (1 + np.cos(np.pi / 7)), 0.5 * (1 + np.cos(2 * np.pi / 7)), 0,
                       0.5 * (1 + np.cos(8 * np.pi / 7))],  # past the end the cosine rises again, as in transformers
            "constant": [1] * 8, "constant_with_warmup": [0, 1 / 3, 2 / 3, 1, 1, 1, 1, 1]}
    for kind, values in want.items():
        lam = lr_lambda(kind, 3, 10)
        got = [float(lam(s)) for s in (0, 1, 2, 3, 4, 5, 10, 11)]
        np.testing.assert_allclose(got, values, atol=1e-6, err_msg=kind)
    assert OptimizerConfig(num_warmup_steps=0.25, total_steps=40).warmup_steps == 10
    assert OptimizerConfig(num_warmup_steps=5, total_steps=40).warmup_steps == 5


def test_groups_follow_the_torch_names():
    params = nnx.to_pure_dict(nnx.state(model(), nnx.Param))
    labels = param_labels({k: params[k] for k in ("lang_embed", "projection")}, CFG)
    assert labels["lang_embed"]["embedding"] == "embed_decay"  # "lang_embed.weight"
    assert labels["projection"]["layers"][0]["kernel"] == "decay"  # "projection.0.weight"
    assert labels["projection"]["layers"][0]["bias"] == "no_decay"
    assert labels["projection"]["layers"][1]["scale"] == "decay"  # "projection.1.weight": the reference's rule
    assert group_of("x.LayerNorm.weight") == "no_decay" and group_of("embed.bias") == "embed_no_decay"


def test_one_step_equals_hand_written_adamw():
    tr = trainer()
    state = tr.init_state()
    arrays = tr.plan(batches()[0])
    p0, frozen0 = copy(state.params), copy(state.frozen)
    grads = jax.jit(jax.grad(tr.loss_fn))(state.params, state.frozen, jax.tree.map(jnp.asarray, arrays))
    grads = copy(grads)
    new, metrics = tr.step(state, arrays)

    labels = param_labels(p0, CFG)
    norm = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in jax.tree.leaves(grads)))
    clip = min(1.0, 1.0 / norm)
    b1, b2, eps, lam0 = 0.9, 0.95, 1e-6, 1.0  # linear schedule without warmup: lambda(0) = 1
    lr = {"decay": 1e-2, "no_decay": 1e-2, "embed_decay": 3e-3, "embed_no_decay": 3e-3}

    def adamw(p, g, label):
        g = g * clip
        m_hat = (1 - b1) * g / (1 - b1)
        v_hat = (1 - b2) * g * g / (1 - b2)
        wd = 0.1 if label in ("decay", "embed_decay") else 0.0
        return p - lr[label] * lam0 * (m_hat / (np.sqrt(v_hat) + eps) + wd * p)

    want = jax.tree.map(adamw, p0, grads, labels)
    got = copy(new.params)
    # Where |g| * clip is near eps the first step, g / (|g| + eps), turns the rounding of two separately
    # compiled gradients (~1e-9) into update differences of lr * 1e-3: those few entries are held to 1e-4.
    sharp = [(np.abs(g) * clip > 10 * eps) | (g == 0) for g in jax.tree.leaves(grads)]
    pairs = list(zip(jax.tree.leaves(got), jax.tree.leaves(want), sharp))
    worst = max(float(np.abs(a - b)[m].max(initial=0.0)) for a, b, m in pairs)
    worst_near_eps = max(float(np.abs(a - b)[~m].max(initial=0.0)) for a, b, m in pairs)
    assert worst < 1e-6 and worst_near_eps < 1e-4, (worst, worst_near_eps)
    assert sum(int(m.sum()) for m in sharp) > 0.9 * sum(m.size for m in sharp)
    assert abs(float(metrics["grad_norm"]) - norm) < 1e-4 * norm
    assert int(new.step) == 1 and set(jax.tree.leaves(labels)) <= set(GROUPS)
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(p0)))
    # frozen parameters are bit-identical, read back through the model
    after = nnx.to_pure_dict(nnx.state(tr.model(new), nnx.Param))
    for part in ("vis_encoder", "lang_decoder"):
        for a, b in zip(jax.tree.leaves(after[part]), jax.tree.leaves(frozen0[part])):
            assert np.array_equal(np.asarray(a), b)


def test_loss_decreases_on_synthetic_data():
    tr = trainer()
    state = tr.init_state()
    losses = []
    for batch in batches():
        state, m = tr.step(state, batch)
        losses.append(float(m["loss"]))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
    assert losses[-1] < losses[0] - 0.8, losses


def test_orbax_round_trip_and_resume(tmp_path):
    tr = trainer()
    state = tr.init_state()
    for batch in batches()[:3]:
        state, _ = tr.step(state, batch)
    tr.save(state, str(tmp_path / "state"))
    saved = copy(state.as_dict())
    straight, m1 = tr.step(state, batches()[3])  # donates `state`
    back = tr.restore(str(tmp_path / "state"))
    assert int(back.step) == 3
    assert jax.tree.structure(back.as_dict()) == jax.tree.structure(saved)
    for a, b in zip(jax.tree.leaves(back.as_dict()), jax.tree.leaves(saved)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), b)
    assert all(a.sharding == s for a, s in zip(jax.tree.leaves(back), jax.tree.leaves(tr.shardings)))
    resumed, m2 = tr.step(back, batches()[3])
    assert float(m1["loss"]) == float(m2["loss"])
    for a, b in zip(jax.tree.leaves(resumed.as_dict()), jax.tree.leaves(straight.as_dict())):
        assert np.array_equal(np.asarray(a), np.asarray(b))


MESH_SCRIPT = r"""
import sys
SHAPES = {"all": ({"data": 8}, {"fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2}),
          "mixed": ({"data": 2, "fsdp": 2, "tensor": 2},)}  # make test: the mesh with every axis
import dataclasses, tempfile
import jax, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
assert len(jax.devices()) == 8
from flax import nnx
from vchat.config import PRESETS
from vchat.data import (Budget, EncodedDataset, ImageProcessor, SyntheticDataset, iterate_batches,
                        synthetic_text_tokenizer)
from vchat_jax import VisualChat
from vchat_jax.sharding import make_mesh
from vchat_jax.optim import OptimizerConfig
from vchat_jax.train import Trainer

t = PRESETS["tiny"]
cfg = t.replace(vision=dataclasses.replace(t.vision, num_hidden_layers=1),
                llm=dataclasses.replace(t.llm, num_hidden_layers=1))
data = EncodedDataset(SyntheticDataset(16, seed=1, image_size=32), synthetic_text_tokenizer(),
                      ImageProcessor.for_vision(cfg.vision), Budget(1024, cfg.image_tokens, 4))
batch = next(iterate_batches(data, 8, seed=0, drop_last=True))
# The reference's default lr. Adam's first step is lr * g / (|g| + 1e-6): gradients that differ by float32
# rounding (~1e-7 of the largest, from the order of the sharded sums) move elements with |g| ~ 1e-6 by up to
# ~lr * 1e-3, so the 1e-6 contract on parameters holds for lr <= 1e-3 (lr 1e-2 gave 3.5e-6).
opt = OptimizerConfig(learning_rate=1e-3, weight_decay=0.1, lr_scheduler_type="constant")
parts = ("lang_embed", "projection", "lang_decoder")

model = VisualChat(cfg, nnx.Rngs(0))  # a Trainer copies what it trains: one model serves every mesh

def run(mesh):
    tr = Trainer(model, opt, 8, trainable=parts, mesh=mesh, seq_multiple=128,
                 images_per_sample=4)
    state, m = tr.step(tr.init_state(), batch)
    return tr, state, float(m["loss"]), float(m["grad_norm"])

tr1, s1, l1, gn1 = run(None)
base = jax.tree.map(np.asarray, s1.params)
for shape in SHAPES[sys.argv[1]]:
    tr, s, l, gn = run(make_mesh(shape))
    q = s.params["lang_decoder"]["model"]["layers"][0]["mlp"]["gate_proj"]["kernel"]
    assert len(q.sharding.device_set) == 8, q.sharding
    d = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(jax.tree.leaves(s.params), jax.tree.leaves(base)))
    print(f"mesh {shape}: params max |diff| {d:.2e}, loss diff {abs(l - l1):.2e}, grad norm diff "
          f"{abs(gn - gn1):.2e}; gate_proj {q.sharding.spec}")
    assert d <= 1e-6 and abs(l - l1) <= 1e-6 and abs(gn - gn1) <= 1e-6 * gn1, (shape, d, l, l1)
import sys
assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")]  # vchat_jax.train is torch-free
# a 1-device train state restored onto the 2x2x2 mesh: bit-exact, in the mesh's shardings
d = tempfile.mkdtemp()
tr1.save(s1, d + "/state")
back = tr.restore(d + "/state")
for a, b, sh in zip(jax.tree.leaves(back), jax.tree.leaves(s1), jax.tree.leaves(tr.shardings)):
    assert np.array_equal(np.asarray(a), np.asarray(b)) and a.sharding == sh
print("ok")
"""


@pytest.mark.parametrize("shapes", ["mixed", pytest.param("all", marks=pytest.mark.slow)])
def test_step_is_mesh_invariant_on_8_host_devices(shapes):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    r = subprocess.run([sys.executable, "-c", MESH_SCRIPT, shapes], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    print(r.stdout)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-3000:]


def test_cli_trains_saves_and_resumes(tmp_path, capsys):
    import dataclasses

    from vchat_jax.cli import train_main as main
    from vchat_jax.train import latest_step

    small = CFG.replace(vision=dataclasses.replace(CFG.vision, num_hidden_layers=1),
                        llm=dataclasses.replace(CFG.llm, num_hidden_layers=1))
    small.save(str(tmp_path / "small.json"))
    out = tmp_path / "run"
    args = ["--lm_model_name_or_path", str(tmp_path / "small.json"), "--dataset_names", "synthetic",
            "--synthetic_samples", "40", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2",
            "--max_seq_len", "256", "--max_num_image_per_sample", "2", "--enable_mmca_attention",
            "--output_dir", str(out), "--save_every", "2"]
    assert main(args + ["--max_steps", "3"]) == 0
    assert "step 3/3" in capsys.readouterr().out
    assert latest_step(str(out / "state")) == 3 and (out / "final" / "tokenizer.json").exists()
    rows = [r for r in (out / "train_log.jsonl").read_text().splitlines() if r]
    assert len(rows) == 3
    assert main(args + ["--max_steps", "4"]) == 0  # the same command, one more step: resumes at step 3
    text = capsys.readouterr().out
    assert "resumed from" in text and "at step 3" in text and "step 4/4" in text
    final = VisualChat.from_pretrained(str(out / "final"))
    assert final.config == small
    start = VisualChat(small, nnx.Rngs(1234))  # the CLI seeds the model with --seed
    assert np.array_equal(final.lang_decoder.lm_head.kernel[...], start.lang_decoder.lm_head.kernel[...])
    assert not np.array_equal(final.lang_embed.embedding[...], start.lang_embed.embedding[...])
