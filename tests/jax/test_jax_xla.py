"""vchat_jax compiles with its own XLA options (vchat_jax/xla.py): no YNNPACK fusions on CPU."""

import jax
import jax.numpy as jnp
import numpy as np

from vchat_jax.xla import jit


def _layer(a, b):
    return jnp.tanh(a @ b).sum(-1)


def test_jit_compiles_without_ynnpack_fusions_and_computes_the_same():
    a = jnp.asarray(np.random.default_rng(0).standard_normal((64, 64)), jnp.float32)
    default = jax.jit(_layer).lower(a, a).compile()
    ours = jit(_layer).lower(a, a).compile()
    if jax.default_backend() == "cpu":
        assert "__ynn_fusion" in default.as_text()  # else the option has nothing left to turn off
    assert "__ynn_fusion" not in ours.as_text()
    np.testing.assert_allclose(ours(a, a), default(a, a), rtol=1e-5, atol=1e-5)
