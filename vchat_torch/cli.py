"""`vchat chat` and `vchat eval`: a trained checkpoint, talked to or run over the reference's eval sets.

    vchat chat runs/demo/final                       # rounds of image paths + a question
    vchat eval runs/demo/final eval_single.json --output_filename answers.csv

Both load a vchat checkpoint directory (config.json + model.safetensors, tokenizer.json beside
them or `--tokenizer`) and run `ChatSession` (the KV cache kept between rounds).

The chat follows the reference's loop (`chat/chat.py`): each round asks for image paths
(space-separated, `na` for none; at most 8 images in a chat, a bad path asks again), then for the
text (`quit` ends, `clear` forgets the history, the images and their numbering), and prints
`=========== Round n ===========` with the answer. Unlike the reference, a round may come without
any image, the first one included.

The eval reads the reference's format, `{"test name": [["question", "img1 [img2 ...]"],
["follow-up"], ...]}` (image paths relative to the JSON's folder unless absolute), runs each test's
rounds in one session, and writes the reference's CSV columns `test_name,image_path,question,answer`
(image_path is the round's image field, empty without images). Decoding is greedy, so the output
is a function of the checkpoint; the reference took sampling settings silently from the LLM's
generation_config.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

from vchat.template import MAX_IMAGES


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("checkpoint", help="a vchat checkpoint directory (config.json + model.safetensors)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's)")
    ap.add_argument("--max_new_tokens", type=int, default=256,
                    help="tokens generated per round (the reference's --generation_length_per_round)")


def load(args):
    """(model, tokenizer, image processor) from the parsed flags, with errors that name the file."""
    from vchat.data import ImageProcessor, TextTokenizer

    from .checkpoint import from_pretrained

    if not os.path.isdir(args.checkpoint):
        raise SystemExit(f"{args.checkpoint}: no such checkpoint directory")
    tok_path = args.tokenizer or os.path.join(args.checkpoint, "tokenizer.json")
    if not os.path.exists(tok_path):
        raise SystemExit(f"{tok_path}: no tokenizer (give --tokenizer path/to/tokenizer.json)")
    model = from_pretrained(args.checkpoint).eval()
    tok = TextTokenizer.from_file(tok_path)
    return model, tok, ImageProcessor.for_vision(model.config.vision)


def read_images(proc, paths: list[str], where: str):
    """(n, 3, H, W) pixels of `paths`, or None for none; DataError names the file that fails."""
    return proc.batch(paths, where=where) if paths else None


def chat_loop(session, proc, read, write=print):
    """The reference's chat rounds over `read(prompt) -> line or None (end of input)`; returns the session.
    `quit` ends and `clear` starts over at either prompt."""
    from vchat.data import DataError

    def control(line: str | None) -> str | None:
        """"quit" for quit or end of input, "clear" after clearing the chat, None for anything else."""
        if line is None or line == "quit":
            return "quit"
        if line == "clear":
            session.clear()
            write("(history, images and numbering cleared)")
            return "clear"
        return None

    while True:
        line = read("image paths (space-separated, 'na' for none): ")
        if (act := control(line)) == "quit":
            return session
        if act:
            continue
        paths = [] if line.lower() in ("", "na") else line.split()
        if session.num_images + len(paths) > MAX_IMAGES:
            write(f"a chat holds at most {MAX_IMAGES} images ({session.num_images} so far); 'clear' starts over")
            continue
        try:
            pixels = read_images(proc, paths, "the chat")
        except DataError as e:
            write(f"{e}; try again")
            continue
        text = read("text ('quit' to exit, 'clear' to start over): ")
        if (act := control(text)) == "quit":
            return session
        if act:
            continue
        answer = session.ask(text, pixels)
        write(f"=========== Round {len(session.turns)} ===========")
        write(answer)


def chat_main(argv: list[str] | None = None, prog: str = "vchat chat") -> int:
    from .chat import ChatSession

    ap = argparse.ArgumentParser(prog=prog, description="Chat with a VisualChat checkpoint, images and text by rounds.")
    add_model_args(ap)
    args = ap.parse_args(argv)
    model, tok, proc = load(args)

    def read(prompt: str) -> str | None:
        try:
            return input(prompt).strip()
        except EOFError:
            return None

    chat_loop(ChatSession(model, tok, max_new_tokens=args.max_new_tokens), proc, read,
              lambda text: print(text, flush=True))
    return 0


def read_eval_json(path: str) -> dict[str, list[tuple[str, list[str]]]]:
    """The reference's eval file -> {test: [(question, [image paths])]}; errors name the test and round."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise SystemExit(f"{path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict) or not data:
        raise SystemExit(f"{path}: expected an object of tests, {{\"name\": [[\"question\", \"images\"], ...]}}")
    base = os.path.dirname(os.path.abspath(path))
    tests = {}
    for name, rounds in data.items():
        if not isinstance(rounds, list) or not rounds:
            raise SystemExit(f"{path}: test {name!r} has no rounds")
        parsed = []
        for r, entry in enumerate(rounds):
            if not (isinstance(entry, list) and 1 <= len(entry) <= 2 and all(isinstance(x, str) for x in entry)):
                raise SystemExit(f"{path}: test {name!r} round {r + 1}: expected [\"question\"] or "
                                 f"[\"question\", \"image paths\"], got {entry!r}")
            images = entry[1].split() if len(entry) == 2 else []
            parsed.append((entry[0], [p if os.path.isabs(p) else os.path.join(base, p) for p in images]))
        tests[name] = parsed
    return tests


def eval_main(argv: list[str] | None = None, prog: str = "vchat eval") -> int:
    from .chat import ChatSession

    ap = argparse.ArgumentParser(prog=prog, description="Answer the reference's eval JSON with a checkpoint; write CSV.")
    add_model_args(ap)
    ap.add_argument("eval_data", help="an eval JSON in the reference's format")
    ap.add_argument("--output_filename", default="eval_results.csv")
    args = ap.parse_args(argv)
    tests = read_eval_json(args.eval_data)
    model, tok, proc = load(args)
    rows = []
    for t, (name, rounds) in enumerate(tests.items(), 1):
        session = ChatSession(model, tok, max_new_tokens=args.max_new_tokens)
        for r, (question, paths) in enumerate(rounds, 1):
            if session.num_images + len(paths) > MAX_IMAGES:
                raise SystemExit(f"{args.eval_data}: test {name!r} round {r} brings the chat to "
                                 f"{session.num_images + len(paths)} images (at most {MAX_IMAGES})")
            pixels = read_images(proc, paths, f"{args.eval_data}: test {name!r} round {r}")
            answer = session.ask(question, pixels)
            rows.append({"test_name": name, "image_path": " ".join(paths), "question": question, "answer": answer})
        print(f"[eval] {t}/{len(tests)} {name}: {len(rounds)} round(s)", flush=True)
    out = os.path.abspath(args.output_filename)
    tmp = out + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["test_name", "image_path", "question", "answer"])
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out)
    print(f"[eval] {len(rows)} answers from {len(tests)} tests -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(chat_main())
