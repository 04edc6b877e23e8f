"""`vchat train`, `vchat chat` and `vchat eval`: training with DeepSpeed, and a trained checkpoint
talked to or run over the reference's eval sets.

    vchat train --lm_model_name_or_path tiny --dataset_names synthetic --precision fp32 --output_dir runs/tiny
    torchrun --nproc_per_node 2 -m vchat_torch.train --zero_stage 3 ...  # the same main, under a launcher
    vchat chat runs/demo/final                       # rounds of image paths + a question
    vchat eval runs/demo/final eval_single.json --output_filename answers.csv

`train_main` parses the flags (vchat/train_args.py, vchat_torch/train_args.py) and runs
vchat_torch/train.py's Trainer; `deepspeed --module vchat_torch.train` (configs/run_*.sh) reaches it
through that module's `__main__` guard.

Both load a vchat checkpoint directory (config.json + model.safetensors, tokenizer.json beside
them or `--tokenizer`) and run `ChatSession` (the KV cache kept between rounds).

The chat follows the reference's loop (`chat/chat.py`): each round asks for image paths
(space-separated, `na` for none; at most 8 images in a chat, a bad path asks again), then for the
text (`quit` ends, `clear` forgets the history, the images and their numbering, an empty line asks
again; the text is the user's: a `<image>` or `### Image:` in it is text, not a template token), and prints
`=========== Round n ===========` with the answer. Unlike the reference, a round may come without
any image, the first one included.

The eval reads the reference's format, `{"test name": [["question", "img1 [img2 ...]"],
["follow-up"], ...]}` (image paths relative to the JSON's folder unless absolute), runs each test's
rounds in one session, and writes the reference's CSV columns `test_name,image_path,question,answer`
(image_path is the round's image field, empty without images). The eval file, every image and the
output path are checked before the first answer (vchat/eval_set.py), and the CSV is rewritten
atomically after each test, so a late failure keeps the answers so far. Decoding is greedy, so the output
is a function of the checkpoint; the reference took sampling settings silently from the LLM's
generation_config.json.
"""

from __future__ import annotations

import argparse
import os
import sys

from vchat.chat import ContextFull
from vchat.checkpoint_files import TOKENIZER_NAME
from vchat.errors import UserError
from vchat.eval_set import AnswerLog, check_output, read_eval_json, where
from vchat.template import MAX_IMAGES


def train_main(argv: list[str] | None = None, prog: str = "vchat train") -> int:
    """`vchat train`: one process of a (possibly multi-process) DeepSpeed run."""
    from vchat.run_guard import RunGuard

    from .distributed import init_distributed, shutdown_distributed
    from .train import Trainer, resumable_steps
    from .train_args import DeepSpeedConfigError, parse_args

    try:
        args = parse_args(argv, prog)  # every flag and the --deepspeed_config entries, before any work
    except DeepSpeedConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    lead = int(os.environ.get("RANK", "0")) == 0  # the writing process: it holds output_dir's lock
    with RunGuard(args, resumable_steps(args.output_dir), lead, print if lead else lambda line: None) as guard:
        os.makedirs(args.output_dir, exist_ok=True)
        rank, world = init_distributed()
        try:
            Trainer(args, rank, world, guard).train(stop_after=args.stop_after_steps)
        except DeepSpeedConfigError as e:
            print(f"{prog}: {e}", file=sys.stderr)
            return 2
        except UserError:  # met by every rank at the same point: a refused resume, a diverged run
            shutdown_distributed()
            raise
        shutdown_distributed()
    return 0


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("checkpoint", help="a vchat checkpoint directory (config.json + model.safetensors)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's)")
    ap.add_argument("--max_new_tokens", type=positive_int, default=256,
                    help="tokens generated per round (the reference's --generation_length_per_round), "
                         "fewer than the model's max_position_embeddings")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse names the flag when it is not)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def tokenizer_path(args) -> str:
    """The tokenizer file, once it and the checkpoint directory are known to exist."""
    if not os.path.isdir(args.checkpoint):
        raise UserError(f"{args.checkpoint}: no such checkpoint directory")
    tok_path = args.tokenizer or os.path.join(args.checkpoint, TOKENIZER_NAME)
    if not os.path.exists(tok_path):
        raise UserError(f"{tok_path}: no tokenizer (give --tokenizer path/to/tokenizer.json)")
    return tok_path


def load(args):
    """(model, tokenizer, image processor) from the parsed flags, with errors that name the file."""
    from vchat.data import TextTokenizer
    from vchat.hf import image_processor

    from .checkpoint import from_pretrained

    tok_path = tokenizer_path(args)
    model = from_pretrained(args.checkpoint).eval()
    context = model.config.llm.max_position_embeddings
    if args.max_new_tokens >= context:
        raise UserError(f"--max_new_tokens {args.max_new_tokens}: must be less than the model's context, "
                        f"max_position_embeddings = {context}")
    c = model.config  # the ids come from the model: a tokenizer need not name them "<s>" / "</s>"
    tok = TextTokenizer.from_file(tok_path, bos_id=c.bos_token_id, eos_id=c.eos_token_id, pad_id=c.pad_token_id,
                                  image_id=c.image_token_id, image_pretoken_id=c.image_pretoken_id)
    return model, tok, image_processor(args.checkpoint, c.vision)  # its preprocessor_config.json, if any


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
        text = ""
        while text == "":  # an empty question is asked again
            text = read("text ('quit' to exit, 'clear' to start over): ")
        if (act := control(text)) == "quit":
            return session
        if act:
            continue
        try:
            answer = session.ask(text, pixels)
        except ContextFull as e:
            write(f"{e}; 'clear' starts over")
            continue
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


def eval_main(argv: list[str] | None = None, prog: str = "vchat eval") -> int:
    """Every input is checked (the eval file, its images, the output path) before the first answer;
    the CSV is rewritten after each test, so a failure keeps the answers so far."""
    from .chat import ChatSession

    ap = argparse.ArgumentParser(prog=prog, description="Answer the reference's eval JSON with a checkpoint; write CSV.")
    add_model_args(ap)
    ap.add_argument("eval_data", help="an eval JSON in the reference's format")
    ap.add_argument("--output_filename", default="eval_results.csv")
    args = ap.parse_args(argv)
    out = check_output(args.output_filename)
    tokenizer_path(args)
    tests = read_eval_json(args.eval_data)
    model, tok, proc = load(args)
    log = AnswerLog(out)
    for t, (name, rounds) in enumerate(tests.items(), 1):
        session, rows = ChatSession(model, tok, max_new_tokens=args.max_new_tokens), []
        for r, (question, paths) in enumerate(rounds, 1):
            at = where(args.eval_data, name, r)
            try:
                answer = session.ask(question, read_images(proc, paths, at))
            except Exception as e:
                said = str(e) if at in str(e) else f"{at}: {e}"
                kept = f"; the answers of the {t - 1} tests before it are in {out}" if t > 1 else ""
                raise (UserError if isinstance(e, UserError) else RuntimeError)(f"{said}{kept}") from e
            rows.append({"test_name": name, "image_path": " ".join(paths), "question": question, "answer": answer})
        log.add(rows)
        print(f"[eval] {t}/{len(tests)} {name}: {len(rounds)} round(s)", flush=True)
    print(f"[eval] {len(log.rows)} answers from {len(tests)} tests -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(chat_main())
