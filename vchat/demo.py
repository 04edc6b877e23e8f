"""`vchat demo` (`make demo`): what vchat does today, on built-in defaults.

1. Every reference golden case (tests/golden) through the PyTorch model: logits, loss and greedy
   tokens against the reference's own outputs.
2. A greedy generation from a reference checkpoint with a two-image prompt, in both compat modes,
   with the KV cache checked against a full prefill.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_GOLDENS = os.path.join(os.path.dirname(HERE), "tests", "golden")


def say(msg: str) -> None:
    print(msg, flush=True)


def main(argv: list[str] | None = None, prog: str = "vchat demo") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--goldens", default=DEFAULT_GOLDENS, help="folder with index.json and the golden cases")
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    say("== 1. reference goldens through vchat_torch ==")
    from vchat import check_logits

    status = check_logits.main([args.goldens, "--atol", "1e-5"], prog="check-logits")

    say("\n== 2. greedy generation with a KV cache ==")
    import numpy as np
    import torch

    from vchat.golden import load_case
    from vchat_torch.checkpoint import from_dsvc

    case_dir = os.path.join(args.goldens, "baseline-mmca")
    config, case = load_case(case_dir)
    prompt = torch.from_numpy(case["gen_input_ids"])
    images = torch.from_numpy(case["gen_images"])
    say(f"prompt: {prompt.shape[1]} tokens, {images.shape[0]} images of {tuple(images.shape[1:])}, "
        f"{config.image_tokens} tokens per image")
    for compat in ("dsvc", "fixed"):
        model = from_dsvc(os.path.join(case_dir, "pytorch_model.bin"), config.replace(compat=compat))
        gen = model.generate(images, prompt, max_new_tokens=args.new_tokens)
        ids = gen.ids[0]
        # The same tokens run as one prefill must give the same last-position logits.
        full = torch.cat([prompt[0], ids[:-1]])[None]
        with torch.no_grad():
            out = model(images, full, torch.ones_like(full), image_num=[images.shape[0]], pad_multiple=1)
        n = ids.shape[0]
        prefill = out.logits[0, -n:]
        note = "" if compat == "fixed" else " (dsvc embeds generated tokens with embed_tokens, so it differs)"
        say(f"compat {compat}: {ids.tolist()}")
        say(f"  KV-cache vs prefill max|diff| {float((prefill - gen.step_logits[0]).abs().max()):.2e}{note}")
    if status == 0:
        golden_ids = case["gen_output_ids"][0, 1:]
        say(f"reference greedy ids (8): {golden_ids.tolist()}")
    say(f"\ndemo finished in {time.perf_counter() - t0:.1f}s; goldens {'all within 1e-5' if status == 0 else 'FAILED'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
