"""The files of an output directory across runs, for both trainers: the leftovers of killed runs, and the
resumable steps (DeepSpeed's `ds/step12` with its `latest` file, orbax's `state/12`): which are intact,
which one to resume from, and how many to keep. Framework-free; vchat/run_guard.py drives it.

    remove_stale_temps("runs/x", ("ds",))        # .final.tmp*, best.old<pid> (or put back), orbax tmp dirs
    steps = StepDirs("runs/x/ds", r"step(\\d+)", latest="latest")
    found = steps.resumable()                   # the newest intact step; found.skipped: what it passed over
    steps.begin_save(12)                        # an unfinished step12 of an earlier run is cleared first
    ...                                         # the framework writes runs/x/ds/step12
    write_manifest(steps.path(12), 12, identity)   # written last: step12 is intact from now on
    steps.point_latest(12); steps.prune(keep=2)

A step directory is intact when its manifest (`vchat_step.json`, written after the framework's own
files) exists and every file it lists is there with the size it had: a save killed half-way, a
truncated file or a missing step is never resumed from. The manifest also holds the run's identity
(vchat/run_guard.py compares it with a rerun's).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

from vchat.io import writing_file

MANIFEST_NAME = "vchat_step.json"

# -- leftovers of killed runs ---------------------------------------------------------------------------
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
