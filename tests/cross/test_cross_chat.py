"""torch vs JAX chat sessions (vchat_torch.chat / vchat_jax.chat) on the same weights: over two rounds with
images, both answer alike, both keep the same KV cache, and the JAX cache kept between rounds equals one
prefill of the whole re-encoded history (`prompt + answer + EOS` per round)."""

import functools

import numpy as np
import pytest
from flax import nnx

from cross_helpers import make_config, make_pair
from vchat.data import ImageProcessor, SyntheticDataset, synthetic_text_tokenizer
from vchat_jax.chat import ChatSession as JaxChat
from vchat_jax.generate import prefill
from vchat_jax.model import KVCache
from vchat_torch.chat import ChatSession as TorchChat

NEW_TOKENS, ATOL = 6, 1e-5


@functools.lru_cache(maxsize=None)
def setup():
    config = make_config()
    tm, jm = make_pair(config)
    proc = ImageProcessor.for_vision(config.vision)
    ds = SyntheticDataset(20, seed=5)
    sample = next(s for s in (ds[i] for i in range(20)) if len(s.turns) >= 2 and s.num_images >= 2)
    rounds = [(t.question, proc.batch(list(t.images)) if t.images else None) for t in sample.turns[:2]]
    return tm, jm, synthetic_text_tokenizer(), rounds


def run(cls, model, tok, rounds, reuse: bool):
    chat = cls(model, tok, max_new_tokens=NEW_TOKENS, reuse_cache=reuse)
    return chat, [chat.ask(q, images) for q, images in rounds]


def test_sessions_answer_alike_and_keep_the_same_cache():
    tm, jm, tok, rounds = setup()
    assert sum(0 if im is None else len(im) for _, im in rounds) >= 2
    tchat, t_answers = run(TorchChat, tm, tok, rounds, True)
    jchat, j_answers = run(JaxChat, jm, tok, rounds, True)
    assert t_answers == j_answers and len(j_answers) == 2
    assert tchat.next_pos == jchat.next_pos > 0
    np.testing.assert_array_equal(tchat.modality.numpy(), jchat.modality)
    n = jchat.next_pos
    for i, (k, v) in enumerate(jchat.cache.layers):
        tk, tv = tchat.cache.layers[i].keys.numpy(), tchat.cache.layers[i].values.numpy()
        np.testing.assert_allclose(np.asarray(k)[:, :, :n], tk, atol=ATOL, rtol=0, err_msg=f"layer {i} keys")
        np.testing.assert_allclose(np.asarray(v)[:, :, :n], tv, atol=ATOL, rtol=0, err_msg=f"layer {i} values")


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_kept_cache_answers_as_reencoding(framework):
    tm, jm, tok, rounds = setup()
    cls, model = (TorchChat, tm) if framework == "torch" else (JaxChat, jm)
    _, cached = run(cls, model, tok, rounds, True)
    _, full = run(cls, model, tok, rounds, False)
    assert cached == full


def test_jax_kept_cache_equals_one_prefill_of_the_history():
    _, jm, tok, rounds = setup()
    kept, _ = run(JaxChat, jm, tok, rounds, True)
    full, _ = run(JaxChat, jm, tok, rounds, False)  # its token history: prompt + answer + EOS per round
    pixels = np.stack(full.pixels)
    plan = jm.plan(np.array([full.ids]), pad_multiple=1)
    L = plan.shape[1]
    assert L == kept.next_pos
    graphdef, state = nnx.split(jm)
    _, fresh = prefill(graphdef, state, plan, pixels, KVCache.empty(jm.config, 1, L, jm.dtype))
    np.testing.assert_array_equal(np.asarray(fresh.modality), kept.modality)
    for i, ((k, v), (k2, v2)) in enumerate(zip(kept.cache.layers, fresh.layers)):
        np.testing.assert_allclose(np.asarray(k)[:, :, :L], np.asarray(k2), atol=ATOL, rtol=0, err_msg=f"layer {i}")
        np.testing.assert_allclose(np.asarray(v)[:, :, :L], np.asarray(v2), atol=ATOL, rtol=0, err_msg=f"layer {i}")
