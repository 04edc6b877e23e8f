"""Generation: the KV cache against a full prefill, batching with left padding, sampling."""

import numpy as np
import pytest
import torch

from vchat.config import preset
from vchat_torch import VisualChat

IMG, PRE = 95, 94


def tiny(compat, mmca=True, seed=0):
    torch.manual_seed(seed)
    return VisualChat(preset("tiny").replace(compat=compat, mmca=mmca)).eval()


def prompt(n_text_before=5, seed=0):
    rng = np.random.default_rng(seed)
    text = lambda n: rng.integers(3, 90, n).tolist()
    return torch.tensor([[1] + text(n_text_before) + [PRE, IMG] + text(3) + [PRE, IMG] + text(4)])


@pytest.mark.parametrize("mmca", [True, False])
@pytest.mark.parametrize("compat", ["fixed", "dsvc"])
def test_kv_cache_equals_prefill(compat, mmca):
    model = tiny(compat, mmca)
    if compat == "dsvc":  # dsvc embeds generated tokens with embed_tokens: make the tables agree
        with torch.no_grad():
            model.lang_embed.weight.copy_(model.lang_decoder.model.embed_tokens.weight)
    ids = prompt()
    images = torch.randn(2, 3, 32, 32)
    gen = model.generate(images, ids, max_new_tokens=6)
    full = torch.cat([ids[0], gen.ids[0, :-1]])[None]
    with torch.no_grad():
        out = model(images, full, torch.ones_like(full), image_num=[2], pad_multiple=1)
    torch.testing.assert_close(out.logits[0, -6:], gen.step_logits[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(out.logits[0, -6:].argmax(-1), gen.ids[0])


def test_batched_left_padded_equals_one_by_one():
    model = tiny("fixed")
    a, b = prompt(5, seed=1), prompt(1, seed=2)[:, :-2]  # different lengths
    ia, ib = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    T = max(a.shape[1], b.shape[1])
    pad = lambda x: torch.cat([torch.full((1, T - x.shape[1]), 2), x], 1)
    mask = lambda x: torch.cat([torch.zeros(1, T - x.shape[1], dtype=torch.long), torch.ones_like(x)], 1)
    batch = model.generate(torch.cat([ia, ib]), torch.cat([pad(a), pad(b)]), torch.cat([mask(a), mask(b)]),
                           image_num=[2, 2], max_new_tokens=5)
    for row, (ids, imgs) in enumerate([(a, ia), (b, ib)]):
        one = model.generate(imgs, ids, max_new_tokens=5)
        torch.testing.assert_close(batch.step_logits[row], one.step_logits[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(batch.ids[row], one.ids[0])


def test_text_only_prompt_and_sampling_is_seeded():
    model = tiny("fixed")
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    greedy = model.generate(None, ids, max_new_tokens=4)
    assert greedy.ids.shape == (1, 4)
    s1 = model.generate(None, ids, max_new_tokens=6, do_sample=True, top_k=5, top_p=0.9, seed=3)
    s2 = model.generate(None, ids, max_new_tokens=6, do_sample=True, top_k=5, top_p=0.9, seed=3)
    assert torch.equal(s1.ids, s2.ids)
    # top_k=1 sampling is greedy
    k1 = model.generate(None, ids, max_new_tokens=4, do_sample=True, top_k=1, seed=0)
    assert torch.equal(k1.ids, greedy.ids)


def test_stops_at_eos_and_pads_finished_rows():
    model = tiny("fixed")
    calls = []

    def force(module, inputs, logits):  # row 0 says EOS at once, row 1 on the third step
        logits = logits.clone()
        step = len(calls)
        calls.append(step)
        logits[0, -1, 2] = 1e4
        if step == 2:
            logits[1, -1, 2] = 1e4
        return logits

    model.lang_decoder.lm_head.register_forward_hook(force)
    ids = torch.tensor([[1, 5, 6], [1, 7, 8]])
    gen = model.generate(None, ids, torch.ones_like(ids), image_num=[0, 0], max_new_tokens=6)
    assert gen.ids.shape == (2, 3)  # stopped once both rows were done
    assert gen.ids[0].tolist() == [2, 2, 2]  # EOS, then pad (= 2 here) after it
    assert gen.ids[1, 2].item() == 2 and gen.ids[1, :2].ne(2).all()
