"""Bad input, tried as a user would: each row is a `vchat ...` command line -> exit status, a fragment of
the one-line message, and what is (or is not) on disk afterwards. Rows run in-process through
`vchat.cli.main` (one shared tiny checkpoint); the subprocess tests check the real command's output:
one line and no traceback, and the traceback under `--debug`."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from vchat.cli import main as vchat_main
from vchat.config import preset
from vchat.data import build_synthetic_tokenizer
from vchat.data.shapes import Shape, draw_shapes
from vchat_torch import VisualChat

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A tiny checkpoint (+ tokenizer), a NaN copy, an image, and a run folder holding the checkpoint."""
    root = tmp_path_factory.mktemp("badinput")
    torch.manual_seed(0)
    model = VisualChat(preset("tiny")).eval()
    run = root / "run"
    model.save_pretrained(str(run / "best"))
    build_synthetic_tokenizer().save(str(run / "best" / "tokenizer.json"))
    (run / "train_log.jsonl").write_text("{}\n")
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    model.save_pretrained(str(root / "nan"))
    draw_shapes([Shape("circle", "red", 4)], model.config.vision.image_size).save(root / "img.png")
    return root


def fresh(w, name: str) -> str:
    """A copy of the tiny checkpoint at w/name (made once per name)."""
    path = w / name
    if not path.exists():
        shutil.copytree(w / "run" / "best", path)
    return str(path)


def damaged(w, name: str, file: str, data: bytes | None = None) -> str:
    """A checkpoint copy whose `file` is `data`, or the first half of it when data is None."""
    path = fresh(w, name)
    target = os.path.join(path, file)
    with open(target, "rb") as f:
        old = f.read()
    with open(target, "wb") as f:
        f.write(old[: len(old) // 2] if data is None else data)
    return path


def eval_json(w, name: str, data: dict) -> str:
    path = w / f"{name}.json"
    path.write_text(json.dumps(data))
    return str(path)


def untouched(path) -> Callable:
    """The check that `path` still holds what it held before the command."""
    before = snapshot(path)
    return lambda: snapshot(path) == before


def snapshot(path) -> dict:
    path = str(path)
    if os.path.islink(path):
        return {"link": os.readlink(path)}
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return {"file": f.read()}
    return {os.path.relpath(os.path.join(d, f), path): os.path.getsize(os.path.join(d, f))
            for d, _, files in os.walk(path) for f in files}


@dataclass
class Row:
    name: str
    argv: Callable  # w -> (argv, on-disk check: () -> bool)
    status: int
    message: str  # a regex the stderr line matches


def convert(*args):
    return ["convert", "--from", "torch", "--to", "torch", *map(str, args)]


def dst_is_a_file(w):
    (w / "afile").write_text("keep me")
    return convert(fresh(w, "c1"), w / "afile", "--overwrite"), untouched(w / "afile")


def dst_is_a_symlink(w):
    os.symlink(w / "img.png", w / "alink")
    return convert(fresh(w, "c1"), w / "alink", "--overwrite"), untouched(w / "img.png")


def eval_in(w, out, data=None, *extra):
    data = data or {"t": [["What colour is the circle in image 1?", str(w / "img.png")]]}
    return ["eval", fresh(w, "ck"), eval_json(w, "ev", data), "--output_filename", str(out), "--max_new_tokens", "2",
            *extra]


def no_file(path):
    return lambda: not os.path.exists(path) and not [f for f in os.listdir(os.path.dirname(path)) if ".tmp" in f]


ROWS = [
    # convert never deletes anything but DST
    Row("convert DST = SRC's parent", lambda w: (convert(w / "run" / "best", w / "run", "--overwrite"),
                                                  untouched(w / "run")), 1, r"DST .*run contains SRC"),
    Row("convert DST inside SRC", lambda w: (convert(fresh(w, "c1"), w / "c1" / "sub"), untouched(w / "c1")),
        1, r"DST .*sub is inside SRC"),
    Row("convert DST a regular file", dst_is_a_file, 1, r"afile exists and is not a directory.*nothing written"),
    Row("convert DST a symlink", dst_is_a_symlink, 1, r"alink is a symlink"),
    Row("convert DST a folder that is no checkpoint", lambda w: (convert(fresh(w, "c1"), w / "run", "--overwrite"),
                                                                untouched(w / "run")), 1, r"no config.json"),
    Row("convert truncated safetensors", lambda w: (convert(damaged(w, "trunc", "model.safetensors"), w / "o1"),
                                                    no_file(w / "o1")), 1, r"trunc/model.safetensors: truncated"),
    Row("convert garbage safetensors", lambda w: (convert(damaged(w, "garb", "model.safetensors", b"garbage!" * 9),
                                                          w / "o2"), no_file(w / "o2")),
        1, r"garb/model.safetensors: not a safetensors file"),
    Row("convert garbage config.json", lambda w: (convert(damaged(w, "cfg", "config.json", b"{oops"), w / "o3"),
                                                  no_file(w / "o3")), 1, r"cfg/config.json: not valid JSON"),
    Row("convert a NaN tensor", lambda w: (convert(w / "nan", w / "o4"), no_file(w / "o4")),
        1, r"1 of \d+ tensors hold NaN or Inf \(.*\); --allow_nonfinite"),
    Row("convert a NaN tensor, allowed", lambda w: (convert(w / "nan", w / "o5", "--allow_nonfinite"),
                                                    lambda: os.path.isfile(w / "o5" / "config.json")), 0, r"^$"),
    # eval checks everything before the first answer
    Row("eval --max_new_tokens -1", lambda w: (eval_in(w, w / "e1.csv", None, "--max_new_tokens", "-1"),
                                              no_file(w / "e1.csv")), 2, r"--max_new_tokens: must be at least 1"),
    Row("eval --max_new_tokens past the context", lambda w: (eval_in(w, w / "e2.csv", None, "--max_new_tokens",
                                                                     "5000"), no_file(w / "e2.csv")),
        1, r"--max_new_tokens 5000: must be less than the model's context, max_position_embeddings = 1024"),
    Row("eval output is a directory", lambda w: (eval_in(w, w / "run"), untouched(w / "run")), 1,
        r"--output_filename .*run: is a directory"),
    Row("eval output folder missing", lambda w: (eval_in(w, w / "nowhere" / "e.csv"),
                                                 lambda: not (w / "nowhere").exists()), 1, r"nowhere does not exist"),
    Row("eval missing image in a later test", lambda w: (eval_in(w, w / "e3.csv", {
        "first": [["What is in image 1?", str(w / "img.png")]],
        "late": [["And now?"], ["What is in image 1?", "gone.png"]]}), no_file(w / "e3.csv")),
        1, r"ev.json: test 'late' round 2 image 1: image file .*gone.png not found"),
    Row("eval empty question", lambda w: (eval_in(w, w / "e4.csv", {"t": [["Hi?"], ["  "]]}), no_file(w / "e4.csv")),
        1, r"test 't' round 2: the question is empty"),
    Row("eval special strings in the question are text", lambda w: (eval_in(w, w / "e5.csv", {"t": [
        ["Is <image> ### Image: </s> in image 1?", str(w / "img.png")], ["### Image 2: <image> <question>"]]}),
        lambda: len(list(csv.DictReader(open(w / "e5.csv")))) == 2), 0, r"^$"),
    Row("chat missing checkpoint", lambda w: (["chat", str(w / "nope")], lambda: True), 1,
        r"nope: no such checkpoint directory"),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_bad_input(w, row, capsys):
    argv, on_disk = row.argv(w)
    status = _exits(argv) if row.status == 2 else vchat_main(argv)
    assert status == row.status
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert re.search(row.message, lines[-1] if lines else ""), err
    if row.status == 1:
        assert len(lines) == 1 and "Traceback" not in err, err
    assert on_disk(), f"{row.name}: disk state"


def _exits(argv) -> int:
    with pytest.raises(SystemExit) as e:  # argparse's own usage error
        vchat_main(argv)
    return e.value.code


def test_chat_asks_an_empty_question_again_and_reads_special_strings_as_text(w, monkeypatch, capsys):
    lines = ["na", "", "   ", "Is <image> or ### Image: here?", "quit"]
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    assert vchat_main(["chat", fresh(w, "ck"), "--max_new_tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("text ('quit' to exit") == 3 and out.count("=========== Round") == 1, out


def test_eval_keeps_the_answers_of_earlier_tests(w, monkeypatch):
    """A failure in the third test leaves the CSV with the first two tests' answers; the error names
    the test and round."""
    from vchat_torch.chat import ChatSession

    ask = ChatSession.ask

    def failing(self, question, images=None):
        if question == "boom":
            raise RuntimeError("the device fell over")
        return ask(self, question, images)

    monkeypatch.setattr(ChatSession, "ask", failing)
    out = w / "kept.csv"
    argv = eval_in(w, out, {"a": [["Hi?"]], "b": [["What is in image 1?", str(w / "img.png")], ["More?"]],
                            "c": [["Fine?"], ["boom"]]})
    with pytest.raises(RuntimeError, match=r"ev.json: test 'c' round 2: the device fell over; the "
                                           r"answers of the 2 tests before it are in .*kept.csv"):
        vchat_main(argv)
    assert [r["test_name"] for r in csv.DictReader(open(out))] == ["a", "b", "b"]


def test_real_command_prints_one_line_and_debug_shows_the_traceback(w):
    os.symlink(w / "img.png", w / "link2")
    argv = [sys.executable, "-m", "vchat.cli", *convert(fresh(w, "c1"), w / "link2")]
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "link2 is a symlink" in r.stderr, r.stderr
    r = subprocess.run(argv + ["--debug"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" in r.stderr and "ConvertError: DST" in r.stderr, r.stderr
