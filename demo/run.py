"""`vchat demo` (`make demo`): the main job, on built-in defaults, end to end on CPU.

1. Generate the synthetic multi-image dataset (PIL shapes, 1-4 images over 1-3 rounds; made in
   memory from the seed, a preview and the tokenizer written to demo_out/data_preview).
2. Measure held-out answer accuracy of an untrained VisualChat (exact match of the greedy answer).
3. Train it with DeepSpeed (`vchat train`, ZeRO-0, fp32, MMCA, compat "fixed") in stages of a
   curriculum: conversations with one image, then up to two, then up to four (the reference's
   `--max_num_image_per_sample`), each stage starting from the last one's checkpoint.
4. Measure held-out accuracy again.
5. Load the trained checkpoint in JAX (vchat_jax) and show both frameworks give the same logits
   and the same answers.
6. Print a two-round, multi-image chat transcript (KV cache kept between rounds).
7. Write demo_out/report.json (accuracy_before, accuracy_after, torch_jax_max_abs_logit_diff,
   answers_agree, wall_seconds, ...) beside the training run's loss_curve.png.

Every question of the synthetic set has chance accuracy <= 0.25 (4 colours, 4 counts, or m + 1
images with m >= 3). The reference goldens are checked too (`vchat check-logits tests/golden`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

import vchat_jax
from crosscheck import check_logits
from vchat.checkpoint_files import TOKENIZER_NAME
from vchat.config import ModelConfig, preset
from vchat.data import (ImageProcessor, SyntheticDataset, TextTokenizer, build_synthetic_tokenizer, dump_samples,
                        split_train_eval)
from vchat.io import writing_file
from vchat_torch import VisualChat
from vchat_torch.chat import ChatSession
from vchat_torch.checkpoint import from_pretrained

from .scoring import Question, accuracy, answer_all, questions, right_pad

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_GOLDENS = os.path.join(ROOT, "tests", "golden")
DEFAULT_CURRICULUM = "1:1200,2:1200,4:6000"


def parse_curriculum(text: str) -> list[tuple[int, int]]:
    """"1:1200,2:1200,4:6000" -> [(1, 1200), (2, 1200), (4, 6000)]: (max images a sample, steps)."""
    stages = []
    for part in text.split(","):
        try:
            m, n = (int(x) for x in part.split(":"))
        except ValueError:
            raise SystemExit(f"--curriculum: {part!r} is not MAX_IMAGES:STEPS (e.g. 1:1200,2:1200,4:6000)") from None
        if not (1 <= m <= 4 and n >= 1):
            raise SystemExit(f"--curriculum: {part!r} needs 1 <= MAX_IMAGES <= 4 and STEPS >= 1")
        stages.append((m, n))
    return stages


def train_env() -> dict:
    """The environment of a `vchat train` subprocess: this checkout first on the import path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def say(msg: str) -> None:
    print(msg, flush=True)


def torch_generate(model: VisualChat):
    def fn(images, ids, mask, image_num):
        out = model.generate(torch.from_numpy(images), torch.from_numpy(ids), torch.from_numpy(mask),
                             image_num=image_num, max_new_tokens=3)
        return out.ids.numpy()

    return fn


def jax_generate(model: vchat_jax.VisualChat):
    def fn(images, ids, mask, image_num):
        return model.generate(images, ids, mask, image_num=image_num, max_new_tokens=3).ids

    return fn


def make_questions(args, cfg: ModelConfig, out: str):
    """Step 1: the held-out split of the synthetic set (as the trainer splits it), its questions and tokenizer."""
    # `vchat train` makes the same samples from the same seed (`synthetic` not found under --data_path);
    # the split below is the trainer's, so no held-out sample is ever trained on.
    dataset = SyntheticDataset(args.samples, seed=args.seed, image_size=cfg.vision.image_size)
    _, held_out = split_train_eval(dataset, 0.9, seed=args.seed)
    preview = os.path.join(out, "data_preview")
    dump_samples(held_out, preview, n=10)
    tok_path = os.path.join(preview, TOKENIZER_NAME)
    build_synthetic_tokenizer().save(tok_path)
    tok = TextTokenizer.from_file(tok_path)
    say(f"{len(dataset)} samples made from seed {args.seed}, {len(held_out)} held out; 10 held-out samples "
        f"(prompt text and PNGs) and {TOKENIZER_NAME} in {preview}")
    proc = ImageProcessor.for_vision(cfg.vision)
    qs = questions([held_out[i] for i in range(len(held_out))], tok, proc, cfg.image_tokens)
    if args.eval_questions:
        qs = qs[:args.eval_questions]
    say(f"{len(qs)} held-out questions; e.g. {tok.decode(qs[0].ids[-14:].tolist())!r} -> {qs[0].answer!r}")
    return held_out, qs, tok, tok_path, proc


def train_curriculum(args, stages: list[tuple[int, int]], out: str, tok_path: str) -> tuple[str, list[str]] | None:
    """Step 3: one `vchat train` process per stage, each from the last one's checkpoint; (final dir, loss
    curves), or None when a stage fails."""
    source, curves = "demo", []
    for k, (max_images, steps) in enumerate(stages, 1):
        run = os.path.join(out, "run", f"stage{k}")
        train_args = ["--lm_model_name_or_path", source, "--data_path", os.path.join(out, "generated"),
                      "--dataset_names", "synthetic", "--synthetic_samples", str(args.samples),
                      "--max_num_image_per_sample", str(max_images), "--tokenizer", tok_path,
                      "--precision", "fp32", "--zero_stage", "0", "--per_device_train_batch_size", str(args.batch_size),
                      "--per_device_eval_batch_size", "32", "--num_train_epochs", "100", "--max_steps", str(steps),
                      "--learning_rate", str(args.learning_rate), "--num_warmup_steps", "0.05",
                      "--enable_mmca_attention", "--compat", "fixed", "--trainable", "lang_embed,projection,lang_decoder",
                      "--eval_every", "2000", "--seed", str(args.seed), "--output_dir", run]
        say(f"-- stage {k}: conversations with up to {max_images} image(s), {steps} steps")
        say("vchat train " + " ".join(train_args))
        # one process per stage, as a user would run them (each sets up and tears down its process group)
        if subprocess.run([sys.executable, "-m", "vchat.cli", "train", *train_args], env=train_env()).returncode:
            say(f"training stage {k} failed")
            return None
        source = os.path.join(run, "final")
        curves.append(os.path.join(run, "loss_curve.png"))
    return source, curves


def compare_jax(model: VisualChat, source: str, qs: list[Question], torch_answers: list[str], tok,
                jax_questions: int) -> dict:
    """Step 5: the checkpoint in JAX: max |logit diff| on 16 prompts, and greedy answers against torch's."""
    jmodel = vchat_jax.VisualChat.from_pretrained(source)
    batch = qs[:16]
    ids, mask = right_pad(batch, tok.pad_id)  # a teacher-forced forward: the same arrays in both frameworks
    images = np.concatenate([q.pixels for q in batch])
    image_num = [q.pixels.shape[0] for q in batch]
    with torch.no_grad():
        t_out = model(torch.from_numpy(images), torch.from_numpy(ids), torch.from_numpy(mask), image_num=image_num)
    j_out = jmodel(images, ids, mask, image_num=image_num)
    valid = t_out.modality.numpy() > 0
    diff = float(np.abs(t_out.logits.numpy() - np.asarray(j_out.logits))[valid].max())
    jqs = qs[:jax_questions] if jax_questions else qs
    agree = sum(a == b for a, b in zip(torch_answers, answer_all(jax_generate(jmodel), jqs, tok)))
    say(f"max |logit diff| torch vs JAX (16 held-out prompts, non-padding positions): {diff:.2e}")
    say(f"greedy answers identical: {agree}/{len(jqs)} (the first {len(jqs)} held-out questions)")
    return {"torch_jax_max_abs_logit_diff": diff, "answers_agree": agree == len(jqs),
            "answers_agree_count": f"{agree}/{len(jqs)}"}


def chat_transcript(model: VisualChat, held_out, tok, proc) -> str:
    """Step 6: two rounds of a held-out conversation with at least two images, one KV cache throughout."""
    sample = next(held_out[i] for i in range(len(held_out))
                  if len(held_out[i].turns) >= 2 and held_out[i].num_images >= 2)
    chat = ChatSession(model, tok, max_new_tokens=8)
    for turn in sample.turns[:2]:
        chat.ask(turn.question, proc.batch(list(turn.images)) if turn.images else None)
    transcript = chat.transcript()
    say(transcript)
    say(f"(expected answers: {[t.answer for t in sample.turns[:2]]})")
    return transcript


def build_parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--samples", type=int, default=30000, help="synthetic samples (90%% train, 10%% held out)")
    ap.add_argument("--curriculum", default=DEFAULT_CURRICULUM,
                    help="training stages, MAX_IMAGES:STEPS comma-separated (default %(default)s)")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--learning_rate", type=float, default=1e-3)
    ap.add_argument("--eval_questions", type=int, default=0, help="held-out questions to score (0: all)")
    ap.add_argument("--jax_questions", type=int, default=400,
                    help="of those, how many JAX answers too, to compare with torch's (0: all)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--goldens", default=DEFAULT_GOLDENS)
    return ap


def main(argv: list[str] | None = None, prog: str = "vchat demo") -> int:
    args = build_parser(prog).parse_args(argv)
    stages = parse_curriculum(args.curriculum)
    t0 = time.perf_counter()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    report: dict = {}

    say("== 0. the reference goldens through vchat_torch ==")
    report["goldens_ok"] = check_logits.main([args.goldens, "--atol", "1e-5"], prog="check-logits") == 0

    say("\n== 1. synthetic multi-image dataset ==")
    cfg = preset("demo")
    held_out, qs, tok, tok_path, proc = make_questions(args, cfg, out)

    say("\n== 2. accuracy before training ==")
    torch.manual_seed(args.seed)
    before = accuracy(answer_all(torch_generate(VisualChat(cfg).eval()), qs, tok), qs)
    report["accuracy_before"] = before["accuracy"]
    say(f"accuracy before: {before['accuracy']:.3f} {before['by_kind']}")

    say(f"\n== 3. training with DeepSpeed (vchat train), a curriculum of {len(stages)} stages ==")
    t_train = time.perf_counter()
    trained = train_curriculum(args, stages, out, tok_path)
    if trained is None:
        return 1
    source, curves = trained
    report["train_seconds"] = round(time.perf_counter() - t_train, 1)
    report["curriculum"] = [{"max_images": m, "steps": n} for m, n in stages]

    say("\n== 4. accuracy after training ==")
    model = from_pretrained(source).eval()
    torch_answers = answer_all(torch_generate(model), qs, tok)
    after = accuracy(torch_answers, qs)
    report.update(accuracy_after=after["accuracy"], held_out_questions=len(qs), accuracy_by_kind=after["by_kind"])
    say(f"accuracy after: {after['accuracy']:.3f} {after['by_kind']}")

    say("\n== 5. the same checkpoint in JAX ==")
    report.update(compare_jax(model, source, qs, torch_answers, tok, args.jax_questions))

    say("\n== 6. a two-round, multi-image chat ==")
    report["chat_transcript"] = chat_transcript(model, held_out, tok, proc)

    report["accuracy_target"] = 0.9
    report["accuracy_target_met"] = report["accuracy_after"] >= 0.9
    report["wall_seconds"] = round(time.perf_counter() - t0, 1)
    report.update(loss_curve=curves[-1], loss_curves=curves, checkpoint=source)
    path = os.path.join(out, "report.json")
    with writing_file(path) as f:
        json.dump(report, f, indent=2)
    say(f"\nreport: {path}; loss curve: {report['loss_curve']}")
    say(f"accuracy {report['accuracy_before']:.3f} -> {report['accuracy_after']:.3f}; torch vs JAX logits "
        f"{report['torch_jax_max_abs_logit_diff']:.1e}; demo took {report['wall_seconds']:.0f}s")
    if not report["accuracy_target_met"]:
        say(f"note: held-out accuracy {report['accuracy_after']:.3f} is below the 0.9 target "
            f"(by kind: {report['accuracy_by_kind']})")
    return 0 if report["goldens_ok"] and report["answers_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
