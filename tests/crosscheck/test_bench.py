"""`vchat bench` on a tiny model: every configuration, length and measure reported (no timing is asserted)."""

import json

import numpy as np

from crosscheck.bench import compare, make_batch, peak_rss
from vchat.cli import main as vchat_main
from vchat.config import preset
from vchat.splice import plan_splice


def test_bench_reports_every_configuration(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert vchat_main(["bench", "--preset", "tiny", "--lengths", "64", "--batch", "2", "--images", "2",
                       "--repeats", "1", "--decode_tokens", "3", "--no-rss", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["L"] for r in result["rows"]] == [64] and result["runners"] == ["anchor", "torch", "jax"]
    for r in result["rows"]:
        assert all(r["seconds"][n] > 0 and r["decode_tokens_per_s"][n] > 0 for n in result["runners"])
        assert all(abs(r["step_ratio"][n] - r["seconds"][n] / r["seconds"]["anchor"]) < 1e-12 for n in r["seconds"])
    assert (tmp_path / "bench.png").stat().st_size > 0
    text = capsys.readouterr().out
    assert "L=64" in text and "tok/s" in text and "bench.png" in text


def test_peak_rss_runs_in_a_process_of_its_own():
    argv = ["--preset", "tiny", "--batch", "1", "--images", "1"]
    mib = peak_rss(argv, "anchor", 32)
    assert 50 < mib < 4096


def test_compare_alternates_and_takes_medians():
    calls = []
    t = compare({"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "c": lambda: calls.append("c")},
                repeats=3)
    assert calls == ["a", "b", "c"] * 4 and set(t) == {"a", "b", "c"}  # one warm-up round, then 3 in turn


def test_batch_has_the_asked_spliced_length():
    cfg = preset("tiny")
    b = make_batch(cfg, batch=2, images=3, length=128)
    ids = b["input_ids"]
    assert b["images"].shape[0] == 6 and b["image_num"] == [3, 3]
    assert ((ids == cfg.image_token_id).sum(1) == 3).all() and ((ids == cfg.image_pretoken_id).sum(1) == 3).all()
    text = ids[:, 1:][(ids[:, 1:] != cfg.image_token_id) & (ids[:, 1:] != cfg.image_pretoken_id)]
    assert text.min() >= 3 and text.max() < cfg.image_pretoken_id
    plan = plan_splice(ids, b["attention_mask"], np.array(b["image_num"]), cfg.image_tokens, cfg.image_token_id,
                       cfg.pad_token_id, b["labels"], pad_multiple=1)
    assert plan.modality.shape == (2, 128) and ((plan.modality == 2).sum(1) == 3 * cfg.image_tokens).all()
