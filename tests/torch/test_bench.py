"""`vchat bench` runs every comparison on a tiny model and reports them (no timing is asserted)."""

import json

from vchat.cli import main as vchat_main
from vchat.config import preset
from vchat_torch.bench import compare, make_batch


def test_bench_reports_every_row(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert vchat_main(["bench", "--preset", "tiny", "--batch", "2", "--images", "2", "--text", "8",
                       "--new_tokens", "2", "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["bench"] for r in rows] == ["train step (fwd+bwd)", "generate 2 tokens", "3-round chat", "forward"]
    assert all(r["a_seconds"] > 0 and r["b_seconds"] > 0 for r in rows)
    assert all(abs(r["ratio_b_over_a"] - r["b_seconds"] / r["a_seconds"]) < 1e-12 for r in rows)
    text = capsys.readouterr().out
    assert "MMCA/causal" in text and "re-encode/KV cache" in text and "JAX/torch" in text


def test_compare_alternates_and_takes_medians():
    calls = []
    ta, tb = compare(lambda: calls.append("a"), lambda: calls.append("b"), repeats=3)
    assert calls == ["a", "b"] * 4 and ta >= 0 and tb >= 0  # one warm-up pair, then 3 alternating pairs


def test_batch_layout():
    cfg = preset("tiny")
    b = make_batch(cfg, batch=2, images=3, text=5)
    ids = b["input_ids"]
    assert ids.shape == (2, 1 + 3 * 7 + 5) and b["images"].shape[0] == 6 and b["image_num"] == [3, 3]
    assert ((ids == cfg.image_token_id).sum(1) == 3).all() and ((ids == cfg.image_pretoken_id).sum(1) == 3).all()
    text = ids[:, 1:][(ids[:, 1:] != cfg.image_token_id) & (ids[:, 1:] != cfg.image_pretoken_id)]
    assert text.min() >= 3 and text.max() < cfg.image_pretoken_id
