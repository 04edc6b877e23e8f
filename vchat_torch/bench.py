"""`vchat bench`: speed ratios measured in one run, on one model and one batch.

    vchat bench                          # the demo preset, batch 4, 3 images a sample
    vchat bench --preset tiny --repeats 3 --out bench.json

Each row times two ways of doing the same work, interleaved (A, B, A, B, ...) so that a change in the
machine's load hits both, and reports the median seconds of each and their ratio:
- train step, MMCA vs plain causal attention: forward + backward of the same batch (vchat's MMCA
  builds its two masks once per forward, vectorised; the reference fills image rows in a Python loop);
- generation, KV cache vs re-encoding the whole sequence for every new token (what a model without a
  cache does; the reference's chat re-encodes the history every round);
- a 3-round chat, cache kept between rounds vs every round re-encoded (`ChatSession(reuse_cache=...)`);
- forward, vchat_torch vs vchat_jax (jit-compiled once, before timing) on the same weights
  (`--no-jax` leaves it out).
Ratios, not absolute times, are the result: they hold across machines far better than seconds do.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from vchat.io import writing_file


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(a, b, repeats: int) -> tuple[float, float]:
    """Median seconds of `a` and of `b`, run alternately after one warm-up call each."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(timed(a))
        tb.append(timed(b))
    return statistics.median(ta), statistics.median(tb)


def make_batch(cfg, batch: int, images: int, text: int, seed: int = 0) -> dict:
    """`batch` samples of `images` images, each "### Image:" "<image>" after `text` random tokens, then
    `text` more; every text token supervised."""
    rng = np.random.default_rng(seed)
    high = min(cfg.image_pretoken_id, cfg.image_token_id, cfg.llm.vocab_size)  # text ids stay below them
    rows = []
    for _ in range(batch):
        row = [cfg.bos_token_id]
        for _ in range(images):
            row += rng.integers(3, high, text).tolist() + [cfg.image_pretoken_id, cfg.image_token_id]
        rows.append(row + rng.integers(3, high, text).tolist())
    ids = np.asarray(rows, dtype=np.int64)
    size = cfg.vision.image_size
    return dict(images=rng.standard_normal((batch * images, 3, size, size)).astype(np.float32), input_ids=ids,
                attention_mask=np.ones_like(ids), labels=ids.copy(), image_num=[images] * batch)


def main(argv: list[str] | None = None, prog: str = "vchat bench") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="demo", help="model preset or config JSON (default %(default)s)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--images", type=int, default=3, help="images a sample")
    ap.add_argument("--text", type=int, default=40, help="text tokens before each image and after the last")
    ap.add_argument("--new_tokens", type=int, default=16, help="tokens generated in the generation rows")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-jax", dest="jax", action="store_false", help="leave out the torch-vs-JAX row")
    ap.add_argument("--out", default=None, help="also write the rows as JSON")
    args = ap.parse_args(argv)

    import torch

    from vchat.config import preset

    from .chat import ChatSession
    from .generate import generate
    from .model import VisualChat

    torch.manual_seed(0)
    cfg = preset(args.preset).replace(compat="fixed")
    data = make_batch(cfg, args.batch, args.images, args.text)
    t = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in data.items()}
    models = {mmca: VisualChat(cfg.replace(mmca=mmca)) for mmca in (True, False)}
    models[False].load_state_dict(models[True].state_dict())
    for m in models.values():
        m.lang_embed.requires_grad_(True)
    rows = []

    def row(name: str, a_name: str, b_name: str, ta: float, tb: float) -> None:
        rows.append({"bench": name, "a": a_name, "b": b_name, "a_seconds": ta, "b_seconds": tb, "ratio_b_over_a": tb / ta})
        print(f"{name:<22} {a_name:>10} {ta * 1e3:8.1f} ms | {b_name:>10} {tb * 1e3:8.1f} ms | "
              f"{b_name}/{a_name} {tb / ta:6.2f}x", flush=True)

    L = data["input_ids"].shape[1] + args.images * (cfg.image_tokens - 1)
    print(f"[bench] preset {args.preset}: decoder {cfg.llm.num_hidden_layers} layers x {cfg.llm.hidden_size}, "
          f"batch {args.batch} x {L} spliced positions ({args.images} images of {cfg.image_tokens} tokens), "
          f"median of {args.repeats}, torch threads {torch.get_num_threads()}", flush=True)

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(**t).loss.backward()
        return run

    row("train step (fwd+bwd)", "causal", "MMCA", *compare(step(models[False]), step(models[True]), args.repeats))

    model = models[True].eval()
    prompt, mask = t["input_ids"], t["attention_mask"]

    def cached():
        with torch.no_grad():
            generate(model, t["images"], prompt, mask, image_num=t["image_num"], max_new_tokens=args.new_tokens,
                     eos_token_id=-1)

    def reencoded():
        ids = prompt
        with torch.no_grad():
            for _ in range(args.new_tokens):
                out = model(t["images"], ids, torch.ones_like(ids), image_num=t["image_num"], pad_multiple=1)
                ids = torch.cat([ids, out.logits[:, -1].argmax(-1, keepdim=True)], 1)

    row(f"generate {args.new_tokens} tokens", "KV cache", "re-encode", *compare(cached, reencoded, args.repeats))

    class Ids:  # a tokenizer stand-in: a text id per character, "<image>" its own id
        bos_id, eos_id = cfg.bos_token_id, cfg.eos_token_id

        @staticmethod
        def encode(text):
            parts = [[4 + (ord(c) % 40) for c in part] for part in text.split("<image>")]
            return sum((p + [cfg.image_token_id] for p in parts[:-1]), []) + parts[-1]

        @staticmethod
        def decode(ids):
            return " ".join(map(str, ids))

    one = data["images"][:1]

    def chat(reuse: bool):
        def run():
            s = ChatSession(model, Ids, max_new_tokens=args.new_tokens, reuse_cache=reuse)
            for r in range(3):
                s.ask(f"round {r}: what is in the image?" * 3, one)
        return run

    row("3-round chat", "cache kept", "re-encoded", *compare(chat(True), chat(False), args.repeats))

    if args.jax:
        import jax
        from flax import nnx

        import vchat_jax
        from vchat_jax.state_dict import load_state_dict

        jm = vchat_jax.VisualChat(cfg, nnx.Rngs(0))
        load_state_dict(jm, {k: v.detach().numpy() for k, v in model.state_dict().items()})

        def torch_forward():
            with torch.no_grad():
                model(t["images"], prompt, mask, image_num=t["image_num"])

        def jax_forward():
            jax.block_until_ready(jm(data["images"], data["input_ids"], data["attention_mask"],
                                     image_num=data["image_num"])[1])

        row("forward", "torch", "JAX", *compare(torch_forward, jax_forward, args.repeats))

    if args.out:
        with writing_file(args.out) as f:
            json.dump({"preset": args.preset, "batch": args.batch, "images": args.images, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
