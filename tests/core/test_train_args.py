"""vchat/train_args.py, vchat/param_groups.py and vchat/train_log.py: the framework-free side of both
trainers (flags and their checks, what the flags mean for a run, parameter groups, the log and curve)."""

import os

import pytest

from vchat.config import preset
from vchat.param_groups import GROUPS, check_parts, group_hparams, group_of, is_trainable
from vchat.train_args import model_source, parse_train_args, total_steps, train_parser, warmup_steps
from vchat.train_log import LOG_NAME, PLOT_NAME, appending_log, plot_losses, read_log, write_log

REQUIRED = ["--lm_model_name_or_path", "tiny", "--output_dir", "out"]


def parse(*flags):
    return parse_train_args(train_parser("vchat test", "test", ("cosine", "linear")).parser, list(flags))


def test_defaults_are_the_reference_ones():
    args = parse(*REQUIRED)
    assert (args.per_device_train_batch_size, args.learning_rate, args.num_train_epochs, args.seed) == (2, 1e-3, 6, 1234)
    assert (args.max_seq_len, args.lr_scheduler_type, args.num_warmup_steps, args.weight_decay) == (4096, "cosine", 0, 0)
    assert args.dataset_names == ["minigpt4"] and args.trainable == ["lang_embed", "projection"]


@pytest.mark.parametrize("flags, message", [
    (["--lm_model_name_or_path", "tiny"], "vchat test: --output_dir is required"),
    (["--output_dir", "o"], "vchat test: --lm_model_name_or_path is required"),
    ([*REQUIRED, "--dataset_names", "llava", "nope"], "vchat test: --dataset_names: unknown dataset(s) ['nope']"),
    ([*REQUIRED, "--trainable", "lang_embed,tower"], "vchat test: --trainable takes parts from"),
    ([*REQUIRED, "--trainable", ","], "vchat test: --trainable takes parts from"),
])
def test_bad_flags_end_with_one_line_naming_the_flag(flags, message):
    with pytest.raises(SystemExit) as e:
        parse(*flags)
    assert str(e.value).startswith(message), e.value


def test_a_trainer_check_runs_after_the_shared_ones():
    from vchat.train_args import FlagError

    def check(args):
        raise FlagError(f"--seed {args.seed} refused")

    with pytest.raises(SystemExit, match="^vchat test: --seed 7 refused$"):
        parse_train_args(train_parser("vchat test", "test", ("cosine",)).parser, [*REQUIRED, "--seed", "7"], check)


def test_run_length_and_warmup():
    assert total_steps(3, 10, 0) == 30 and total_steps(3, 10, 7) == 7 and total_steps(1, 10, 50) == 10
    assert warmup_steps(0.25, 40) == 10 and warmup_steps(1, 40) == 40 and warmup_steps(5, 40) == 5
    assert warmup_steps(0, 40) == 0


def test_model_source(tmp_path):
    cfg = model_source(parse(*REQUIRED, "--enable_mmca_attention", "--compat", "dsvc", "--vis_proj", "perceiver"))
    assert cfg == preset("tiny").replace(mmca=True, compat="dsvc", projection=cfg.projection)
    assert cfg.projection.kind == "perceiver"
    preset("tiny").save(str(tmp_path / "model.json"))  # a config JSON: a new model too
    args = parse("--lm_model_name_or_path", str(tmp_path / "model.json"), "--output_dir", "o")
    assert model_source(args) == preset("tiny").replace(mmca=False, compat="fixed")
    ckpt = tmp_path / "ckpt"  # a checkpoint directory: its path, loaded as saved
    ckpt.mkdir()
    preset("tiny").save(str(ckpt / "config.json"))
    assert model_source(parse("--lm_model_name_or_path", str(ckpt), "--output_dir", "o")) == str(ckpt)
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        model_source(parse("--lm_model_name_or_path", "nope", "--output_dir", "o"))


def test_groups_are_the_reference_rule():
    assert group_of("lang_embed.weight") == "embed_decay"
    assert group_of("projection.0.weight") == "decay" and group_of("projection.0.bias") == "no_decay"
    assert group_of("vis_encoder.vision_model.embeddings.patch_embedding.bias") == "embed_no_decay"
    assert group_of("x.LayerNorm.weight") == "no_decay" and group_of("x.layer_norm.weight") == "decay"
    assert {g: group_hparams(g, 1e-3, 5e-4, 0.1) for g in GROUPS} == {
        "decay": (0.1, 1e-3), "no_decay": (0.0, 1e-3), "embed_decay": (0.1, 5e-4), "embed_no_decay": (0.0, 5e-4)}
    assert group_hparams("embed_decay", 1e-3, 0, 0.1) == (0.1, 1e-3)  # 0: the embed groups take --learning_rate


def test_trainable_parts():
    parts = check_parts(["lang_embed", "projection"])
    assert is_trainable("projection.0.weight".split("."), parts)
    assert not is_trainable("projection.pos_embed".split("."), parts)  # sin-cos tables never train
    assert not is_trainable(("lang_decoder", "lm_head", "kernel"), parts)
    assert is_trainable(("projection", "layers", 0, "kernel"), parts)  # an NNX path
    for bad in ([], ["lang_embed", "tower"]):
        with pytest.raises(ValueError, match="trainable parts must come from"):
            check_parts(bad)


def test_log_and_curve(tmp_path):
    rows = [{"step": 0, "epoch": 0, "eval_loss": 3.0}, {"step": 1, "epoch": 0, "loss": 2.5, "lr": 1e-3},
            {"step": 2, "epoch": 0, "loss": 2.0, "lr": 1e-3}, {"step": 2, "epoch": 0, "eval_loss": float("nan")}]
    assert write_log(str(tmp_path), rows) == str(tmp_path / LOG_NAME)
    back = read_log(str(tmp_path))
    assert back[:3] == rows[:3] and back[3]["eval_loss"] != back[3]["eval_loss"]  # NaN survives
    with appending_log(str(tmp_path)) as append:
        append({"step": 3, "epoch": 1, "loss": 1.5})
        assert read_log(str(tmp_path))[-1]["step"] == 3  # flushed at once
    with appending_log(str(tmp_path), enabled=False) as append:  # not the writing process
        append({"step": 4})
    assert len(read_log(str(tmp_path))) == 5 and read_log(str(tmp_path / "none")) == []
    path = plot_losses(read_log(str(tmp_path)), str(tmp_path))
    assert path == str(tmp_path / PLOT_NAME)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == [PLOT_NAME, LOG_NAME]  # no temporary left behind
