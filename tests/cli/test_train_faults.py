"""Trainer faults and bad input, tried as a user would: each row is a `vchat train` or `vchat train-jax`
command line -> exit status, a fragment of its message, and what is (or is not) on disk afterwards.

The rows refused before any work run in-process (`vchat.cli.main`); the rows that train run the real
command (`vchat train` in a subprocess, DeepSpeed's process group being per process; `vchat train-jax`
in-process), on the tiny preset and a few dozen synthetic samples, against one interrupted run each.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

from vchat.cli import main as vchat_main
from vchat.run_guard import RunLock

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
TINY = ["--lm_model_name_or_path", "tiny", "--dataset_names", "synthetic", "--synthetic_samples", "24",
        "--per_device_train_batch_size", "4", "--num_train_epochs", "1", "--quiet", "--learning_rate", "1e-2"]
TORCH = ["train", *TINY, "--precision", "fp32"]
JAX = ["train-jax", *TINY, "--max_seq_len", "256", "--max_num_image_per_sample", "2"]


@dataclass
class Row:
    name: str
    argv: Callable  # tmp_path -> (argv, on-disk check: () -> bool)
    status: int
    message: str  # a regex the last stderr line matches


def in_process(argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, last line of stderr) of `vchat <argv>` run in this process."""
    try:
        status = vchat_main(argv)
    except SystemExit as e:  # a flag refused while parsing: `prog: message`, exit status 1
        status, said = (1, str(e.code)) if isinstance(e.code, str) else (e.code, "")
        print(said, file=sys.stderr)
    lines = capsys.readouterr().err.strip().splitlines()
    return status, lines[-1] if lines else ""


def nothing_at(path) -> Callable:
    return lambda: not os.path.exists(path)


def a_file(tmp_path):
    (tmp_path / "afile").write_text("keep")
    return [*TORCH, "--output_dir", str(tmp_path / "afile")], lambda: (tmp_path / "afile").read_text() == "keep"


def ds_config(tmp_path, entries: dict):
    (tmp_path / "ds.json").write_text(json.dumps(entries))
    out = tmp_path / "o"
    return [*TORCH, "--output_dir", str(out), "--deepspeed_config", str(tmp_path / "ds.json")], nothing_at(out)


def held(tmp_path):
    """An output_dir another run holds (the lock as that run took it)."""
    out = tmp_path / "busy"
    lock = RunLock(str(out), command="vchat train --output_dir busy (the first run)").acquire()
    return [*TORCH, "--output_dir", str(out)], lambda: lock.release() or os.listdir(out) == [".lock"]


def flag(*flags, trainer=TORCH):
    return lambda tmp_path: ([*trainer, "--output_dir", str(tmp_path / "o"), *flags], nothing_at(tmp_path / "o"))


REFUSED = [  # before any work: nothing is written, not even the output directory
    Row("--max_steps -5", flag("--max_steps", "-5"), 1, r"^vchat train: --max_steps -5: must be at least 0$"),
    Row("--per_device_train_batch_size 0", flag("--per_device_train_batch_size", "0"), 1,
        r"^vchat train: --per_device_train_batch_size 0: must be at least 1$"),
    Row("--gradient_accumulation_steps 0", flag("--gradient_accumulation_steps", "0"), 1,
        r"^vchat train: --gradient_accumulation_steps 0: must be at least 1$"),
    Row("--learning_rate -0.01", flag("--learning_rate", "-0.01"), 1,
        r"^vchat train: --learning_rate -0.01: must be a finite number >= 0$"),
    Row("--learning_rate inf", flag("--learning_rate", "inf"), 1,
        r"^vchat train: --learning_rate inf: must be a finite number >= 0$"),
    Row("--num_train_epochs 0 and --seed -1", flag("--num_train_epochs", "0", "--seed", "-1"), 1,
        r"--num_train_epochs 0: must be at least 1; --seed -1: must be in \[0, 2\*\*32\)$"),
    Row("--save_total_limit -1", flag("--save_total_limit", "-1"), 1, r"--save_total_limit -1: must be at least 0"),
    Row("--max_nonfinite_skips under ZeRO-3", flag("--max_nonfinite_skips", "2", "--zero_stage", "3"), 1,
        r"--max_nonfinite_skips needs --zero_stage 0-2"),
    Row("--output_dir is a file", a_file, 1, r"^vchat train: --output_dir .*/afile: is a file, not a directory$"),
    Row("DeepSpeed config gradient_clipping 'one'", lambda t: ds_config(t, {"gradient_clipping": "one"}), 2,
        r'--deepspeed_config .*ds.json: "gradient_clipping" must be a number >= 0, got "one"$'),
    Row("DeepSpeed config fp16.enabled 'yes'", lambda t: ds_config(t, {"fp16": {"enabled": "yes"}}), 2,
        r'ds.json: "fp16.enabled" must be true or false, got "yes"$'),
    Row("two runs into one output_dir", held, 1,
        r"^vchat train: --output_dir .*/busy is in use by another run \(pid \d+ on .+, started .+: vchat train "
        r"--output_dir busy \(the first run\)\); wait for it to end, or choose another --output_dir$"),
    Row("train-jax --max_steps -5", flag("--max_steps", "-5", trainer=JAX), 1,
        r"^vchat train-jax: --max_steps -5: must be at least 0$"),
    Row("train-jax --learning_rate -0.01", flag("--learning_rate", "-0.01", trainer=JAX), 1,
        r"^vchat train-jax: --learning_rate -0.01: must be a finite number >= 0$"),
]


@pytest.mark.parametrize("row", REFUSED, ids=[r.name for r in REFUSED])
def test_refused_before_any_work(tmp_path, row, capsys):
    argv, on_disk = row.argv(tmp_path)
    status, line = in_process(argv, capsys)
    assert status == row.status and re.search(row.message, line), (status, line)
    assert on_disk(), f"{row.name}: disk state"


# -- vchat train: runs (subprocesses) ----------------------------------------------------------------------
def env() -> dict:
    e = dict(os.environ, DS_ACCELERATOR="cpu", PATH=f"{BIN}:{os.environ['PATH']}", OMP_NUM_THREADS="1")
    e.pop("RANK", None)
    return e


def train(out, *flags) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vchat.cli", *TORCH, "--output_dir", str(out), *flags], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cut(tmp_path_factory):
    """A run stopped after 3 of its 5 steps, a resumable step saved after each (--save_total_limit 2)."""
    out = tmp_path_factory.mktemp("faults") / "cut"
    r = train(out, "--save_every", "1", "--stop_after_steps", "3", "--save_total_limit", "2")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out


def copy_of(cut, tmp_path, damage: Callable = lambda ds: None):
    out = tmp_path / "run"
    shutil.copytree(cut, out)
    damage(out / "ds")
    return out


def truncate(path, n: int = 100) -> None:
    with open(path, "r+b") as f:
        f.truncate(n)


@pytest.mark.slow
def test_save_total_limit_keeps_the_newest_steps_each_marked_intact(cut):
    ds = cut / "ds"
    assert sorted(os.listdir(ds)) == ["config.json", "latest", "step2", "step3", "tokenizer.json"]
    assert (ds / "latest").read_text() == "step3" and not (cut / "final").exists()
    manifest = json.loads((ds / "step3" / "vchat_step.json").read_text())
    assert manifest["step"] == 3 and manifest["identity"]["flags"]["--learning_rate"] == 0.01
    states = ds / "step3" / "mp_rank_00_model_states.pt"
    assert manifest["files"]["mp_rank_00_model_states.pt"] == os.path.getsize(states)


RESUMES = [  # (name, extra flags, damage to ds/, exit status, stderr regex, stdout regexes)
    ("changed --learning_rate is refused", ["--learning_rate", "2e-2"], None, 1,
     r"^vchat train: .*/ds/step3 was saved by a different run: --learning_rate: 0.01 -> 0.02\. Rerun the same "
     r"command to resume, --resume_anyway to resume with these changes, or --no_resume to start over$", []),
    ("changed dataset size is refused", ["--synthetic_samples", "32"], None, 1,
     r"step3 was saved by a different run: --synthetic_samples: 24 -> 32; data.eval_samples: 3 -> 4; "
     r"data.train_samples: 21 -> 28\.", []),
    ("changed --learning_rate with --resume_anyway", ["--learning_rate", "2e-2", "--resume_anyway"], None, 0, r"",
     [r"\[resume\] changed since step3: --learning_rate: 0.01 -> 0.02", r"resumed from .*/ds/step3\S*: step 3"]),
    ("empty ds/latest", [], lambda ds: (ds / "latest").write_text(""), 0, r"",
     [r"\[resume\] warning: .*/ds/latest is empty", r"resumed from .*/ds/step3\S*: step 3"]),
    ("ds/latest names a missing step", [], lambda ds: (ds / "latest").write_text("step9"), 0, r"",
     [r"\[resume\] warning: .*/ds/latest names step9, which does not exist", r"resumed from .*/ds/step3\S*: step 3"]),
    ("ds/latest names a truncated step", [], lambda ds: truncate(ds / "step3" / "mp_rank_00_model_states.pt"), 0, r"",
     [r"\[resume\] warning: .*/ds/step3 \(named by .*/ds/latest\) skipped: mp_rank_00_model_states.pt is truncated or "
      r"damaged \(100 bytes, \d+ when saved\)", r"resumed from .*/ds/step2\S*: step 2"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, flags, damage, status, err, out", RESUMES, ids=[r[0] for r in RESUMES])
def test_resume(cut, tmp_path, name, flags, damage, status, err, out):
    run = copy_of(cut, tmp_path, damage or (lambda ds: None))
    (run / ".final.tmpabcd1234").mkdir()  # what killed runs leave: removed at start, while holding the lock
    (run / "best.old4242").mkdir()
    r = train(run, *flags)
    assert r.returncode == status, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert re.search(err, lines[-1] if lines else ""), r.stderr[-2000:]
    for pattern in out:
        assert re.search(pattern, r.stdout), (pattern, r.stdout[-2000:])
    assert not (run / ".final.tmpabcd1234").exists() and not (run / "best.old4242").exists()
    assert (run / "final").exists() == (status == 0)
    if status:  # refused: the interrupted run's steps are as they were
        assert sorted(os.listdir(run / "ds" / "step3")) == sorted(os.listdir(cut / "ds" / "step3"))


@pytest.mark.slow
@pytest.mark.parametrize("skips, message", [
    ("0", r"step 2: loss nan; the run stopped without saving or exporting the diverged weights "
          r"\(--max_nonfinite_skips 0\)"),
    ("1", r"step 3: loss nan after skipping steps \[2\]; the run stopped without saving or exporting the diverged "
          r"weights \(--max_nonfinite_skips 1\)")])
def test_a_diverged_run_stops_naming_the_step_and_exports_nothing_diverged(tmp_path, skips, message):
    """--learning_rate 1e30 makes step 1's update overflow the model: step 2's loss is NaN."""
    from safetensors.numpy import load_file

    out = tmp_path / "div"
    r = train(out, "--learning_rate", "1e30", "--max_steps", "3", "--max_nonfinite_skips", skips)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert re.match(f"vchat train: {message}", r.stderr), r.stderr
    assert ("step 2: a micro-batch's loss is nan; skipped (1 of --max_nonfinite_skips 1)" in r.stdout) == (skips == "1")
    assert not (out / "final").exists() and not (out / "ds").exists()
    best = load_file(str(out / "best" / "model.safetensors"))  # the step-0 evaluation's, before any step
    assert all(np.isfinite(v).all() for v in best.values())


# -- vchat train-jax: runs (in-process) ----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # --learning_rate 1e39
def test_train_jax_faults(tmp_path, capsys):
    """A 3-step run with a state per step keeps 2; a changed --learning_rate is refused (a longer run is
    not); a truncated newest state is skipped with a warning; a diverged run skips the allowed step, then
    stops naming the next."""
    out = tmp_path / "jax"
    jax_run = [*JAX, "--output_dir", str(out), "--save_every", "1"]
    assert vchat_main([*jax_run, "--max_steps", "3"]) == 0
    assert sorted(os.listdir(out / "state")) == ["2", "3"]
    capsys.readouterr()
    status, line = in_process([*jax_run, "--max_steps", "4", "--learning_rate", "2e-2"], capsys)
    assert status == 1 and re.search(r"state/3 was saved by a different run: --learning_rate: 0.01 -> 0.02\. ", line)
    big = max((os.path.getsize(os.path.join(d, f)), os.path.join(d, f))
              for d, _, fs in os.walk(out / "state" / "3") for f in fs)[1]
    truncate(big, 1)
    assert vchat_main([*jax_run, "--max_steps", "4"]) == 0
    said = capsys.readouterr().out
    assert re.search(r"\[resume\] warning: .*state/3 skipped: .* is truncated or damaged", said), said
    assert "changed since 2: --max_steps: 3 -> 4" in said and "at step 2" in said and "] 4 steps (" in said, said
    assert sorted(os.listdir(out / "state")) == ["3", "4"]  # the damaged 3 saved again, 2 pruned
    div = tmp_path / "jdiv"  # 1e39 is inf in float32: step 1's update makes the parameters NaN
    status, line = in_process([*JAX, "--output_dir", str(div), "--learning_rate", "1e39", "--max_steps", "3",
                               "--log_every", "1", "--max_nonfinite_skips", "1"], capsys)
    assert status == 1 and line.startswith("vchat train-jax: step 3: loss nan, grad_norm nan after skipping steps "
                                           "[2]; the run stopped without saving or exporting the diverged "), line
    assert not (div / "final").exists() and not (div / "state").exists()
