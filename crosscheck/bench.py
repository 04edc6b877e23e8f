"""`vchat bench`: the vchat MMCA train step against transformers' own LLaMA with SDPA causal attention.

    vchat bench                                         # L = 512 1024 2048 4096: JSON, PNG and a table
    vchat bench --lengths 8192 --batch 1 --images 8     # a long training step in both frameworks
    vchat bench --preset tiny --lengths 64 --repeats 1  # a smoke run

At each spliced length L, three train steps (forward + backward, every decoder weight and lang_embed
trainable, the vision tower frozen) run interleaved in one process (anchor, torch, JAX, anchor, ...),
so that a change in the machine's load hits all three; the medians and their ratios to the anchor
are the result:
- anchor: transformers' LlamaForCausalLM, attention "sdpa" (causal, no mask), on the same decoder
  config and L tokens;
- torch: vchat_torch.VisualChat with MMCA, batch x images images spliced into L positions;
- JAX: vchat_jax.VisualChat, the same batch, `jax.value_and_grad` compiled once before timing.
Peak RSS is measured for each configuration in a process of its own (a few steps, then ru_maxrss);
decode tokens/s with the KV cache from the time of n tokens minus that of one (prefill excluded).
The default decoder is the issue's reference benchmark: LLaMA hidden 512, intermediate 1376, 4 layers,
8 heads, vocab 512; CLIP 32 px / patch 8, width 64, 2 layers; batch 2 x 4 images.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from vchat.config import LLMConfig, ModelConfig, VisionConfig, preset

BENCH_CONFIG = ModelConfig(
    vision=VisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4),
    llm=LLMConfig(vocab_size=512, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=16384),
    mmca=True, compat="fixed", image_pretoken_id=510, image_token_id=511)
RUNNERS = ("anchor", "torch", "jax")
LABELS = {"anchor": "transformers LLaMA, SDPA causal", "torch": "vchat_torch MMCA", "jax": "vchat_jax MMCA"}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in turn (a, b, c, a, b, c, ...) after one warm-up call each."""
    for f in fns.values():
        f()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            times[name].append(timed(f))
    return {name: statistics.median(t) for name, t in times.items()}


def make_batch(cfg: ModelConfig, batch: int, images: int, length: int, seed: int = 0) -> dict:
    """`batch` prompts whose spliced length is exactly `length`: BOS, then per image some text,
    "### Image:" and "<image>", then text; every token supervised."""
    rng = np.random.default_rng(seed)
    T = length - images * (cfg.image_tokens - 1)  # prompt tokens
    n_text = T - 1 - 2 * images
    if n_text < images + 1:
        raise ValueError(f"L = {length} leaves no room for text around {images} images of {cfg.image_tokens} tokens")
    high = min(cfg.image_pretoken_id, cfg.image_token_id, cfg.llm.vocab_size)  # text ids stay below them
    chunks = np.diff(np.linspace(0, n_text, images + 2).astype(int))
    rows = []
    for _ in range(batch):
        row = [cfg.bos_token_id]
        for c in chunks[:-1]:
            row += rng.integers(3, high, c).tolist() + [cfg.image_pretoken_id, cfg.image_token_id]
        rows.append(row + rng.integers(3, high, chunks[-1]).tolist())
    ids = np.asarray(rows, dtype=np.int64)
    size = cfg.vision.image_size
    return dict(images=rng.standard_normal((batch * images, 3, size, size)).astype(np.float32), input_ids=ids,
                attention_mask=np.ones_like(ids), labels=ids.copy(), image_num=[images] * batch, length=length)


# -- the three configurations: each builder returns (train step, generate(n tokens)) -----------------

def build_anchor(cfg: ModelConfig, data: dict):
    import torch
    from transformers import DynamicCache, LlamaForCausalLM

    from vchat_torch.model import llama_config

    torch.manual_seed(0)
    hf = llama_config(cfg)
    hf._attn_implementation = "sdpa"
    model = LlamaForCausalLM(hf)
    ids = torch.randint(3, cfg.llm.vocab_size, (data["input_ids"].shape[0], data["length"]))  # (B, L)

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    @torch.no_grad()
    def generate(n: int):
        out = model(input_ids=ids, cache=DynamicCache(config=hf), use_cache=True)
        for _ in range(n - 1):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), cache=out.cache, use_cache=True)

    return step, generate


def build_torch(cfg: ModelConfig, data: dict):
    import torch

    from vchat_torch.model import VisualChat, forward_planned

    torch.manual_seed(0)
    model = VisualChat(cfg)
    model.lang_decoder.requires_grad_(True)
    model.lang_embed.requires_grad_(True)
    plan = model.plan(data["input_ids"], data["attention_mask"], data["image_num"], data["labels"], pad_multiple=1)
    images = torch.from_numpy(data["images"])

    def step():
        model.zero_grad(set_to_none=True)
        forward_planned(model, plan, images).loss.backward()

    def generate(n: int):
        model.generate(images, data["input_ids"], data["attention_mask"], data["image_num"], max_new_tokens=n,
                       eos_token_id=-1)

    return step, generate


def build_jax(cfg: ModelConfig, data: dict):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from vchat_jax.model import VisualChat, forward_planned
    from vchat_jax.xla import jit

    model = VisualChat(cfg, nnx.Rngs(0))
    trains = nnx.All(nnx.Param, lambda path, _: path[0] in ("lang_decoder", "lang_embed"))
    graphdef, params, rest = nnx.split(model, trains, ...)
    plan = model.plan(data["input_ids"], data["attention_mask"], data["image_num"], data["labels"], pad_multiple=1)
    images = jnp.asarray(data["images"])

    @jit
    def loss_and_grads(params, rest, plan, images):  # the plan is an argument: no constant folding of masks
        return jax.value_and_grad(lambda p: forward_planned(nnx.merge(graphdef, p, rest), plan, images).loss)(params)

    def step():
        jax.block_until_ready(loss_and_grads(params, rest, plan, images))

    def generate(n: int):
        jax.block_until_ready(model.generate(data["images"], data["input_ids"], data["attention_mask"],
                                             data["image_num"], max_new_tokens=n, eos_token_id=-1).ids)

    return step, generate


BUILDERS = {"anchor": build_anchor, "torch": build_torch, "jax": build_jax}


def decode_rate(generate, batch: int, tokens: int, repeats: int) -> float:
    """Tokens/s of decode steps with the cache: batch x (tokens - 1) over t(tokens) - t(1), medians."""
    t = compare({"one": lambda: generate(1), "many": lambda: generate(tokens)}, repeats)
    return batch * (tokens - 1) / max(t["many"] - t["one"], 1e-9)


def peak_rss(argv: list[str], runner: str, length: int) -> float:
    """Peak RSS (MiB) of `runner` at `length`: a fresh process that builds it and runs 3 train steps."""
    cmd = [sys.executable, "-m", "crosscheck.bench", *argv, "--child", runner, "--lengths", str(length)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["rss_mib"]


def vm_hwm_mib() -> float:
    """This process's peak RSS (MiB): VmHWM, which exec resets (ru_maxrss keeps the parent's at the fork)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    Ls = [r["L"] for r in rows]
    panels = [("seconds", "train step (s)"), ("rss_mib", "peak RSS (MiB)"), ("decode_tokens_per_s", "decode tokens/s")]
    panels = [p for p in panels if all(p[0] in r for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for name in result["runners"]:
            ax.plot(Ls, [r[key][name] for r in rows], marker="o", label=LABELS[name])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("spliced length L")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"batch {result['batch']} x {result['images']} images, {result['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv: list[str] | None, prog: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default=None, help="model preset or config JSON (default: the issue's benchmark model)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096], help="spliced lengths L")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--images", type=int, default=4, help="images a sample")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--runners", nargs="+", default=list(RUNNERS), choices=RUNNERS)
    ap.add_argument("--decode_tokens", type=int, default=16, help="tokens in the decode rate (0: no decode)")
    ap.add_argument("--no-rss", dest="rss", action="store_false", help="skip the peak-RSS processes")
    ap.add_argument("--out", default="bench.json", help="the JSON result; the plot goes beside it (.png)")
    ap.add_argument("--child", choices=RUNNERS, help=argparse.SUPPRESS)  # a peak-RSS process
    return ap.parse_args(argv)


def config_of(args) -> ModelConfig:
    return BENCH_CONFIG if args.preset is None else preset(args.preset).replace(mmca=True, compat="fixed")


def main(argv: list[str] | None = None, prog: str = "vchat bench") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv, prog)
    cfg = config_of(args)
    if args.child:
        step, _ = BUILDERS[args.child](cfg, make_batch(cfg, args.batch, args.images, args.lengths[0]))
        for _ in range(3):
            step()
        print(json.dumps({"rss_mib": vm_hwm_mib()}))
        return 0

    import torch

    parent_argv = [a for a in argv if a not in ("--no-rss",)]
    result = {"config": cfg.to_dict(), "batch": args.batch, "images": args.images, "repeats": args.repeats,
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "runners": args.runners,
              "load_average_before": os.getloadavg(), "rows": []}
    print(f"[bench] decoder {cfg.llm.num_hidden_layers} layers x {cfg.llm.hidden_size}, batch {args.batch} x "
          f"{args.images} images of {cfg.image_tokens} tokens, medians of {args.repeats}, torch threads "
          f"{result['threads']}, load average {result['load_average_before'][0]:.1f}", flush=True)
    for L in args.lengths:
        data = make_batch(cfg, args.batch, args.images, L)
        built = {name: BUILDERS[name](cfg, data) for name in args.runners}
        row = {"L": L, "seconds": compare({n: b[0] for n, b in built.items()}, args.repeats)}
        if args.decode_tokens > 1:
            row["decode_tokens_per_s"] = {n: decode_rate(b[1], args.batch, args.decode_tokens, args.repeats)
                                          for n, b in built.items()}
        del built
        if args.rss:
            row["rss_mib"] = {n: peak_rss(parent_argv, n, L) for n in args.runners}
        base = "anchor" if "anchor" in args.runners else args.runners[0]
        row["step_ratio"] = {n: s / row["seconds"][base] for n, s in row["seconds"].items()}
        if args.rss:
            row["rss_ratio"] = {n: m / row["rss_mib"][base] for n, m in row["rss_mib"].items()}
        result["rows"].append(row)
        cells = [f"{n} {row['seconds'][n] * 1e3:8.1f} ms {row['step_ratio'][n]:5.2f}x" +
                 (f" {row['rss_mib'][n]:7.0f} MiB {row['rss_ratio'][n]:5.2f}x" if args.rss else "") +
                 (f" {row['decode_tokens_per_s'][n]:7.1f} tok/s" if "decode_tokens_per_s" in row else "")
                 for n in args.runners]
        print(f"L={L:<5} " + " | ".join(cells), flush=True)
    result["load_average_after"] = os.getloadavg()
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    plot(result, os.path.splitext(args.out)[0] + ".png")
    print(f"[bench] wrote {args.out} and {os.path.splitext(args.out)[0]}.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
