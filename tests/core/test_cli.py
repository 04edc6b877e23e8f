"""The `vchat` dispatcher: help, unknown commands, and every command naming a module file that exists (found without importing it)."""

import os
import subprocess
import sys

from vchat.cli import COMMANDS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def vchat(*args):
    return subprocess.run([sys.executable, "-m", "vchat.cli", *args], cwd=ROOT, capture_output=True, text=True)


def test_help_and_unknown_command():
    r = vchat("--help")
    assert r.returncode == 0 and "check-logits" in r.stdout
    r = vchat("frobnicate")
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr


def test_every_command_names_a_module():
    for name, (target, _) in COMMANDS.items():
        path = os.path.join(ROOT, *target.partition(":")[0].split("."))
        assert os.path.exists(path + ".py") or os.path.exists(os.path.join(path, "__init__.py")), \
            f"vchat {name}: no module {target}"
