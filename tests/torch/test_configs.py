"""configs/: the DeepSpeed JSONs pass vchat's checks and DeepSpeed's, one of them trains; the recipes
launch `vchat_torch.train` with the reference's run_7b.sh flags and values (inventory section 3).

The recipes run for real, with a stub `deepspeed` first on PATH that records its arguments; those go
through DeepSpeed's own launcher parser and then vchat's.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from vchat.config import preset
from vchat_torch.train_args import build_parser, ds_config, merge_user_config, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "configs")
BIN = os.path.dirname(sys.executable)
JSONS = {"ds_zero0.json": 0, "ds_zero1.json": 1, "ds_zero2.json": 2, "ds_zero3.json": 3, "ds_zero3_offload.json": 3}
RECIPES = {"run_7b.sh": ("llama2-7b-clip-l14", "clip", 4096, "./Llama-2-7b-hf", "./clip-vit-large-patch14"),
           "run_13b.sh": ("llama2-13b-qwen", "qwen", 5120, "./Llama-2-13b-hf", "./Qwen-VL-Chat"),
           "run_70b.sh": ("llama2-70b-qwen", "qwen", 8192, "./Llama-2-70b-hf", "./Qwen-VL-Chat")}
REFERENCE_DATASETS = ["llava", "llava_dial", "otter_mimicit_cgd", "otter_mimicit_sd", "otter_mimicit_sn",
                      "otter_mimicit_tvc", "otter_mimicit_vst", "llava_otter_blend", "sparkles_dialogue"]


def test_configs_holds_the_files():
    files = set(os.listdir(CONFIGS))
    assert set(JSONS) | set(RECIPES) <= files
    assert {f for f in files if f.endswith(".json")} == set(JSONS)


@pytest.mark.parametrize("name", sorted(JSONS))
def test_deepspeed_json_passes_the_checks(name):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    path = os.path.join(CONFIGS, name)
    with open(path) as f:
        user = json.load(f)
    for precision in ("fp16", "bf16", "fp32"):  # the file leaves precision to the flag
        args = parse_args(["--lm_model_name_or_path", "tiny", "--output_dir", "o", "--precision", precision,
                           "--per_device_train_batch_size", "1"])
        cfg = merge_user_config(ds_config(args, 8), user, path, 8)
        assert cfg["zero_optimization"]["stage"] == JSONS[name]
        assert cfg["train_batch_size"] == 8 and cfg["gradient_clipping"] == 1.0
        assert cfg[precision]["enabled"] if precision != "fp32" else not (cfg["fp16"]["enabled"] or
                                                                         cfg["bf16"]["enabled"])
        args.deepspeed_config = path  # the same through the flag
        assert ds_config(args, 8) == cfg
    zero = DeepSpeedZeroConfig(**cfg["zero_optimization"])  # DeepSpeed's schema: no unknown or misspelled key
    assert zero.stage == JSONS[name]
    offload = name.endswith("offload.json")
    assert (zero.offload_param is not None and zero.offload_param.device == "cpu") == offload
    assert (zero.offload_optimizer is not None and zero.offload_optimizer.device == "cpu") == offload


def test_offload_json_trains_a_lora_model(tmp_path):
    """The file's stage (3) governs, not the --zero_stage flag's default (0): the export gathers."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "vchat.cli", "train", "--lm_model_name_or_path", "tiny", "--dataset_names",
           "synthetic", "--synthetic_samples", "24", "--precision", "fp32", "--per_device_train_batch_size", "4",
           "--num_train_epochs", "1", "--quiet", "--learning_rate", "1e-2", "--lang_lora_dim", "4",
           "--deepspeed_config", os.path.join(CONFIGS, "ds_zero3_offload.json"), "--output_dir", str(out)]
    env = dict(os.environ, DS_ACCELERATOR="cpu", PATH=f"{BIN}:{os.environ['PATH']}", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ZeRO-3" in r.stdout
    losses = [row["loss"] for row in map(json.loads, open(out / "train_log.jsonl")) if "loss" in row]
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.5
    from vchat_torch import VisualChat

    model = VisualChat.from_pretrained(str(out / "final"))
    assert model.lang_decoder.model.layers[0].self_attn.q_proj.weight.shape == (128, 128)


def run_recipe(tmp_path, script, **env_vars):
    stub = tmp_path / "bin" / "deepspeed"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text('#!/usr/bin/env bash\nprintf "%s\\0" "$@" > "$ARGS_OUT"\n')
    stub.chmod(0o755)
    record = tmp_path / "argv"
    env = dict(os.environ, PATH=f"{stub.parent}:{os.environ['PATH']}", ARGS_OUT=str(record), **env_vars)
    r = subprocess.run(["bash", os.path.join(CONFIGS, script)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return record.read_text().split("\0")[:-1]


@pytest.mark.parametrize("script", sorted(RECIPES))
def test_recipe_launches_the_reference_run(tmp_path, script):
    from deepspeed.launcher.runner import parse_args as launcher_args

    model, vision_kind, hidden, lm_dir, vision_dir = RECIPES[script]
    launch = launcher_args(run_recipe(tmp_path, script))
    assert launch.module and launch.user_script == "vchat_torch.train" and launch.num_gpus == 8
    args = parse_args(launch.user_args)  # vchat's parser and its checks
    # run_7b.sh's values
    assert (args.num_train_epochs, args.zero_stage, args.learning_rate, args.num_warmup_steps) == (6, 3, 1e-3, 0.1)
    assert (args.gradient_accumulation_steps, args.per_device_train_batch_size,
            args.per_device_eval_batch_size) == (1, 1, 2)
    assert (args.max_seq_len, args.max_num_image_per_sample, args.vis_proj) == (4096, 8, "baseline")
    assert args.gradient_checkpointing and args.enable_mmca_attention and args.enable_tensorboard
    assert args.dataset_names == REFERENCE_DATASETS and args.dataset_samples == ["all"]
    assert args.dataset_concatenate_samples == [3, 2, 1, 1, 1, 1, 1, 1, 1]
    assert args.data_path == "./data" and args.precision == "fp16" and args.deepspeed_config is None
    # the model: Hugging Face directories, as the reference's recipe (or, set through LLM=, a vchat checkpoint
    # directory or the preset of the right size with random weights)
    assert (args.lm_model_name_or_path, args.vision_model_name_or_path, args.tokenizer) == (lm_dir, vision_dir, None)
    cfg = preset(model)
    assert (cfg.vision.kind, cfg.llm.hidden_size) == (vision_kind, hidden)
    assert args.output_dir.startswith("./output/") and (tmp_path / args.output_dir).is_dir()
    assert (tmp_path / args.output_dir / "training.log").exists()

    # paths are variables; DS_CONFIG adds --deepspeed_config, extra arguments go last
    launch = launcher_args(run_recipe(tmp_path, script, LLM=model, TOKENIZER="ckpt/tokenizer.json",
                                      DATA_PATH="/data/dsvc", NUM_GPUS="2",
                                      DS_CONFIG=os.path.join(CONFIGS, "ds_zero3_offload.json")))
    args = parse_args(launch.user_args)
    assert (launch.num_gpus, args.lm_model_name_or_path, args.tokenizer, args.data_path) == (
        2, model, "ckpt/tokenizer.json", "/data/dsvc")
    assert ds_config(args, 2)["zero_optimization"]["offload_param"]["device"] == "cpu"


@pytest.mark.parametrize("script", sorted(RECIPES))
def test_every_flag_in_the_recipe_text_is_known(script):
    """Also the flags on lines a default run does not reach (e.g. inside ${DS_CONFIG:+...})."""
    text = open(os.path.join(CONFIGS, script)).read()
    command = text[text.index("--module vchat_torch.train") + len("--module vchat_torch.train"):]
    flags = set(re.findall(r"(?<![\w-])--[a-z_]+", command))
    known = build_parser()._option_string_actions
    assert flags and not flags - set(known), flags - set(known)
    assert "--lm_model_name_or_path" in flags and "--deepspeed_config" in flags
