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


@functools.lru_cache(maxsize=None)
def short_context_pair(room: int):
    """A pair whose context holds the first round's prompt, `room` answer tokens and the closing EOS."""
    tm, _, tok, rounds = setup()
    question, images = rounds[0]
    probe = TorchChat(tm, tok)
    spliced = len(probe.prompt_ids(question, len(images))) + len(images) * (tm.config.image_tokens - 1)
    config = make_config()
    config = config.replace(llm=config.llm.__class__(**{**config.llm.__dict__,
                                                        "max_position_embeddings": spliced + room + 1}))
    return make_pair(config), spliced


@pytest.mark.parametrize("reuse", [True, False])
def test_answers_stop_at_the_end_of_the_context(reuse, capsys):
    """An answer that reaches max_position_embeddings is cut there with a warning, in both frameworks
    alike; a prompt that no longer fits is refused (ContextFull) and leaves the chat as it was."""
    from vchat.chat import ContextFull

    _, _, tok, rounds = setup()
    room = 3  # < NEW_TOKENS
    (tm, jm), spliced = short_context_pair(room)
    answers = []
    for cls, model in ((TorchChat, tm), (JaxChat, jm)):
        chat = cls(model, tok, max_new_tokens=NEW_TOKENS, reuse_cache=reuse)
        answers.append(chat.ask(*rounds[0]))
        used = chat.used_positions()
        assert spliced < used <= model.config.llm.max_position_embeddings
        n_answer = used - spliced - 1  # the answer between the prompt and the closing EOS
        assert n_answer == room and chat.turns[0].cut  # these weights never say EOS so early
        warned = "cut after" in capsys.readouterr().err
        assert warned == chat.turns[0].cut
        with pytest.raises(ContextFull, match=f"holds {used} of {model.config.llm.max_position_embeddings}"):
            chat.ask(*rounds[1])
        assert len(chat.turns) == 1 and chat.used_positions() == used and chat.num_images == len(rounds[0][1])
        chat.clear()
        assert chat.ask(*rounds[0]) == answers[-1]  # after clear the context is free again
    assert answers[0] == answers[1]
