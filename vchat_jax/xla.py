"""How vchat_jax compiles: `jit` is `jax.jit` with the XLA options every vchat computation is built with.

On CPU, XLA hands dots, reductions and elementwise fusions to YNNPACK by default. For MMCA's blockwise
kernel (vchat_jax/attention.py: many (B, H, 256, 256) tiles inside while loops) XLA's own emitters are
faster, and the rest of the step does not lose by it: the reference benchmark's training step (`vchat bench`,
2 threads) took 1.64x the anchor's time at L = 2048 with YNNPACK fusions and 1.40x without (1.52x with
block 128), 1.40x at L = 4096. The option is a field of XLA's DebugOptions that only the CPU compiler
reads; other backends ignore it. Options given here win over the same option in XLA_FLAGS.
"""

from __future__ import annotations

import functools

import jax

COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}  # "": no YNNPACK fusions

jit = functools.partial(jax.jit, compiler_options=COMPILER_OPTIONS)
