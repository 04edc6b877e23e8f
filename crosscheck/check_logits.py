"""`vchat check-logits`: a checkpoint's forward pass against golden outputs (like MaxText's
forward-pass logit checker). Run it after porting or converting a checkpoint.

    vchat check-logits tests/golden/qwen-mmca
    vchat check-logits tests/golden --atol 1e-5            # every case of index.json
    vchat check-logits tests/golden/vit-mmca --framework jax --mesh data=2,fsdp=2,tensor=2

A case folder holds meta.json, pytorch_model.bin and case.npz (tests/golden/README.md). The exit
status is 0 only when every case is within tolerance.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from vchat.golden import DEFAULT_ATOL, compare, list_cases, load_case


def runner(framework: str, mesh: str | None):
    """The golden runner of a framework: case_dir -> outputs (vchat_torch.golden / vchat_jax.golden)."""
    if framework == "torch":
        if mesh:
            raise SystemExit("--mesh applies to --framework jax only")
        from vchat_torch.golden import run_golden

        return run_golden
    from vchat_jax.golden import run_golden as run_jax
    from vchat_jax.sharding import parse_mesh

    try:
        shape = parse_mesh(mesh)
    except ValueError as e:
        raise SystemExit(f"--mesh: {e}") from None
    return lambda case_dir: run_jax(case_dir, mesh=shape)


def main(argv: list[str] | None = None, prog: str = "vchat check-logits") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("case_dirs", nargs="+", metavar="CASE_DIR",
                    help="a golden case folder, or a folder with index.json listing cases")
    ap.add_argument("--framework", choices=("torch", "jax"), default="torch")
    ap.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="max |logit diff| at non-padding positions")
    ap.add_argument("--loss-atol", type=float, default=1e-5)
    ap.add_argument("--mesh", default=None, help="JAX mesh, e.g. data=2,fsdp=2,tensor=2")
    args = ap.parse_args(argv)

    cases = []
    for d in args.case_dirs:
        cases += list_cases(d) if os.path.exists(os.path.join(d, "index.json")) else [d]
    run = runner(args.framework, args.mesh)
    failed = 0
    for case_dir in cases:
        t0 = time.perf_counter()
        try:
            _, case = load_case(case_dir)
            result = compare(case, run(case_dir))
        except (FileNotFoundError, ValueError) as e:
            print(f"[FAIL] {case_dir}: {e}")
            failed += 1
            continue
        ok = result.ok(atol=args.atol, loss_atol=args.loss_atol)
        failed += not ok
        print(f"[{'ok' if ok else 'FAIL'}] {case_dir} ({args.framework}, {time.perf_counter() - t0:.1f}s)")
        for line in result.lines():
            print(f"    {line}")
    print(f"{len(cases) - failed} of {len(cases)} cases within tolerance (logits atol {args.atol:g})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
