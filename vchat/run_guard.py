"""What makes a training run trustworthy, for both trainers (`vchat train`, `vchat train-jax`), with no
framework in sight: one writer per output directory, a resume that refuses a changed run, and a stop
on divergence; with vchat/run_steps.py (intact steps, retention, leftovers of killed runs) under it.

    with RunGuard(args, StepDirs(ds_dir, r"step(\\d+)", "latest"), lead=rank == 0, say=log) as guard:
        # made: the lock on output_dir/.lock (a second run fails at once, naming this one), the stale
        # temporaries of killed runs removed, and with --no_resume the earlier run's steps and log
        found = guard.resume_point(run_identity(args, model=..., data=..., world=...))  # None: fresh
        ...                                             # a changed run was refused, naming the changes
        guard.begin_save(step); engine.save(...); guard.end_save(step)   # manifest, latest, retention
        if not guard.nonfinite.check(step, loss=loss):  # False: skip this step; past the budget raises
            ...

The run's identity is every flag that changes what the run computes (all but CONTROL_FLAGS), plus
what the trainer adds: the model it starts from, the data's sample counts, the world size. It is
recorded with each resumable step; a rerun whose identity differs is refused with the list of
differences, unless `--resume_anyway`; `--no_resume` starts over. The run's length
(`--num_train_epochs`, `--max_steps`) may change on a resume: a noted difference, not a refusal.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable

from vchat.errors import UserError
from vchat.run_steps import Resumable, StepDirs, remove_stale_temps, write_manifest
from vchat.train_log import LOG_NAME

LOCK_NAME = ".lock"


def add_run_flags(group: argparse._ArgumentGroup) -> None:
    """The flags of this module, in a trainer's parser group."""
    group.add_argument("--resume_anyway", action="store_true",
                       help="resume even though flags, model or data differ from the saved step's (listed)")
    group.add_argument("--no_resume", action="store_true",
                       help="start over: remove the resumable steps and the log of an earlier run in --output_dir")
    group.add_argument("--save_total_limit", type=int, default=2,
                       help="keep the newest N resumable steps (0: keep every one)")
    group.add_argument("--max_nonfinite_skips", type=int, default=0,
                       help="skip up to N steps whose loss or gradient norm is NaN or Inf (0: the first one "
                            "stops the run); vchat train-jax leaves the state as it was, vchat train adds no "
                            "gradient for a micro-batch whose loss is not finite")


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


# -- the run's identity ----------------------------------------------------------------------------------
# flags that change nothing the run computes: where it writes, what it prints, when it stops or saves, how
# it spends memory (the --deepspeed_config file's entries are compared as the trainer's `deepspeed` fact)
CONTROL_FLAGS = frozenset({
    "output_dir", "quiet", "stop_after_steps", "eval_every", "save_every", "log_every", "enable_tensorboard",
    "local_rank", "deepspeed", "deepspeed_config", "data_debug_path", "distributed", "mesh", "resume_anyway",
    "no_resume", "save_total_limit", "max_nonfinite_skips", "save_trainable_only", "gradient_checkpointing"})
# the run's length: a resume may extend or shorten it (the schedule's horizon moves with it), noted
LENGTH_FLAGS = ("num_train_epochs", "max_steps")


class ResumeRefusedError(UserError):
    """The saved step belongs to a different run."""


def run_identity(args: argparse.Namespace, **facts) -> dict:
    """The run's identity: every flag but CONTROL_FLAGS (as `--name`), and the `facts` the trainer adds
    (model, data, world, ...), as plain JSON values."""
    flags = {f"--{k}": v for k, v in sorted(vars(args).items()) if k not in CONTROL_FLAGS}
    return json.loads(json.dumps({"flags": flags, **facts}, default=str))


def model_facts(source, config, tokenizer_json: str) -> dict:
    """What the run starts from: the model's config (a vchat.config.ModelConfig), the size of each file
    of the directories it was read from (`source`: vchat/train_args.py:model_source's answer, a
    checkpoint directory's path or the Hugging Face directories), and the tokenizer's digest."""
    dirs = {"": source} if isinstance(source, str) else {k: getattr(source, f"{k}_dir", None) for k in ("lm", "vision")}
    files = {}
    for label, d in dirs.items():
        for name in sorted(os.listdir(d)) if d and os.path.isdir(d) else ():
            if os.path.isfile(os.path.join(d, name)):
                files[os.path.join(label, name)] = os.path.getsize(os.path.join(d, name))
    return {"config": config.to_dict(), "files": files,
            "tokenizer_sha256": hashlib.sha256(tokenizer_json.encode()).hexdigest()}


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
    and raises DivergedError naming the step and values past that; `require` (an evaluation's loss, the
    state about to be exported) raises at once."""

    def __init__(self, max_skips: int = 0):
        self.max_skips, self.skipped = max_skips, []

    def check(self, step: int, **values: float | None) -> bool:
        what = _non_finite(values)
        if not what:
            return True
        if len(self.skipped) < self.max_skips:
            self.skipped.append(step)
            return False
        self._stop(step, what)

    def require(self, step: int, **values: float | None) -> None:
        if what := _non_finite(values):
            self._stop(step, what)

    def _stop(self, step: int, what: str):
        skips = f" after skipping steps {self.skipped}" if self.skipped else ""
        raise DivergedError(f"step {step}: {what}{skips}; the run stopped without saving or exporting the diverged "
                            f"weights (--max_nonfinite_skips {self.max_skips}); lower --learning_rate, or resume "
                            "from the last resumable step with other flags (--resume_anyway)")


def _non_finite(values: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in values.items() if v is not None and not math.isfinite(v))


# -- the guards of one run ---------------------------------------------------------------------------------
class RunGuard:
    """Every guard of one run; each process of the run makes one, `lead` (the writing process) takes the
    lock and does the writing. `say` prints a line (on the lead process)."""

    def __init__(self, args: argparse.Namespace, steps: StepDirs, lead: bool = True,
                 say: Callable[[str], None] = print):
        self.args, self.steps, self.lead, self.say = args, steps, lead, say
        self.identity: dict | None = None
        self.nonfinite = NonFiniteGuard(args.max_nonfinite_skips)
        self.lock = RunLock(args.output_dir).acquire() if lead else None
        if not lead:
            return
        for line in remove_stale_temps(args.output_dir, (os.path.relpath(steps.root, args.output_dir),)):
            say(f"[run] {line}")
        if args.no_resume:
            removed = steps.remove_all()
            log = os.path.join(args.output_dir, LOG_NAME)
            if os.path.exists(log):
                os.unlink(log)
                removed.append(log)
            if removed:
                say(f"[run] --no_resume: removed {', '.join(removed)}")

    def resume_point(self, identity: dict) -> Resumable | None:
        """The intact step to resume from (None: start fresh, always with --no_resume), after warning about
        each step skipped; raises ResumeRefusedError when it was saved by a different run. `identity` is
        this run's (run_identity), recorded with each step it saves."""
        self.identity = identity
        if self.args.no_resume:
            return None
        found = self.steps.resumable()
        for warning in found.skipped:
            self.say(f"[resume] warning: {warning}")
        if found.step is None:
            return None
        for note in check_resume(found.manifest["identity"], identity, self.args.resume_anyway, found.path):
            self.say(f"[resume] changed since {found.name}: {note}")
        return found

    def begin_save(self, step: int) -> None:
        """Before the framework saves `step`: clear an unfinished earlier save of it."""
        if self.lead:
            self.steps.begin_save(step)

    def end_save(self, step: int) -> None:
        """After every process saved `step`: its manifest (it is intact from now on), `latest`, retention."""
        if not self.lead:
            return
        write_manifest(self.steps.path(step), step, self.identity or {})
        self.steps.point_latest(step)
        for path in self.steps.prune(self.args.save_total_limit):
            self.say(f"[ckpt] removed {path} (--save_total_limit {self.args.save_total_limit})")

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> RunGuard:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
