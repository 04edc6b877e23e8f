"""vchat_jax.VisualChat on a tiny random model: decode agrees with prefill in both compat modes,
batched left-padded generation equals one prompt at a time, the decode step compiles once, text-only
samples, and the loss's gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vchat.config import PRESETS
from vchat_jax import VisualChat
from vchat_jax import generate as gen_mod
from vchat_jax.model import forward_planned

IMG, BOS, PAD = 95, 1, 2


@functools.lru_cache(maxsize=None)
def tiny(compat: str, mmca: bool = True) -> VisualChat:
    return VisualChat(PRESETS["tiny"].replace(compat=compat, mmca=mmca), nnx.Rngs(0))


def images(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


PROMPT = np.array([[BOS, 5, 6, 7, 94, IMG, 8, 94, IMG, 9, 10, 11, 12]])  # text before the first image


@pytest.mark.parametrize("compat", ["dsvc", "fixed"])
def test_decode_matches_prefill(compat):
    """Step t's logits equal the forward pass over the prompt and the first t generated tokens
    (the fresh model's lang_embed equals embed_tokens, so both compat modes must agree)."""
    model = tiny(compat)
    out = model.generate(images(2), PROMPT, max_new_tokens=5, eos_token_id=-1)
    ids = np.concatenate([PROMPT, out.ids[:, :-1]], axis=1)
    logits = model(images(2), ids, np.ones_like(ids), None, [2]).logits
    L = PROMPT.shape[1] + 2 * (model.config.image_tokens - 1)
    want = np.asarray(logits)[0, L - 1:L - 1 + 5]
    np.testing.assert_allclose(out.step_logits[0], want, atol=1e-5, rtol=0)
    assert (out.ids[0] == want.argmax(-1)).all()


def test_batched_left_padded_generation_matches_single_prompts():
    model = tiny("fixed")
    a = PROMPT[0]
    b = np.array([BOS, 20, 21, 94, IMG, 22, 23])
    ims = images(3, seed=1)
    batch = np.full((2, len(a)), PAD)
    mask = np.zeros_like(batch)
    batch[0], mask[0] = a, 1
    batch[1, -len(b):], mask[1, -len(b):] = b, 1
    both = model.generate(ims, batch, mask, image_num=[2, 1], max_new_tokens=4, eos_token_id=-1)
    one = model.generate(ims[:2], a[None], max_new_tokens=4, eos_token_id=-1)
    two = model.generate(ims[2:], b[None], max_new_tokens=4, eos_token_id=-1)
    np.testing.assert_array_equal(both.ids, np.concatenate([one.ids, two.ids]))
    np.testing.assert_allclose(both.step_logits, np.concatenate([one.step_logits, two.step_logits]), atol=1e-5)


def test_decode_step_compiles_once():
    model = tiny("fixed")
    model.generate(images(2), PROMPT, max_new_tokens=3, eos_token_id=-1)
    before = gen_mod.decode_token._cache_size()
    model.generate(images(2), PROMPT, max_new_tokens=3, eos_token_id=-1)  # same shapes: no new compilation
    assert gen_mod.decode_token._cache_size() == before


def test_eos_stops_and_pads():
    model = tiny("fixed")
    first = model.generate(images(2), PROMPT, max_new_tokens=4, eos_token_id=-1)
    out = model.generate(images(2), PROMPT, max_new_tokens=4, eos_token_id=int(first.ids[0, 1]))
    assert out.ids.shape[1] == 2 and out.ids[0, 1] == first.ids[0, 1]


@pytest.mark.parametrize("compat", ["dsvc", "fixed"])
def test_text_only_sample_in_a_batch(compat):
    model = tiny(compat)
    text = np.array([BOS, 30, 31, 32, 33, 34, PAD, PAD])
    with_img = np.array([BOS, 40, 94, IMG, 41, 42, 43, 44])
    ids = np.stack([text, with_img])
    mask = (np.arange(8) < np.array([[6], [8]])).astype(np.int64)
    logits = model(images(1), ids, mask, None, [0, 1]).logits
    alone = model(None, text[None, :6], np.ones((1, 6), np.int64), None, [0]).logits
    np.testing.assert_allclose(np.asarray(logits)[0, :6], np.asarray(alone)[0, :6], atol=1e-5)
    assert np.isfinite(np.asarray(logits)).all()


def test_plain_causal_mode_runs():
    model = tiny("fixed", mmca=False)
    out = model.generate(images(2), PROMPT, max_new_tokens=2, eos_token_id=-1)
    assert out.ids.shape == (1, 2)


def test_loss_gradients_flow_to_projection_not_vision():
    model = tiny("fixed")
    ids = PROMPT
    labels = np.where(np.arange(ids.shape[1]) >= ids.shape[1] - 4, ids, -100)
    p = model.plan(ids, np.ones_like(ids), [2], labels)

    def loss_fn(m):
        return forward_planned(m, p, jnp.asarray(images(2))).loss

    grads = nnx.grad(loss_fn)(model)
    vis = [np.abs(np.asarray(g)).max() for g in jax.tree.leaves(grads["vis_encoder"])]
    proj = [np.abs(np.asarray(g)).max() for g in jax.tree.leaves(grads["projection"])]
    assert max(vis) == 0.0 and max(proj) > 0.0
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_loss_without_supervised_tokens_is_nan_like_the_reference():
    model = tiny("fixed")
    loss = model(images(2), PROMPT, np.ones_like(PROMPT), np.full_like(PROMPT, -100), [2]).loss
    assert np.isnan(float(loss))


def test_pick_next():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((3, 11)), jnp.float32)
    key = jax.random.key(0)
    greedy = np.asarray(gen_mod.pick_next(logits, key, False, 1.0, 0, 1.0))
    assert (greedy == np.asarray(logits).argmax(-1)).all()
    for top_k, top_p in ((1, 1.0), (0, 1e-6)):  # both leave only the argmax
        assert (np.asarray(gen_mod.pick_next(logits, key, True, 0.7, top_k, top_p)) == greedy).all()
    draws = np.stack([np.asarray(gen_mod.pick_next(logits, jax.random.key(s), True, 1.0, 3, 1.0)) for s in range(20)])
    top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
    assert all(np.isin(draws[:, b], top3[b]).all() for b in range(3))


def test_trainable_only_checkpoint_needs_a_base(tmp_path):
    """save_pretrained(trainable_only=True) writes the trainable parts only; loading needs a full base."""
    base, tuned = tiny("fixed"), VisualChat(PRESETS["tiny"], nnx.Rngs(1))
    base.save_pretrained(str(tmp_path / "base"))
    tuned.save_pretrained(str(tmp_path / "small"), trainable_only=True)
    with pytest.raises(ValueError, match="base="):
        VisualChat.from_pretrained(str(tmp_path / "small"))
    back = VisualChat.from_pretrained(str(tmp_path / "small"), base=str(tmp_path / "base"))
    for part, want in (("lang_embed", tuned), ("projection", tuned), ("lang_decoder", base), ("vis_encoder", base)):
        got, ref = (jax.tree.leaves(nnx.state(getattr(m, part), nnx.Param)) for m in (back, want))
        assert all(np.array_equal(a, b) for a, b in zip(got, ref)), part
