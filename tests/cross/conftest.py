"""Cross-framework tests: float32 with pinned matmul precision in both frameworks, and a table of the worst
torch-vs-JAX differences printed at the end of the run (cross_helpers.RESULTS, filled by the tests), and
written as JSON to $VCHAT_CROSS_REPORT when that is set."""

import json
import os

import jax
import pytest
import torch
from cross_helpers import BF16_RESULTS, COLUMNS, RESULTS

jax.config.update("jax_default_matmul_precision", "highest")
torch.set_float32_matmul_precision("highest")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The models are tiny: OpenMP's fork/join costs more than it saves (5x slower on two busy cores).
    Restored after each module, so the rest of the suite keeps torch's default."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_terminal_summary(terminalreporter):
    if BF16_RESULTS:
        terminalreporter.section("torch vs JAX in bfloat16: per-token KL(torch || JAX), top-1 agreement")
        for combo, r in BF16_RESULTS.items():
            terminalreporter.write_line(f"{combo:<32} KL max {r['kl_max']:.2e}  mean {r['kl_mean']:.2e}  "
                                        f"top-1 {r['top1']:.4f}  greedy tokens equal {r['ids_agree']:.3f}")
    if not RESULTS:
        return
    if os.environ.get("VCHAT_CROSS_REPORT"):
        with open(os.environ["VCHAT_CROSS_REPORT"], "w") as f:
            json.dump(RESULTS, f, indent=1)
    tr = terminalreporter
    tr.section("torch vs JAX: worst differences (float32, matmul precision highest)")
    width = max(len(k) for k in RESULTS)
    tr.write_line(f"{'combo':<{width}}  {'logits':>9}  {'loss':>9}  {'grad rel':>9}  {'step lgt':>9}  ids equal  worst gradient")
    for combo, r in RESULTS.items():
        cells = [f"{r[c]:9.2e}" if c in r and c != "ids_equal" else f"{'-':>9}" for c in COLUMNS[:4]]
        ids = str(r.get("ids_equal", "-"))
        tr.write_line(f"{combo:<{width}}  {'  '.join(cells)}  {ids:<9}  {r.get('grad_tensor', '-')}")
