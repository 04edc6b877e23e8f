"""vchat_jax (and the JAX side of the converters) never import torch."""

import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def test_vchat_jax_does_not_import_torch():
    code = ("import sys, vchat_jax, vchat_jax.generate, vchat_jax.golden, vchat_jax.state_dict\n"
            "from vchat_jax.golden import load_golden_model\n"
            "load_golden_model('tests/golden/qwen-mmca')\n"
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
            "assert not bad, bad\n")
    env = dict(os.environ, PYTHONPATH=os.path.abspath(ROOT), JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
