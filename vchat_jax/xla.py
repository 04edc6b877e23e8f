"""How vchat_jax compiles: `jit` is `jax.jit` with the XLA options every vchat computation is built with.

On CPU, XLA hands dots, reductions and elementwise fusions to YNNPACK by default. For MMCA's blockwise
kernel (vchat_jax/attention.py: many (B, H, 256, 256) tiles inside while loops) XLA's own emitters are
faster, and the step as a whole gains at every length measured: the reference benchmark's training step
(`vchat bench`, 2 threads) as a ratio to the anchor's, with YNNPACK fusions / without them:
L = 512: 1.34x / 1.24x (block 128); L = 2048: 1.64x / 1.52x (block 128), 1.65x / 1.40x (block 256);
L = 4096: 1.40x without them (block 256). The option is a field of XLA's DebugOptions that only the CPU
compiler reads.
"""

from __future__ import annotations

import functools

import jax

COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}  # "": no YNNPACK fusions

jit = functools.partial(jax.jit, compiler_options=COMPILER_OPTIONS)
