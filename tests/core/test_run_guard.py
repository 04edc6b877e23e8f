"""vchat/run_guard.py, vchat/run_steps.py and vchat/flag_checks.py: the run lock (held by another
process, dropped by the kernel on kill -9), the cleanup of what killed writers of vchat/io.py really
leave, intact steps and the choice of the one to resume from, retention, the run's identity and the
resume decision, the divergence guard, all of them together as a trainer meets them (RunGuard), and
the flag and DeepSpeed config checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from vchat.flag_checks import ds_config_problems, flag_problems
from vchat.run_guard import (LOCK_NAME, DivergedError, NonFiniteGuard, ResumeRefusedError, RunGuard, RunLock,
                             RunLockedError, check_resume, identity_differences, run_identity)
from vchat.run_steps import (MANIFEST_NAME, StepDirs, read_manifest, remove_stale_temps, step_problem,
                             write_manifest)
from vchat.train_args import train_parser

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def python(script: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, **kw)


# -- the lock --------------------------------------------------------------------------------------------
def test_a_second_run_fails_at_once_naming_the_holder_and_kill_9_frees_the_lock(tmp_path):
    holder = python(f"""
        import time
        from vchat.run_guard import RunLock
        RunLock({str(tmp_path)!r}, command="vchat train --output_dir x").acquire()
        print("held", flush=True)
        time.sleep(60)
    """)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunLockedError) as e:
        RunLock(str(tmp_path)).acquire()
    assert f"pid {holder.pid} on " in str(e.value) and ": vchat train --output_dir x" in str(e.value)
    assert f"--output_dir {tmp_path} is in use by another run" in str(e.value)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with RunLock(str(tmp_path), command="second") as lock:  # the kernel dropped the dead run's lock
        info = json.loads((tmp_path / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["command"] == "second" and info["started"]
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()} on .*: second"):
            RunLock(str(tmp_path)).acquire()  # flock: a second open file conflicts in one process too
    assert lock.fd is None and (tmp_path / LOCK_NAME).read_text() == ""
    RunLock(str(tmp_path)).acquire().release()


# -- leftovers of killed writers (made by vchat/io.py itself, killed at the worst moments) ----------------
KILLED_WRITERS = """
    import os, signal, sys
    from vchat import io
    root, moment = sys.argv[1], sys.argv[2]
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if moment == "inside writing_dir":
        with io.writing_dir(os.path.join(root, "final")) as tmp:
            open(os.path.join(tmp, "model.safetensors"), "w").write("half")
            die()
    if moment == "inside writing_file":
        with io.writing_file(os.path.join(root, "ds", "tokenizer.json")) as f:
            f.write("{")
            die()
    if moment == "after the old one moved aside":      # best.old<pid> holds the old best, best/ the new one
        io.shutil.rmtree = die
        with io.writing_dir(os.path.join(root, "best")) as tmp:
            open(os.path.join(tmp, "new"), "w").write("new")
    if moment == "between the two renames":            # best.old<pid> holds the old best, best/ is missing
        rename, calls = os.rename, []
        def rename_once(a, b):
            calls.append(a)
            rename(a, b) if len(calls) == 1 else die()
        io.os.rename = rename_once
        with io.writing_dir(os.path.join(root, "best")) as tmp:
            open(os.path.join(tmp, "newer"), "w").write("newer")
"""


def test_stale_temporaries_of_killed_writers_are_removed_and_a_half_replaced_dir_put_back(tmp_path):
    root = tmp_path / "run"
    (root / "ds").mkdir(parents=True)
    (root / "best").mkdir()
    (root / "best" / "old").write_text("old")
    (root / "state" / "7.orbax-checkpoint-tmp-1234").mkdir(parents=True)  # orbax's own temporary
    keep = ["notes.old", "final.older", ".hidden", "ds/step3"]  # look-alikes that are the user's or a step
    for name in keep:
        (root / name).mkdir() if name.endswith("step3") else (root / name).write_text("keep")
    for moment in ("inside writing_dir", "inside writing_file", "after the old one moved aside",
                   "between the two renames"):
        p = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_WRITERS), str(root), moment], cwd=ROOT)
        assert p.returncode == -signal.SIGKILL, moment
        if moment == "after the old one moved aside":
            assert sorted(os.listdir(root / "best")) == ["new"]
            old = [n for n in os.listdir(root) if n.startswith("best.old")]
            assert len(old) == 1
            os.rename(root / old[0], root / "best.old1")  # two leftovers of that kind in one folder
    left = sorted(n for d in (root, root / "ds", root / "state") for n in os.listdir(d))
    assert [n for n in left if n.startswith(".final.tmp")] and [n for n in left if n.startswith(".tokenizer.json.tmp")]
    done = remove_stale_temps(str(root), ("ds", "state"))
    assert not os.path.exists(root / "best.old1")
    assert sorted(os.listdir(root / "best")) == ["old"]  # the old best/ put back: the new one never committed
    assert sorted(os.listdir(root)) == sorted(["best", "ds", "state", "final.older", "notes.old", ".hidden"])
    assert os.listdir(root / "ds") == ["step3"] and os.listdir(root / "state") == []
    assert any("put back" in line and "best.old" in line for line in done), done
    # .final.tmp*, .best.tmp* (the uncommitted new best), best.old1, ds/.tokenizer.json.tmp*, the orbax temporary
    assert sum("removed" in line for line in done) == 5, done


# -- intact steps, the one to resume from, retention --------------------------------------------------------
def save_step(steps: StepDirs, step: int, identity: dict | None = None, size: int = 100) -> str:
    """A step as a framework leaves it (two files, one in a sub-folder), then its manifest."""
    path = steps.path(step)
    os.makedirs(os.path.join(path, "default"), exist_ok=True)
    with open(os.path.join(path, "mp_rank_00_model_states.pt"), "wb") as f:
        f.write(b"x" * size)
    with open(os.path.join(path, "default", "shard"), "wb") as f:
        f.write(b"y" * 7)
    write_manifest(path, step, identity or {"flags": {"--seed": 1}})
    return path


def truncate(path: str, n: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(n)


def test_a_step_is_intact_when_its_manifest_matches_its_files(tmp_path):
    steps = StepDirs(str(tmp_path), r"step(\d+)", latest="latest")
    path = save_step(steps, 3, size=100)
    manifest = read_manifest(path)
    assert manifest["step"] == 3 and manifest["files"] == {"mp_rank_00_model_states.pt": 100, "default/shard": 7}
    assert step_problem(path) is None
    truncate(os.path.join(path, "default", "shard"), 2)
    assert step_problem(path) == "default/shard is truncated or damaged (2 bytes, 7 when saved)"
    os.unlink(os.path.join(path, "default", "shard"))
    assert step_problem(path) == "default/shard is missing"
    os.unlink(os.path.join(path, MANIFEST_NAME))
    assert step_problem(path) == f"it has no {MANIFEST_NAME} (its save did not finish)"
    (tmp_path / "step3" / MANIFEST_NAME).write_text("{not json")
    assert step_problem(path) == f"its {MANIFEST_NAME} does not parse"
    assert step_problem(str(tmp_path / "step9")) == "it does not exist"


def test_resume_takes_the_newest_intact_step_and_names_what_it_skipped(tmp_path):
    ds = StepDirs(str(tmp_path / "ds"), r"step(\d+)", latest="latest")
    assert ds.resumable().step is None and ds.resumable().skipped == []  # nothing saved yet
    for s in (2, 4):
        save_step(ds, s)
    ds.point_latest(4)
    assert (tmp_path / "ds" / "latest").read_text() == "step4"
    r = ds.resumable()
    assert (r.step, r.name, r.path, r.skipped) == (4, "step4", ds.path(4), [])
    assert r.manifest["identity"] == {"flags": {"--seed": 1}}
    latest = tmp_path / "ds" / "latest"
    latest.write_text("")  # empty
    assert (ds.resumable().step, ds.resumable().skipped) == (4, [f"{latest} is empty"])
    latest.write_text("step6")  # names a missing step
    assert (ds.resumable().step, ds.resumable().skipped) == (4, [f"{latest} names step6, which does not exist"])
    save_step(ds, 6)  # names a truncated step
    truncate(os.path.join(ds.path(6), "mp_rank_00_model_states.pt"), 10)
    r = ds.resumable()
    assert r.step == 4 and r.skipped == [f"{ds.path(6)} (named by {latest}) skipped: mp_rank_00_model_states.pt is "
                                         "truncated or damaged (10 bytes, 100 when saved)"]
    os.makedirs(ds.path(8))  # a save killed before its manifest: skipped too, newest first
    r = ds.resumable()
    assert r.step == 4 and len(r.skipped) == 2 and r.skipped[0] == (f"{ds.path(8)} skipped: it has no "
                                                                   f"{MANIFEST_NAME} (its save did not finish)")
    for s in (2, 4):
        truncate(os.path.join(ds.path(s), "default", "shard"), 0)
    r = ds.resumable()
    assert r.step is None and len(r.skipped) == 4  # nothing intact: start fresh, saying why
    orbax = StepDirs(str(tmp_path / "state"), r"(\d+)")  # orbax's layout: state/<step>, no latest file
    save_step(orbax, 10)
    save_step(orbax, 9)
    assert orbax.resumable().step == 10 and orbax.steps() == [10, 9] and orbax.name(10) == "10"


def test_retention_keeps_the_newest_intact_steps(tmp_path):
    ds = StepDirs(str(tmp_path), r"step(\d+)", latest="latest")
    for s in range(1, 6):
        save_step(ds, s)
    os.makedirs(ds.path(0))  # older and unfinished: removed
    os.makedirs(ds.path(7))  # newer and unfinished: left for the run that reaches step 7 (begin_save clears it)
    truncate(os.path.join(ds.path(4), "default", "shard"), 1)  # damaged: not counted, removed
    removed = ds.prune(2)
    assert sorted(removed) == sorted(ds.path(s) for s in (0, 1, 2, 4))
    assert ds.steps() == [7, 5, 3]
    assert ds.prune(0) == [] and ds.steps() == [7, 5, 3]  # 0 keeps every intact step
    ds.begin_save(7)
    assert ds.steps() == [5, 3]
    ds.point_latest(5)
    assert sorted(ds.remove_all()) == sorted([ds.path(5), ds.path(3), str(tmp_path / "latest")])
    assert os.listdir(tmp_path) == []


# -- the run's identity ----------------------------------------------------------------------------------
def args_of(*flags):
    return train_parser("t", "t", ("cosine",)).parser.parse_args(
        ["--lm_model_name_or_path", "tiny", "--output_dir", "o", *flags])


def test_identity_and_the_resume_decision(tmp_path):
    facts = {"data": {"train_samples": 43, "eval_samples": 5}, "world": {"processes": 1}}
    saved = run_identity(args_of(), **facts)
    assert "--learning_rate" in saved["flags"] and "--output_dir" not in saved["flags"]  # output_dir is control
    write_manifest(str(tmp_path), 1, saved)  # through JSON and back: equal
    assert identity_differences(read_manifest(str(tmp_path))["identity"], run_identity(args_of(), **facts)) == []
    assert identity_differences(saved, run_identity(args_of("--output_dir", "elsewhere", "--quiet"), **facts)) == []
    changed = run_identity(args_of("--learning_rate", "inf", "--synthetic_samples", "88"),
                           data={"train_samples": 79, "eval_samples": 9}, world={"processes": 1})
    assert identity_differences(saved, changed) == [
        "--learning_rate: 0.001 -> Infinity", "--synthetic_samples: 2000 -> 88", "data.eval_samples: 5 -> 9",
        "data.train_samples: 43 -> 79"]
    with pytest.raises(ResumeRefusedError) as e:
        check_resume(saved, changed, resume_anyway=False, where="run/ds/step4")
    assert str(e.value).startswith("run/ds/step4 was saved by a different run: --learning_rate: 0.001 -> Infinity; "
                                   "--synthetic_samples: 2000 -> 88; data.eval_samples: 5 -> 9; ")
    assert "--resume_anyway" in str(e.value) and "--no_resume" in str(e.value)
    assert len(check_resume(saved, changed, resume_anyway=True, where="x")) == 4
    longer = run_identity(args_of("--max_steps", "9", "--num_train_epochs", "2"), **facts)
    assert check_resume(saved, longer, False, "x") == ["--max_steps: 0 -> 9", "--num_train_epochs: 6 -> 2"]
    assert identity_differences(saved, {**saved, "world": {}}) == ['world.processes: 1 -> (absent)']


def test_run_guard_as_a_trainer_meets_it(tmp_path):
    """Two runs of one command, a changed third one, a --no_resume fourth: lock, cleanup, resume, saves."""
    out, said = tmp_path / "run", []
    (out / "ds").mkdir(parents=True)
    (out / ".final.tmpabcd1234").mkdir()  # a killed run's temporary
    args = args_of("--output_dir", str(out))
    identity = run_identity(args, data={"train_samples": 43})
    with RunGuard(args, StepDirs(str(out / "ds"), r"step(\d+)", "latest"), say=said.append) as guard:
        with pytest.raises(RunLockedError):
            RunGuard(args, guard.steps)
        assert not (out / ".final.tmpabcd1234").exists() and "left by a killed run" in said[0]
        assert guard.resume_point(identity) is None
        for step in (1, 2, 3):
            guard.begin_save(step)
            (out / "ds" / f"step{step}").mkdir()
            (out / "ds" / f"step{step}" / "model.pt").write_text("w" * step)
            guard.end_save(step)
        assert sorted(os.listdir(out / "ds")) == ["latest", "step2", "step3"]  # --save_total_limit 2 (default)
        assert said[-1] == f"[ckpt] removed {out}/ds/step1 (--save_total_limit 2)"
        (out / "train_log.jsonl").write_text("{}\n")
    other = RunGuard(args, StepDirs(str(out / "ds"), r"step(\d+)", "latest"), lead=False)  # no lock, no writes
    assert other.lock is None and other.resume_point(identity).step == 3
    truncate(str(out / "ds" / "step3" / "model.pt"), 1)
    with RunGuard(args, StepDirs(str(out / "ds"), r"step(\d+)", "latest"), say=said.append) as guard:
        found = guard.resume_point(identity)
        assert found.step == 2 and said[-1].startswith(f"[resume] warning: {out}/ds/step3 (named by ")
        with pytest.raises(ResumeRefusedError, match=r"step2 was saved by a different run: data.train_samples: "
                                                     r"43 -> 44\."):
            guard.resume_point(run_identity(args, data={"train_samples": 44}))
    fresh = args_of("--output_dir", str(out), "--no_resume")
    with RunGuard(fresh, StepDirs(str(out / "ds"), r"step(\d+)", "latest"), say=said.append) as guard:
        assert os.listdir(out / "ds") == [] and not (out / "train_log.jsonl").exists()
        assert said[-1].startswith("[run] --no_resume: removed ") and guard.resume_point(identity) is None


# -- divergence ------------------------------------------------------------------------------------------
def test_non_finite_values_stop_the_run_after_the_allowed_skips():
    guard = NonFiniteGuard()
    assert guard.check(1, loss=2.5, grad_norm=None)
    with pytest.raises(DivergedError, match=r"^step 2: loss nan; the run stopped without saving or "
                                            r"exporting the diverged weights \(--max_nonfinite_skips 0\)"):
        guard.check(2, loss=float("nan"), grad_norm=1.0)
    guard = NonFiniteGuard(max_skips=2)
    assert not guard.check(3, loss=1.0, grad_norm=float("inf"))
    assert guard.check(4, loss=1.0) and not guard.check(5, loss=float("-inf"))
    guard.require(6, eval_loss=1.5)
    with pytest.raises(DivergedError, match=r"^step 6: eval_loss nan after skipping steps \[3, 5\]"):
        guard.require(6, eval_loss=float("nan"))  # no skipping an evaluation
    with pytest.raises(DivergedError, match=r"^step 7: loss nan, grad_norm inf after skipping steps \[3, 5\]"):
        guard.check(7, loss=float("nan"), grad_norm=float("inf"))


# -- flag values and DeepSpeed config entries --------------------------------------------------------------
@pytest.mark.parametrize("flags, extra, problem", [
    (["--max_steps", "-5"], {}, "--max_steps -5: must be at least 0"),
    (["--per_device_train_batch_size", "0"], {}, "--per_device_train_batch_size 0: must be at least 1"),
    ([], {"gradient_accumulation_steps": 0}, "--gradient_accumulation_steps 0: must be at least 1"),
    (["--learning_rate", "-0.01"], {}, "--learning_rate -0.01: must be a finite number >= 0"),
    (["--learning_rate", "inf"], {}, "--learning_rate inf: must be a finite number >= 0"),
    (["--learning_rate", "nan"], {}, "--learning_rate nan: must be a finite number >= 0"),
    (["--num_train_epochs", "0"], {}, "--num_train_epochs 0: must be at least 1"),
    (["--num_warmup_steps", "-1"], {}, "--num_warmup_steps -1.0: must be a finite number >= 0"),
    (["--seed", "-1"], {}, "--seed -1: must be in [0, 2**32)"),
    (["--data_train_split_ratio", "0"], {}, "--data_train_split_ratio 0.0: must be in (0, 1]"),
    (["--dataset_names", "llava", "coco_caption", "--dataset_samples", "10", "x"], {},
     "--dataset_samples 10 x: 'x' must be 'all' or a count >= 0"),
    (["--dataset_concatenate_samples", "1", "2"], {},
     "--dataset_concatenate_samples: give one value or one per --dataset_names (1), got 2"),
    ([], {"lora_dropout": 1.0}, "--lora_dropout 1.0: must be in [0, 1)"),
    ([], {"save_total_limit": -1}, "--save_total_limit -1: must be at least 0"),
    ([], {"deepspeed_config": "/nonexistent.json"}, "--deepspeed_config /nonexistent.json: no such file"),
])
def test_each_bad_flag_value_is_named(flags, extra, problem):
    args = args_of(*flags)
    vars(args).update(extra)
    assert flag_problems(args) == [problem]


def test_output_dir_must_be_a_directory_that_can_be_made(tmp_path):
    (tmp_path / "afile").write_text("")
    args = args_of("--output_dir", str(tmp_path / "afile"))
    assert flag_problems(args) == [f"--output_dir {tmp_path}/afile: is a file, not a directory"]
    args.output_dir = str(tmp_path / "afile" / "run")
    assert flag_problems(args) == [f"--output_dir {tmp_path}/afile/run: {tmp_path}/afile is a file, not a directory"]
    args.output_dir = str(tmp_path / "new" / "run")
    assert flag_problems(args) == [] and not (tmp_path / "new").exists()  # checked, not made
    assert flag_problems(args_of()) == []  # the defaults pass


def test_deepspeed_config_entries_are_checked_by_key():
    good = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 4,
            "steps_per_print": 10**9, "gradient_clipping": 1.0, "prescale_gradients": False,
            "fp16": {"enabled": False, "loss_scale_window": 100}, "bf16": {"enabled": True},
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1e4,
                                  "stage3_max_live_parameters": 3e7, "stage3_prefetch_bucket_size": 0,
                                  "memory_efficient_linear": False, "offload_optimizer": {"device": "cpu"}},
            "some_key_deepspeed_knows": [1, 2]}
    assert ds_config_problems(good) == []
    bad = {**good, "gradient_clipping": "one", "bf16": {"enabled": "yes"}, "train_batch_size": 0,
           "zero_optimization": {"stage": 5, "offload_param": {"device": "gpu"}, "overlap_comm": 1}}
    assert ds_config_problems(bad) == [
        '"train_batch_size" must be an integer >= 1, got 0',
        '"gradient_clipping" must be a number >= 0, got "one"',
        '"bf16.enabled" must be true or false, got "yes"',
        '"zero_optimization.overlap_comm" must be true or false, got 1',
        '"zero_optimization.offload_param.device" must be one of cpu, nvme, none, got "gpu"']
    assert ds_config_problems({"fp16": True}) == ['"fp16" must be a JSON object, got true']
    assert ds_config_problems({"gradient_clipping": True}) == ['"gradient_clipping" must be a number >= 0, got true']
