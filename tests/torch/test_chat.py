"""Chat sessions: a kept KV cache gives the same answers as re-encoding the history (compat "fixed")."""

import numpy as np
import pytest
import torch

from vchat.config import preset
from vchat.data import ImageProcessor, SyntheticDataset, synthetic_text_tokenizer
from vchat_torch import VisualChat
from vchat_torch.chat import ChatSession


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = VisualChat(preset("tiny")).eval()
    tok = synthetic_text_tokenizer()
    proc = ImageProcessor.for_vision(model.config.vision)
    ds = SyntheticDataset(20, seed=5)
    sample = next(s for s in (ds[i] for i in range(20)) if len(s.turns) >= 2 and s.num_images >= 2)
    return model, tok, proc, sample


def run(model, tok, proc, sample, reuse):
    chat = ChatSession(model, tok, max_new_tokens=5, reuse_cache=reuse)
    answers = [chat.ask(t.question, proc.batch(list(t.images)) if t.images else None) for t in sample.turns]
    return chat, answers


def test_cached_equals_reencoded(setup):
    model, tok, proc, sample = setup
    cached, a = run(model, tok, proc, sample, True)
    full, b = run(model, tok, proc, sample, False)
    assert a == b and len(a) == len(sample.turns)
    # the cache holds every round: prompt + answer + EOS, and the re-encoded history is the same length
    n_img = sample.num_images
    assert cached.modality.shape[1] == len(full.ids) + n_img * (model.config.image_tokens - 1)
    assert int((cached.modality == 2).sum()) == n_img * model.config.image_tokens


def test_transcript_and_limits(setup):
    model, tok, proc, sample = setup
    chat, answers = run(model, tok, proc, sample, True)
    text = chat.transcript()
    assert "=========== Round 1 ===========" in text and "image 1" in text
    assert text.count("VisualChat:") == len(sample.turns)
    pixels = np.zeros((7, 3, 32, 32), dtype=np.float32)
    with pytest.raises(ValueError, match="at most 8 images"):
        chat.ask("too many", pixels)
    chat.clear()
    assert chat.num_images == 0 and chat.modality is None
