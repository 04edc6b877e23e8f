"""The built-in synthetic dataset: determinism, answers read back from the pixels, its tokenizer."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from data_helpers import write_json
from vchat.data import (SYNTH_IDS, DataError, SyntheticDataset, TextTokenizer, build_synthetic_tokenizer,
                        encode_sample, make_reader, open_image, render_turns, save_synthetic, synthetic_text_tokenizer)

WORDS = ("zero", "one", "two", "three")


def colour_of(rgb) -> str:
    r, g, b = (int(v) for v in rgb)
    if r > 150 and g > 150 and b < 100:
        return "yellow"
    if r > 150 and g < 100 and b < 100:
        return "red"
    if g > 120 and r < 100 and b < 100:
        return "green"
    if b > 150 and r < 100:
        return "blue"
    raise AssertionError(f"unexpected colour {rgb}")


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean image, each as an (n, 2) array of (row, col)."""
    seen = np.zeros_like(mask)
    out = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        stack, pts = [(r0, c0)], []
        seen[r0, c0] = True
        while stack:
            r, c = stack.pop()
            pts.append((r, c))
            for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1] and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        out.append(np.asarray(pts))
    return out


def read_shapes(img) -> list[tuple[str, str]]:
    """(colour, shape) of each blob, from pixels alone: 4-connected components, shape by how much of
    its bounding box it fills (square 1, circle ~0.78, triangle ~0.5)."""
    px = np.asarray(img)
    out = []
    for pts in components(px.any(axis=-1)):
        h, w = np.ptp(pts, axis=0) + 1
        fill = len(pts) / (h * w)
        shape = "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"
        colours = {colour_of(px[r, c]) for r, c in pts}
        assert len(colours) == 1, colours
        out.append((colours.pop(), shape))
    return out


def check_answers(sample) -> Counter:
    images, kinds = [], Counter()
    for turn in sample.turns:
        images += [read_shapes(im) for im in turn.images]
        q, a = turn.question, turn.answer
        if m := re.fullmatch(r"What colour is the (circle|square|triangle) in image (\d)\?", q):
            blobs = images[int(m[2]) - 1]
            named = [colour for colour, shape in blobs if shape == m[1]]
            assert named == [a] and 1 <= len(blobs) <= 3, (q, a, blobs)
            kinds["colour"] += 1
        elif m := re.fullmatch(r"How many (circle|square|triangle)s are in image (\d)\?", q):
            n = sum(shape == m[1] for _, shape in images[int(m[2]) - 1])
            assert WORDS[n] == a, (q, a, images)
            kinds["count"] += 1
        elif m := re.fullmatch(r"Which image has a (red|green|blue|yellow) (circle|square|triangle)\?", q):
            assert len(images) >= 3
            hits = [k + 1 for k, blobs in enumerate(images) if (m[1], m[2]) in blobs]
            assert (hits == [int(a)]) if a != "none" else hits == [], (q, a, hits)
            kinds["which"] += 1
        else:
            raise AssertionError(f"unexpected question {q!r}")
    return kinds


def test_answers_are_true_of_the_pixels():
    ds = SyntheticDataset(150, seed=11)
    kinds = Counter()
    for i in range(len(ds)):
        s = ds[i]
        assert 1 <= s.num_images <= 4 and 1 <= len(s.turns) <= 3 and s.turns[0].images
        kinds += check_answers(s)
        # no image stands out by its number of shapes: only its label says which one a question means
        assert all(1 <= len(read_shapes(im)) <= 3 for im in s.images)
    assert set(kinds) == {"colour", "count", "which"}


def test_other_image_size():
    ds = SyntheticDataset(20, seed=2, image_size=48)
    assert ds[0].images[0].size == (48, 48)
    for i in range(len(ds)):
        check_answers(ds[i])


@pytest.mark.parametrize("max_images", [1, 2, 3])
def test_max_images_caps_every_sample(max_images):
    ds = SyntheticDataset(120, seed=3, max_images=max_images)
    counts = Counter(ds[i].num_images for i in range(len(ds)))
    assert set(counts) == set(range(1, max_images + 1)), counts
    for i in range(len(ds)):
        check_answers(ds[i])  # still true of the pixels; "which" needs 3 images, so it comes with 3 only
    assert SyntheticDataset(5, seed=3, max_images=4).plan(2) == SyntheticDataset(5, seed=3).plan(2)


def test_max_images_out_of_range():
    for bad in (0, 5):
        with pytest.raises(ValueError, match="max_images must be in 1..4"):
            SyntheticDataset(5, max_images=bad)


def test_deterministic_by_seed():
    a, b, c = SyntheticDataset(10, seed=5), SyntheticDataset(10, seed=5), SyntheticDataset(10, seed=6)
    for i in range(10):
        sa, sb = a[i], b[i]
        assert render_turns(sa) == render_turns(sb)
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(sa.images, sb.images))
    assert [render_turns(a[i]) for i in range(10)] != [render_turns(c[i]) for i in range(10)]


def test_chance_at_most_a_quarter_per_question_type():
    ds = SyntheticDataset(3000, seed=0)
    answers: dict[str, Counter] = {}
    for i in range(len(ds)):
        for q, a in ds.plan(i)[2]:
            kind = q.split()[0]
            answers.setdefault(kind, Counter())[a] += 1
    assert set(answers) == {"What", "How", "Which"}
    for kind, counts in answers.items():
        assert max(counts.values()) / sum(counts.values()) <= 0.29, (kind, counts)
    assert set(answers["What"]) == {"red", "green", "blue", "yellow"} and set(answers["How"]) == set(WORDS)


def test_tokenizer_ids_and_coverage():
    raw = build_synthetic_tokenizer()
    assert raw.get_vocab_size() == 96 < 200
    assert [raw.token_to_id(t) for t in ("<s>", "</s>", "### Image:", "<image>")] == [1, 2, 94, 95]
    assert SYNTH_IDS == {"unk": 0, "bos": 1, "eos": 2, "pad": 2, "image_pretoken": 94, "image": 95}
    assert raw.to_str() == build_synthetic_tokenizer().to_str()  # deterministic
    tok = synthetic_text_tokenizer()
    ds = SyntheticDataset(100, seed=1)
    for i in range(len(ds)):
        enc = encode_sample(ds[i], tok)
        assert 0 not in enc.input_ids.tolist()  # no <unk>: the vocabulary covers every prompt
        assert enc.input_ids.max() < 96
    text = tok.decode(encode_sample(ds[0], tok).input_ids)
    assert text.startswith("<s> You are a helpful language and vision assistant .")


def test_ids_match_the_tiny_preset():
    from vchat.config import PRESETS

    tiny = PRESETS["tiny"]
    assert (tiny.llm.vocab_size, tiny.bos_token_id, tiny.eos_token_id, tiny.pad_token_id) == (96, 1, 2, 2)
    assert (tiny.image_pretoken_id, tiny.image_token_id) == (SYNTH_IDS["image_pretoken"], SYNTH_IDS["image"])


def test_save_and_read_back(tmp_path):
    folder = save_synthetic(str(tmp_path), num_samples=6, seed=4, image_size=32)
    assert sorted(p.name for p in (tmp_path / "synthetic").iterdir()) == ["images", "synthetic.json", "tokenizer.json"]
    reader = make_reader("synthetic", str(tmp_path))
    ds = SyntheticDataset(6, seed=4)
    for i in range(6):
        back, orig = reader.get(i), ds[i]
        assert render_turns(back) == render_turns(orig)
        assert all(np.array_equal(np.asarray(x), np.asarray(open_image(p))) for x, p in zip(orig.images, back.images))
    tok = TextTokenizer.from_file(f"{folder}/tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.image_pretoken_id, tok.image_id) == (1, 2, 2, 94, 95)


def test_command_line_writes_the_dataset(tmp_path, capsys):
    from vchat.data.synthetic import main

    main([str(tmp_path), "--num-samples", "2", "--seed", "1", "--image-size", "24"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "synthetic")
    reader = make_reader("synthetic", str(tmp_path))
    assert len(reader) == 2 and open_image(reader.get(0).images[0]).size == (24, 24)


def test_nothing_written_unless_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    SyntheticDataset(5)[0]
    assert list(tmp_path.iterdir()) == []


def test_layout_errors_name_the_sample(tmp_path):
    root = str(tmp_path)
    conv = [{"from": "human", "value": "<image>\n<image>\nQ?"}, {"from": "gpt", "value": "A"}]
    write_json(f"{root}/synthetic/synthetic.json", [{"id": "x7", "image": ["a.png"], "conversations": conv}])
    with pytest.raises(DataError, match=r"synthetic\[0\] \(id 'x7' in .*synthetic.json\): 2 <image> marks in the "
                                        r"questions but 1 image files"):
        make_reader("synthetic", root)
    many = [{"from": "human", "value": "<image>" * 9 + "Q?"}, {"from": "gpt", "value": "A"}]
    write_json(f"{root}/synthetic/synthetic.json", [{"id": "y", "image": ["a.png"] * 9, "conversations": many}])
    with pytest.raises(DataError, match=r"9 images; a sample holds at most 8"):
        make_reader("synthetic", root)
    write_json(f"{root}/synthetic/synthetic.json", [])
    with pytest.raises(DataError, match="dataset synthetic: no usable samples"):
        make_reader("synthetic", root)
    with open(f"{root}/synthetic/synthetic.json", "w") as f:
        f.write("{not json")
    with pytest.raises(DataError, match="dataset synthetic: cannot read .*synthetic.json"):
        make_reader("synthetic", root)
