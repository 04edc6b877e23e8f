"""`vchat check-logits` as a user runs it."""

import os
import shutil
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def vchat(*args):
    return subprocess.run([sys.executable, "-m", "vchat.cli", *args], cwd=ROOT, capture_output=True, text=True)


def test_check_logits_passes_and_fails(golden_dir, tmp_path):
    good = os.path.join(golden_dir, "qwen-mmca")
    bad = tmp_path / "qwen-tampered"
    shutil.copytree(good, bad)
    sd = torch.load(bad / "pytorch_model.bin", weights_only=True)
    sd["projection.1.bias"] = sd["projection.1.bias"] + 1e-3
    torch.save(sd, bad / "pytorch_model.bin")
    empty = tmp_path / "empty"
    empty.mkdir()

    r = vchat("check-logits", good, str(bad), str(empty))
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert any(ln.startswith("[ok]") and "qwen-mmca " in ln for ln in lines), r.stdout
    assert any(ln.startswith("[FAIL]") and "qwen-tampered" in ln for ln in lines), r.stdout
    assert any("missing meta.json" in ln for ln in lines), r.stdout
    assert "1 of 3 cases within tolerance" in r.stdout

    ok = vchat("check-logits", golden_dir, "--atol", "1e-5")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "6 of 6 cases within tolerance" in ok.stdout
