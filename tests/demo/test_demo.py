"""The demo's scoring helpers, and (slow) the whole demo on a small budget."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from demo.run import parse_curriculum
from demo.scoring import Question, accuracy, left_pad, right_pad

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def q(ids, answer, kind):
    return Question(np.array(ids), np.zeros((0, 3, 4, 4), np.float32), answer, kind)


def test_accuracy_is_exact_match_per_kind():
    qs = [q([1, 5], "red", "colour"), q([1, 6, 7], "two", "count"), q([1], "3", "which"), q([1], "blue", "colour")]
    r = accuracy(["red", "two ", "3", "green"], qs)
    assert r["accuracy"] == 0.5 and r["by_kind"] == {"colour": 0.5, "count": 0.0, "which": 1.0}


def test_left_pad():
    ids, mask = left_pad([q([1, 5], "a", "colour"), q([1, 6, 7], "b", "count")], pad_id=2)
    assert ids.tolist() == [[2, 1, 5], [1, 6, 7]] and mask.tolist() == [[0, 1, 1], [1, 1, 1]]


def test_right_pad():
    ids, mask = right_pad([q([1, 5], "a", "colour"), q([1, 6, 7], "b", "count")], pad_id=2)
    assert ids.tolist() == [[1, 5, 2], [1, 6, 7]] and mask.tolist() == [[1, 1, 0], [1, 1, 1]]


def test_parse_curriculum():
    assert parse_curriculum("1:1200,2:5,4:7") == [(1, 1200), (2, 5), (4, 7)]
    for bad in ("1-1200", "5:10", "1:0", "a:b"):
        with pytest.raises(SystemExit, match="--curriculum"):
            parse_curriculum(bad)


@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "vchat.cli", "demo", "--out", str(out), "--samples", "300",
                        "--curriculum", "1:15,4:15", "--eval_questions", "48"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, DS_ACCELERATOR="cpu"), timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["goldens_ok"] and report["answers_agree"]
    assert report["torch_jax_max_abs_logit_diff"] <= 1e-4
    assert 0 <= report["accuracy_before"] <= report["accuracy_after"] <= 1
    assert "Round 2" in report["chat_transcript"] and os.path.exists(report["loss_curve"])
