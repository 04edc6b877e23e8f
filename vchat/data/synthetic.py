"""The built-in synthetic multi-image dataset and its word-level tokenizer.

Not in the reference (it ships no data); it exists so training, chat and the tests run with no
download. Each sample has 1-4 images of coloured shapes (`vchat.data.shapes`) shown over 1-3 turns,
and one question per turn whose answer needs the pictures:

    What colour is the {circle,square,triangle} in image k?   red | green | blue | yellow  (chance 1/4)
    How many {circles,squares,triangles} are in image k?   zero..three     (chance 1/4)
    Which image has a {colour} {shape}?   1..m | none, asked with m >= 3 images shown (chance <= 1/4)

A question "owns" the images it is about: their content is drawn from the answer (the answer
first, uniform, then a picture that makes it true), and no two questions share an image, so every
answer is uniform given its question. Every image, owned or not, holds 1-3 shapes, so nothing but
its "### Image k:" label tells which image a question is about: with a lone shape in the pictures
that colour questions ask about (the first design), a model learned "the image with one shape"
and never learned to find image k. Images are numbered in the order they are shown, as
"### Image k:" labels them. The dataset is a pure function of (seed, index); nothing is written
unless `save_synthetic` is called. Do not concatenate it (`--dataset_concatenate_samples 1`):
"image k" in a question counts from its own sample.
"""

from __future__ import annotations

import json
import os
import random
from typing import TYPE_CHECKING

from vchat.checkpoint_files import TOKENIZER_NAME
from vchat.data.readers.base import Reader
from vchat.data.sample import Sample, Turn, stable_seed
from vchat.data.shapes import COLOURS, SHAPES, Shape, draw_shapes
from vchat.io import writing_file
from vchat.template import DEFAULT_HUMAN_IMAGE_PRETOKEN, DEFAULT_IMAGE_TOKEN, MAX_IMAGES, Round, build_conversation

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from vchat.data.tokenizer import TextTokenizer

COUNT_WORDS = ("zero", "one", "two", "three")
NONE_ANSWER = "none"
MAX_SAMPLE_IMAGES = 4
MAX_TURNS = 3


def _question(kind: str, **kw) -> str:
    if kind == "colour":
        return f"What colour is the {kw['shape']} in image {kw['image']}?"
    if kind == "count":
        return f"How many {kw['shape']}s are in image {kw['image']}?"
    return f"Which image has a {kw['colour']} {kw['shape']}?"


def _scene(rng: random.Random, kinds_colours: list[tuple[str, str]]) -> tuple[Shape, ...]:
    cells = rng.sample(range(9), len(kinds_colours))
    return tuple(Shape(k, c, cell, (rng.randint(0, 1), rng.randint(0, 1)))
                 for (k, c), cell in zip(kinds_colours, cells))


def _random_pairs(rng: random.Random, n: int, exclude: tuple[str, str] | None = None) -> list[tuple[str, str]]:
    pairs = [(k, c) for k in SHAPES for c in COLOURS if (k, c) != exclude]
    return [rng.choice(pairs) for _ in range(n)]


def _plan(rng: random.Random, max_images: int = MAX_SAMPLE_IMAGES):
    """One try at a conversation plan: images shown per turn and one question per turn, or None."""
    n_images, n_turns = rng.randint(1, max_images), rng.randint(1, MAX_TURNS)
    shown = [1] + [0] * (n_turns - 1)
    for _ in range(n_images - 1):
        shown[rng.randrange(n_turns)] += 1
    scenes: list = [None] * n_images
    questions = []
    avail = 0
    for t in range(n_turns):
        avail += shown[t]
        free = [k for k in range(avail) if scenes[k] is None]
        options = ["colour", "count"] if free else []
        if avail >= 3 and len(free) == avail:
            options.append("which")
        if not options:
            return None
        kind = "which" if "which" in options and rng.random() < 0.5 else rng.choice(options[:2])
        if kind == "colour":
            k, colour, shape = rng.choice(free), rng.choice(list(COLOURS)), rng.choice(SHAPES)
            others = [s for s in SHAPES if s != shape]
            pairs = [(shape, colour)] + [(rng.choice(others), rng.choice(list(COLOURS)))
                                         for _ in range(rng.randint(0, 2))]
            rng.shuffle(pairs)
            scenes[k] = _scene(rng, pairs)
            questions.append((_question("colour", image=k + 1, shape=shape), colour))
        elif kind == "count":
            k, shape, count = rng.choice(free), rng.choice(SHAPES), rng.randrange(4)
            total = rng.randint(max(count, 1), 3)
            others = [s for s in SHAPES if s != shape]
            pairs = [(shape, rng.choice(list(COLOURS))) for _ in range(count)]
            pairs += [(rng.choice(others), rng.choice(list(COLOURS))) for _ in range(total - count)]
            rng.shuffle(pairs)
            scenes[k] = _scene(rng, pairs)
            questions.append((_question("count", image=k + 1, shape=shape), COUNT_WORDS[count]))
        else:
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            answer = rng.randrange(avail + 1)  # avail means "none"
            for k in range(avail):
                pairs = _random_pairs(rng, rng.randint(1, 3), exclude=(shape, colour))
                if k == answer:
                    pairs[rng.randrange(len(pairs))] = (shape, colour)
                scenes[k] = _scene(rng, pairs)
            word = NONE_ANSWER if answer == avail else str(answer + 1)
            questions.append((_question("which", colour=colour, shape=shape), word))
    for k in range(n_images):
        if scenes[k] is None:
            scenes[k] = _scene(rng, _random_pairs(rng, rng.randint(1, 3)))
    return shown, scenes, questions


class SyntheticDataset(Reader):
    """`num_samples` synthetic conversations; `dataset[i]` is a `Sample` with PIL images.

    `max_images` (1-4) caps the images of a sample: the trainers pass `--max_num_image_per_sample`,
    so a run can start on one-image conversations and go on to more (a curriculum, as `vchat demo`
    does). The default, 4, gives the dataset described above.
    """

    name = "synthetic"

    def __init__(self, num_samples: int = 1000, seed: int = 0, image_size: int = 32,
                 max_images: int = MAX_SAMPLE_IMAGES):
        super().__init__(root="")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not 1 <= max_images <= MAX_SAMPLE_IMAGES:
            raise ValueError(f"max_images must be in 1..{MAX_SAMPLE_IMAGES}, got {max_images}")
        self.items = list(range(num_samples))
        self.seed, self.image_size = seed, image_size  # the content depends on neither rng nor epoch
        self.max_images = max_images

    def plan(self, index: int):
        """(images shown per turn, scenes, [(question, answer)]) of sample `index`."""
        rng = random.Random(stable_seed(self.seed, "synthetic", index))
        while True:
            plan = _plan(rng, self.max_images)
            if plan is not None:
                return plan

    def sample(self, index: int, rng: random.Random | None = None) -> Sample:
        shown, scenes, questions = self.plan(index)
        images = [draw_shapes(s, self.image_size) for s in scenes]
        turns, k = [], 0
        for n, (q, a) in zip(shown, questions):
            turns.append(Turn(tuple(images[k:k + n]), q, a))
            k += n
        return Sample(tuple(turns), origin=self.origin(index), meta={"scenes": scenes})


def save_synthetic(directory: str, num_samples: int = 1000, seed: int = 0, image_size: int = 32) -> str:
    """Write the dataset as `<directory>/synthetic/{synthetic.json, images/*.png, tokenizer.json}`,
    readable back with `make_reader("synthetic", directory)`. Returns the dataset folder."""
    ds = SyntheticDataset(num_samples, seed, image_size)
    out = os.path.join(directory, "synthetic")
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    records = []
    for i in range(len(ds)):
        s = ds[i]
        files, conv, k = [], [], 0
        for turn in s.turns:
            for img in turn.images:
                name = f"images/{i:06d}_{k}.png"
                img.save(os.path.join(out, name))
                files.append(name)
                k += 1
            conv.append({"from": "human", "value": f"{DEFAULT_IMAGE_TOKEN}\n" * len(turn.images) + turn.question})
            conv.append({"from": "gpt", "value": turn.answer})
        records.append({"id": f"{i:06d}", "image": files, "conversations": conv})
    with writing_file(os.path.join(out, "synthetic.json")) as f:
        json.dump(records, f, indent=1)
    build_synthetic_tokenizer().save(os.path.join(out, TOKENIZER_NAME))
    return out


# -- tokenizer -----------------------------------------------------------------------------------

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
SYNTH_IDS = {"unk": 0, "bos": 1, "eos": 2, "pad": 2, "image_pretoken": 94, "image": 95}
SYNTH_VOCAB_SIZE = 96  # the "tiny" preset's vocabulary: "### Image:" = 94, "<image>" = 95


def synthetic_corpus() -> list[str]:
    """Every string the synthetic data and the template can produce (so nothing maps to <unk>)."""
    rounds = [Round(question="", num_images=MAX_IMAGES, answer="")]
    lines = [text.replace(DEFAULT_IMAGE_TOKEN, " ") for text, _ in build_conversation(rounds)]
    for k in range(1, MAX_SAMPLE_IMAGES + 1):
        lines += [_question(q, image=k, shape=s) for q in ("colour", "count") for s in SHAPES]
    lines += [_question("which", colour=c, shape=s) for c in COLOURS for s in SHAPES]
    lines += list(COLOURS) + list(COUNT_WORDS) + [NONE_ANSWER] + [str(k) for k in range(1, MAX_IMAGES + 1)]
    return lines


def build_synthetic_tokenizer() -> Tokenizer:
    """A word-level `tokenizers.Tokenizer` trained on `synthetic_corpus()`: <unk>=0, <s>=1, </s>=2,
    the words, unused fillers up to 94, then "### Image:"=94 and "<image>"=95 (96 ids in all)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(synthetic_corpus(), trainers.WordLevelTrainer(special_tokens=[UNK, BOS, EOS]))
    learned = tok.get_vocab()
    words = sorted((w for w in learned if w not in (UNK, BOS, EOS)), key=lambda w: (learned[w], w))
    first_added = SYNTH_IDS["image_pretoken"]
    if len(words) + 3 > first_added:
        raise ValueError(f"the synthetic vocabulary ({len(words) + 3}) does not fit below id {first_added}")
    vocab = {UNK: 0, BOS: 1, EOS: 2, **{w: 3 + i for i, w in enumerate(words)}}
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), first_added)})
    final = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    final.pre_tokenizer = pre_tokenizers.Whitespace()
    final.add_special_tokens([AddedToken(t, special=True) for t in (UNK, BOS, EOS)])
    final.add_special_tokens([AddedToken(DEFAULT_HUMAN_IMAGE_PRETOKEN, special=True, normalized=False),
                              AddedToken(DEFAULT_IMAGE_TOKEN, special=True, normalized=False)])
    assert final.token_to_id(DEFAULT_IMAGE_TOKEN) == SYNTH_IDS["image"]
    assert final.get_vocab_size() == SYNTH_VOCAB_SIZE
    return final


def synthetic_text_tokenizer() -> TextTokenizer:
    """`build_synthetic_tokenizer()` wrapped as a `TextTokenizer` with its ids."""
    from vchat.data.tokenizer import TextTokenizer

    i = SYNTH_IDS
    return TextTokenizer.wrap(build_synthetic_tokenizer(), bos_id=i["bos"], eos_id=i["eos"], pad_id=i["pad"],
                              image_id=i["image"], image_pretoken_id=i["image_pretoken"])


def main(argv: list[str] | None = None) -> None:
    """Write the synthetic dataset to disk.

        python -m vchat.data data/ --num-samples 2000 --seed 0 --image-size 32
    """
    import argparse

    p = argparse.ArgumentParser(description="Write the built-in synthetic multi-image dataset")
    p.add_argument("directory", help="data root; the dataset goes to <directory>/synthetic/")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=32)
    a = p.parse_args(argv)
    print(save_synthetic(a.directory, a.num_samples, a.seed, a.image_size))
