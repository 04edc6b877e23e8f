"""`vchat chat` and `vchat eval` on a saved tiny checkpoint: the CLI's answers are a session's answers,
rounds, numbering, paths and the CSV are the reference's, and bad input is named."""

import csv
import io
import json
import re

import pytest
import torch

from vchat.cli import main as vchat_main
from vchat.config import preset
from vchat.data import ImageProcessor, build_synthetic_tokenizer, synthetic_text_tokenizer
from vchat.data.shapes import Shape, draw_shapes
from vchat_torch import VisualChat
from vchat_torch.chat import ChatSession
from vchat_torch.cli import chat_loop


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("chatcli")
    torch.manual_seed(3)
    model = VisualChat(preset("tiny")).eval()
    model.save_pretrained(str(root / "ckpt"))
    build_synthetic_tokenizer().save(str(root / "ckpt" / "tokenizer.json"))
    size = model.config.vision.image_size
    for i, (kind, colour) in enumerate([("circle", "red"), ("square", "blue"), ("triangle", "green")]):
        draw_shapes([Shape(kind, colour, 4)], size).save(root / f"img{i}.png")
    return root, model


def session_answers(model, rounds, root, max_new_tokens=4):
    """What a ChatSession answers for [(question, [image file names])]."""
    proc = ImageProcessor.for_vision(model.config.vision)
    chat = ChatSession(model, synthetic_text_tokenizer(), max_new_tokens=max_new_tokens)
    return [chat.ask(q, proc.batch([str(root / p) for p in paths]) if paths else None) for q, paths in rounds]


def run_chat(monkeypatch, capsys, root, lines):
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    assert vchat_main(["chat", str(root / "ckpt"), "--max_new_tokens", "4"]) == 0
    return capsys.readouterr().out


def answers_in(out):
    lines = out.splitlines()
    return [lines[i + 1].split(": ")[-1] for i, line in enumerate(lines) if line.endswith("===========")]


def test_chat_rounds_match_a_session(ckpt, monkeypatch, capsys):
    root, model = ckpt
    out = run_chat(monkeypatch, capsys, root, [
        f"{root / 'img0.png'} {root / 'img1.png'}", "What colour is the circle in image 1?",
        "na", "How many squares are in image 2?",
        str(root / "missing.png"),  # a bad path asks again
        str(root / "img2.png"), "Which image has a green triangle?",
        "quit"])
    assert "=========== Round 3 ===========" in out and "Round 4" not in out
    assert "missing.png not found; try again" in out
    want = session_answers(model, [("What colour is the circle in image 1?", ["img0.png", "img1.png"]),
                                   ("How many squares are in image 2?", []),
                                   ("Which image has a green triangle?", ["img2.png"])], root)
    assert answers_in(out) == want


def test_chat_loop_rounds_images_and_numbering(ckpt):
    """Which images go with which round, read back from the session the loop drove."""
    root, model = ckpt
    lines = iter([f"{root / 'img0.png'} {root / 'img1.png'}", "What colour is the circle in image 1?",
                  "", "How many squares are in image 2?", "bogus.png", "na", "Which image has a red circle?",
                  str(root / "img2.png"), "What colour is the triangle in image 3?"])
    said = []
    chat = chat_loop(ChatSession(model, synthetic_text_tokenizer(), max_new_tokens=2),
                     ImageProcessor.for_vision(model.config.vision), lambda _: next(lines, None), said.append)
    assert [(t.question.split()[-1], t.num_images) for t in chat.turns] == [("1?", 2), ("2?", 0), ("circle?", 0),
                                                                             ("3?", 1)]
    assert chat.num_images == 3 and int((chat.modality == 2).sum()) == 3 * model.config.image_tokens
    assert "User [image 3]: What colour is the triangle in image 3?" in chat.transcript()
    assert any("bogus.png not found; try again" in s for s in said)


def test_chat_clear_and_image_limit(ckpt, monkeypatch, capsys):
    root, model = ckpt
    nine = " ".join([str(root / "img0.png")] * 9)
    out = run_chat(monkeypatch, capsys, root, [
        nine,  # refused: more than 8 images
        str(root / "img1.png"), "What colour is the square in image 1?",
        "na", "clear",
        str(root / "img0.png"), "What colour is the circle in image 1?"])  # EOF ends the chat
    assert "at most 8 images" in out and "cleared" in out
    # after "clear" the numbering and history start again: round 1 of a fresh session
    fresh = session_answers(model, [("What colour is the circle in image 1?", ["img0.png"])], root)
    assert answers_in(out)[-1] == fresh[0] and out.count("Round 1 ===") == 2


def test_eval_writes_the_reference_csv(ckpt, tmp_path):
    root, model = ckpt
    data = {"single": [["What colour is the circle in image 1?", "img0.png"]],
            "multi": [["What colour is the square in image 2?", "img0.png img1.png"],
                      ["How many triangles are in image 3?", str(root / "img2.png")],
                      ["Which image has a red circle?"]]}
    (root / "eval.json").write_text(json.dumps(data))
    out = tmp_path / "answers.csv"
    assert vchat_main(["eval", str(root / "ckpt"), str(root / "eval.json"), "--output_filename", str(out),
                       "--max_new_tokens", "4"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["test_name", "image_path", "question", "answer"]
    assert [r["test_name"] for r in rows] == ["single", "multi", "multi", "multi"]
    assert rows[1]["image_path"] == f"{root / 'img0.png'} {root / 'img1.png'}" and rows[3]["image_path"] == ""
    assert [r["answer"] for r in rows[:1]] == session_answers(model, [(data["single"][0][0], ["img0.png"])], root)
    assert [r["answer"] for r in rows[1:]] == session_answers(model, [
        (data["multi"][0][0], ["img0.png", "img1.png"]), (data["multi"][1][0], ["img2.png"]),
        (data["multi"][2][0], [])], root)


def test_eval_bad_input_is_named(ckpt, tmp_path, capsys):
    """A user error is one line on stderr and exit status 1 (vchat/cli.py)."""
    root, _ = ckpt
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"t1": [["q?", "img0.png"], [3]]}))
    assert vchat_main(["eval", str(root / "ckpt"), str(bad), "--output_filename", str(tmp_path / "x.csv")]) == 1
    assert re.search(r"test 't1' round 2: expected", capsys.readouterr().err)
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"t2": [["q?", "nowhere.png"]]}))
    assert vchat_main(["eval", str(root / "ckpt"), str(missing), "--output_filename", str(tmp_path / "x.csv")]) == 1
    assert re.search(r"test 't2' round 1 image 1: image file .*nowhere.png not found", capsys.readouterr().err)
    assert not (tmp_path / "x.csv").exists()
    assert vchat_main(["eval", str(root / "ckpt"), str(missing), "--tokenizer", str(tmp_path / "none.json"),
                       "--output_filename", str(tmp_path / "x.csv")]) == 1
    assert "no tokenizer" in capsys.readouterr().err
