"""What makes a training run trustworthy, for both trainers (`vchat train`, `vchat train-jax`), with no
framework in sight: one writer per output directory, a resume that refuses a changed run, resumable
steps that are known to be complete, the cleanup of what killed runs left, and a stop on divergence.

    with RunLock(args.output_dir):                          # a second run into it fails at once, naming us
        for line in remove_stale_temps(args.output_dir, ("ds", "state")):
            print(line)                                     # .final.tmp*, best.old*, orbax tmp dirs ...
        steps = StepDirs(ds_dir, r"step(\\d+)", latest="latest")
        found = steps.resumable()                           # the newest intact step, and what it skipped
        notes = check_resume(found.manifest["identity"], identity, args.resume_anyway, found.path)
        ...                                                 # the framework saves step N into steps.path(N)
        write_manifest(steps.path(N), N, identity)          # written last: step N is intact from now on
        steps.point_latest(N); steps.prune(args.save_total_limit)
        guard = NonFiniteGuard(args.max_nonfinite_skips)
        if not guard.check(step, loss=loss):                # False: skip this step; raises past the budget
            ...

A step directory is intact when its manifest (`vchat_step.json`, written after the framework's own
files) exists and every file it lists is there with the size it had; so a save killed half-way, a
truncated file or a missing step is never resumed from, and the newest intact step is used instead,
with a warning naming what was skipped. The manifest also records the run's identity (every flag that
changes what the run computes, the model, the data's sample counts, the world size): a rerun whose
identity differs is refused with the list of differences, unless `--resume_anyway`; `--no_resume`
starts over. The run's length (`--num_train_epochs`, `--max_steps`) may change: a noted difference.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import socket
import sys
import time

from vchat.checkpoint_files import CONFIG_NAME
from vchat.errors import UserError
from vchat.file_checks import check_json
from vchat.io import writing_file

LOCK_NAME = ".lock"
MANIFEST_NAME = "vchat_step.json"


def add_run_flags(group: argparse._ArgumentGroup) -> None:
    """The flags of this module, in a trainer's parser group."""
    group.add_argument("--resume_anyway", action="store_true",
                       help="resume even though flags, model or data differ from the saved step's (listed)")
    group.add_argument("--no_resume", action="store_true",
                       help="start over: remove the resumable steps and the log of an earlier run in --output_dir")
    group.add_argument("--save_total_limit", type=int, default=2,
                       help="keep the newest N resumable steps (0: keep every one)")
    group.add_argument("--max_nonfinite_skips", type=int, default=0,
                       help="skip up to N optimizer steps whose loss or gradient norm is NaN or Inf "
                            "(0: the first one stops the run)")


# -- one writer per output directory -------------------------------------------------------------------
class RunLockedError(UserError):
    """Another run holds the output directory."""


class RunLock:
    """An exclusive `fcntl.flock` on `output_dir/.lock`, held while the run lives (the kernel drops it
    when the process ends, even on kill -9). The holder writes its pid, host, command and start time
    into the file; a second run reads them into its error. `with RunLock(d):` or `acquire()`/`release()`."""

    def __init__(self, output_dir: str, command: str | None = None):
        self.output_dir, self.path = output_dir, os.path.join(output_dir, LOCK_NAME)
        self.command = command if command is not None else shlex.join(sys.argv)
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        os.makedirs(self.output_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLockedError(f"--output_dir {self.output_dir} is in use by another run ({holder}); wait for "
                                 "it to end, or choose another --output_dir") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
        return (f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}")
    except (ValueError, KeyError, TypeError):
        return "its details are not written yet"


# -- leftovers of killed runs -----------------------------------------------------------------------------
TEMP_RE = re.compile(r"^\..+\.tmp[a-z0-9_]{8}$|^.+\.orbax-checkpoint-tmp.*$")  # vchat.io's, orbax's
OLD_RE = re.compile(r"^(?P<name>.+)\.old\d+$")  # vchat.io.commit_dir's replaced directory


def remove_stale_temps(root: str, subdirs: tuple[str, ...] = ()) -> list[str]:
    """Remove the temporaries killed runs left in `root` and `root/<subdir>`: vchat.io's `.NAME.tmpXXXXXXXX`
    files and directories, orbax's `N.orbax-checkpoint-tmp-*`, and `NAME.old<pid>` (vchat.io.commit_dir's
    replaced directory; put back as NAME when NAME is missing, a kill between its two renames). Call it
    only while holding the RunLock. Returns one line per thing done, for the log."""
    done = []
    for folder in (root, *(os.path.join(root, s) for s in subdirs)):
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            path, old = os.path.join(folder, name), OLD_RE.match(name)
            if old and not os.path.exists(os.path.join(folder, old["name"])):
                os.rename(path, os.path.join(folder, old["name"]))
                done.append(f"put back {path} as {old['name']} (a run was killed while replacing it)")
            elif old or TEMP_RE.match(name):
                _remove(path)
                done.append(f"removed {path} (left by a killed run)")
    return done


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


# -- intact steps ----------------------------------------------------------------------------------------
def write_manifest(step_dir: str, step: int, identity: dict) -> str:
    """`step_dir/vchat_step.json`: the step, the run's identity and every file of the step with its size.
    Written last (after the framework's save): the step counts as intact from then on. Returns its path."""
    files = {}
    for folder, _, names in os.walk(step_dir):
        for name in names:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, step_dir)
            if rel != MANIFEST_NAME and not TEMP_RE.match(name):
                files[rel] = os.path.getsize(path)
    path = os.path.join(step_dir, MANIFEST_NAME)
    with writing_file(path) as f:
        json.dump({"step": step, "identity": identity, "files": dict(sorted(files.items()))}, f, indent=1)
    return path


def step_problem(step_dir: str) -> str | None:
    """None when `step_dir` is intact; otherwise what is wrong with it, in a few words."""
    if not os.path.isdir(step_dir):
        return "it does not exist"
    try:
        with open(os.path.join(step_dir, MANIFEST_NAME)) as f:
            manifest = json.load(f)
        files = dict(manifest["files"])
    except FileNotFoundError:
        return f"it has no {MANIFEST_NAME} (its save did not finish)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST_NAME} does not parse"
    for rel, size in files.items():
        path = os.path.join(step_dir, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        if os.path.getsize(path) != size:
            return f"{rel} is truncated or damaged ({os.path.getsize(path)} bytes, {size} when saved)"
    return None


def read_manifest(step_dir: str) -> dict:
    with open(os.path.join(step_dir, MANIFEST_NAME)) as f:
        return json.load(f)


@dataclasses.dataclass
class Resumable:
    """What `StepDirs.resumable` found: the step to resume from (None: start fresh), its directory
    name and manifest, and a warning per step (or `latest` file) skipped on the way."""

    step: int | None
    name: str | None
    path: str | None
    manifest: dict | None
    skipped: list[str]


class StepDirs:
    """The resumable steps under `root`: directories whose names match `pattern` (one group: the step
    number), e.g. DeepSpeed's `ds/step12` (r"step(\\d+)", with its `latest` file) or orbax's `state/12`."""

    def __init__(self, root: str, pattern: str, latest: str | None = None):
        self.root, self.pattern, self.latest = root, re.compile(f"^{pattern}$"), latest
        self.template = pattern.replace(r"(\d+)", "{}")

    def name(self, step: int) -> str:
        return self.template.format(step)

    def path(self, step: int) -> str:
        return os.path.join(self.root, self.name(step))

    def steps(self) -> list[int]:
        """The step numbers on disk, intact or not, newest first."""
        if not os.path.isdir(self.root):
            return []
        found = (self.pattern.match(n) for n in os.listdir(self.root))
        return sorted((int(m[1]) for m in found if m and os.path.isdir(os.path.join(self.root, m[0]))), reverse=True)

    def resumable(self) -> Resumable:
        """The newest intact step. Each newer step that is not intact is a warning in `skipped` saying
        why, and so is a `latest` file that is empty or names a step that is not there."""
        skipped, named = [], None
        latest_path = os.path.join(self.root, self.latest) if self.latest else None
        if latest_path and os.path.isfile(latest_path):
            with open(latest_path) as f:
                named = f.read().strip()
            if not named:
                skipped.append(f"{latest_path} is empty")
        if named and not os.path.isdir(os.path.join(self.root, named)):
            skipped.append(f"{latest_path} names {named}, which does not exist")
        for step in self.steps():
            path, name = self.path(step), self.name(step)
            problem = step_problem(path)
            if problem is None:
                return Resumable(step, name, path, read_manifest(path), skipped)
            by = f" (named by {latest_path})" if name == named else ""
            skipped.append(f"{path}{by} skipped: {problem}")
        return Resumable(None, None, None, None, skipped)

    def begin_save(self, step: int) -> None:
        """Clear the way for saving `step`: a directory of that step left by an earlier, unfinished save."""
        if os.path.exists(self.path(step)):
            shutil.rmtree(self.path(step))

    def point_latest(self, step: int) -> None:
        """Write the `latest` file (atomically) naming `step`."""
        if self.latest:
            with writing_file(os.path.join(self.root, self.latest)) as f:
                f.write(self.name(step))

    def prune(self, keep: int) -> list[str]:
        """Keep the newest `keep` intact steps (0: every one); remove the older intact ones, and the steps
        older than the newest intact one that are not intact. Returns the removed paths."""
        removed, intact = [], 0
        for step in self.steps():
            ok = step_problem(self.path(step)) is None
            intact += ok
            if (ok and keep and intact > keep) or (not ok and intact):
                shutil.rmtree(self.path(step))
                removed.append(self.path(step))
        return removed

    def remove_all(self) -> list[str]:
        """Every step directory and the `latest` file (`--no_resume`). Returns the removed paths."""
        removed = [self.path(s) for s in self.steps()]
        for path in removed:
            shutil.rmtree(path)
        if self.latest and os.path.exists(os.path.join(self.root, self.latest)):
            os.unlink(os.path.join(self.root, self.latest))
            removed.append(os.path.join(self.root, self.latest))
        return removed


# -- the run's identity ----------------------------------------------------------------------------------
# flags that change nothing the run computes: where it writes, what it prints, when it stops or saves
CONTROL_FLAGS = frozenset({
    "output_dir", "quiet", "stop_after_steps", "eval_every", "save_every", "log_every", "enable_tensorboard",
    "local_rank", "deepspeed", "deepspeed_config", "vision_model_name_or_path", "data_debug_path", "distributed",
    "resume_anyway", "no_resume", "save_total_limit", "max_nonfinite_skips", "save_trainable_only"})
# the run's length: a resume may extend or shorten it (the schedule's horizon moves with it), noted
LENGTH_FLAGS = ("num_train_epochs", "max_steps")


class ResumeRefusedError(UserError):
    """The saved step belongs to a different run."""


def run_identity(args: argparse.Namespace, **facts) -> dict:
    """The run's identity: every flag but CONTROL_FLAGS (as `--name`), and the `facts` the trainer adds
    (model, data, world, ...), as plain JSON values."""
    flags = {f"--{k}": v for k, v in sorted(vars(args).items()) if k not in CONTROL_FLAGS}
    return json.loads(json.dumps({"flags": flags, **facts}, default=str))


def model_facts(source, tokenizer_json: str | None = None) -> dict:
    """What the run starts from: a checkpoint directory (its config and file sizes) or a new model's
    config (a vchat.config.ModelConfig); and the tokenizer's digest."""
    facts = {}
    if isinstance(source, str):
        facts["checkpoint"] = {name: os.path.getsize(os.path.join(source, name)) for name in sorted(os.listdir(source))
                               if os.path.isfile(os.path.join(source, name))}
        facts["config"] = check_json(os.path.join(source, CONFIG_NAME))
    else:
        facts["config"] = source.to_dict()
    if tokenizer_json is not None:
        facts["tokenizer_sha256"] = hashlib.sha256(tokenizer_json.encode()).hexdigest()
    return facts


def _flat(identity: dict) -> dict:
    """The identity as one level: its flags by `--name`, the rest by dotted path."""
    out = dict(identity.get("flags", {}))

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk({k: v for k, v in identity.items() if k != "flags"}, "")
    return out


def identity_differences(old: dict, new: dict) -> list[str]:
    """`what: old -> new` for each value of two identities that differs (flags shown as `--name`)."""
    a, b, absent = _flat(old), _flat(new), "(absent)"
    return [f"{k}: {_show(a.get(k, absent))} -> {_show(b.get(k, absent))}"
            for k in sorted(set(a) | set(b)) if a.get(k, absent) != b.get(k, absent)]


def _show(v) -> str:
    return v if v == "(absent)" else json.dumps(v)


def check_resume(old: dict, new: dict, resume_anyway: bool, where: str) -> list[str]:
    """Compare the saved step's identity (`old`, at `where`) with this run's. A difference in the run's
    length is a note; any other refuses the resume (ResumeRefusedError listing them) unless
    `resume_anyway`, when they are notes too. Returns the notes."""
    diffs = identity_differences(old, new)
    length = tuple(f"--{f}:" for f in LENGTH_FLAGS)
    refused = [d for d in diffs if not d.startswith(length)]
    if refused and not resume_anyway:
        raise ResumeRefusedError(
            f"{where} was saved by a different run: {'; '.join(refused)}. Rerun the same command to resume, "
            "--resume_anyway to resume with these changes, or --no_resume to start over")
    return diffs


# -- divergence ------------------------------------------------------------------------------------------
class DivergedError(UserError):
    """A loss or gradient norm went NaN or Inf past the allowed skips."""


class NonFiniteGuard:
    """Stops a run whose loss or gradient norm is not finite: `check(step, loss=..., grad_norm=...)` is
    True when every value is finite, False when the step is to be skipped (at most `max_skips` in a run),
    and raises DivergedError naming the step and values past that."""

    def __init__(self, max_skips: int = 0):
        self.max_skips, self.skipped = max_skips, []

    def check(self, step: int, **values: float | None) -> bool:
        bad = {k: v for k, v in values.items() if v is not None and not math.isfinite(v)}
        if not bad:
            return True
        what = ", ".join(f"{k} {v}" for k, v in bad.items())
        if len(self.skipped) < self.max_skips:
            self.skipped.append(step)
            return False
        skips = f" after skipping steps {self.skipped}" if self.skipped else ""
        raise DivergedError(f"step {step}: {what}{skips}; the run stopped and wrote no final/ or best/ "
                            f"(--max_nonfinite_skips {self.max_skips}); lower --learning_rate, or resume from the "
                            "last resumable step with other flags (--resume_anyway)")
