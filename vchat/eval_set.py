"""The reference's eval file, checked whole before any answer is generated, and the answers' CSV
written as the eval goes.

The file is `{"test name": [["question", "img1 [img2 ...]"], ["follow-up"], ...]}` (image paths
relative to the JSON's folder unless absolute). `read_eval_json` refuses, naming the test and round,
a malformed entry, an empty question, a chat of more than 8 images and an image file that is missing
or unreadable; `check_output` refuses an output path that is a directory or whose folder is missing
or not writable. `AnswerLog` rewrites the CSV atomically after each test (`vchat.io.writing_file`),
so a failure late in a long eval keeps the answers of every test before it.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile

from vchat.data.sample import open_image
from vchat.errors import UserError
from vchat.io import writing_file
from vchat.template import MAX_IMAGES

CSV_COLUMNS = ["test_name", "image_path", "question", "answer"]
Tests = dict[str, list[tuple[str, list[str]]]]


def where(path: str, test: str, round_: int) -> str:
    """How errors name a round: `eval.json: test 'name' round 2`."""
    return f"{path}: test {test!r} round {round_}"


def read_eval_json(path: str, check_images: bool = True) -> Tests:
    """The reference's eval file -> {test: [(question, [image paths])]}; every error names the file,
    the test and the round. With `check_images` every image is then opened once (and dropped) here."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise UserError(f"{path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: expected an object of tests, {{\"name\": [[\"question\", \"images\"], ...]}}")
    base = os.path.dirname(os.path.abspath(path))
    tests = {}
    for name, rounds in data.items():
        if not isinstance(rounds, list) or not rounds:
            raise UserError(f"{path}: test {name!r} has no rounds")
        parsed, n_images = [], 0
        for r, entry in enumerate(rounds, 1):
            if not (isinstance(entry, list) and 1 <= len(entry) <= 2 and all(isinstance(x, str) for x in entry)):
                raise UserError(f"{where(path, name, r)}: expected [\"question\"] or [\"question\", \"image paths\"], "
                                f"got {entry!r}")
            if not entry[0].strip():
                raise UserError(f"{where(path, name, r)}: the question is empty")
            named = entry[1].split() if len(entry) == 2 else []
            images = [p if os.path.isabs(p) else os.path.join(base, p) for p in named]
            n_images += len(images)
            if n_images > MAX_IMAGES:
                raise UserError(f"{where(path, name, r)} brings the chat to {n_images} images (at most {MAX_IMAGES})")
            parsed.append((entry[0], images))
        tests[name] = parsed
    for name, rounds in tests.items() if check_images else ():
        for r, (_, images) in enumerate(rounds, 1):
            for k, image in enumerate(images, 1):
                open_image(image, f"{where(path, name, r)} image {k}")
    return tests


def check_output(path: str, flag: str = "--output_filename") -> str:
    """The absolute output path, once its folder is known to exist and take a new file; a path that
    is a directory, or a folder missing or read-only, is refused naming the flag."""
    out = os.path.abspath(path)
    folder = os.path.dirname(out)
    if os.path.isdir(out):
        raise UserError(f"{flag} {path}: is a directory (give a file name)")
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: the folder {folder} does not exist")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {folder} ({e.strerror})") from None
    return out


class AnswerLog:
    """The eval's CSV (the reference's columns), rewritten atomically with every answer so far at each
    `add`; an existing file is replaced only by the first `add`."""

    def __init__(self, path: str):
        self.path, self.rows = path, []

    def add(self, rows: list[dict]) -> None:
        self.rows += rows
        with writing_file(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            w.writeheader()
            w.writerows(self.rows)
