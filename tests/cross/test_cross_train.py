"""vchat_jax's training step against vchat_torch's optimizer: the same weights (converted with
vchat_jax/state_dict.py) and batch, torch.optim.AdamW over vchat_torch.optim.param_groups with transformers'
scheduler and clip_grad_norm_(1.0) (what `vchat train` hands DeepSpeed), against `vchat_jax.train.Trainer`.
The updated trainable parameters agree to 1e-5 after each of three steps (a warmup step with lr 0, then
two with moments in play), and the schedules match transformers' own."""

import jax
import numpy as np
import torch
from cross_helpers import make_batch, make_config, make_pair
from transformers import get_scheduler

from vchat_jax.state_dict import to_state_dict
from vchat_jax.optim import SCHEDULES, OptimizerConfig, lr_lambda
from vchat_jax.train import Trainer
from vchat_torch.optim import param_groups

LR, LR_SMALL, WD, TOTAL, WARMUP = 1e-3, 5e-4, 0.1, 8, 0.125  # warmup <= 1 is a ratio: 1 step of 8
TOL = 1e-5


def test_schedules_match_transformers():
    for kind in SCHEDULES:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = get_scheduler(kind, opt, num_warmup_steps=3, num_training_steps=10)
        lam = lr_lambda(kind, 3, 10)
        for step in range(12):
            assert abs(float(lam(step)) - opt.param_groups[0]["lr"]) < 1e-6, (kind, step)
            opt.step()
            sched.step()


def test_three_steps_match_torch_adamw():
    config = make_config()
    tm, jm = make_pair(config)
    b = make_batch(config)
    tm.train()
    trainable = [n for n, p in tm.named_parameters() if p.requires_grad]
    assert {n.split(".")[0] for n in trainable} == {"lang_embed", "projection"}
    opt = torch.optim.AdamW(param_groups(tm, LR, LR_SMALL, WD), lr=LR, betas=(0.9, 0.95), eps=1e-6)
    cfg = OptimizerConfig(learning_rate=LR, learning_rate_pretraining_components=LR_SMALL, weight_decay=WD,
                          lr_scheduler_type="linear", num_warmup_steps=WARMUP, total_steps=TOTAL)
    assert cfg.warmup_steps == 1
    sched = get_scheduler("linear", opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=TOTAL)
    trainer = Trainer(jm, cfg, batch_size=3)
    state = trainer.init_state()
    arrays = trainer.plan({"input_ids": b["ids"], "attention_mask": b["mask"], "labels": b["labels"],
                           "images": b["images"], "image_num": b["image_num"]})
    t = torch.from_numpy
    start = {n: p.detach().clone() for n, p in tm.named_parameters() if p.requires_grad}
    worst = []
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        out = tm(t(b["images"]), t(b["ids"]), t(b["mask"]), labels=t(b["labels"]), image_num=t(b["image_num"]))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in tm.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        state, m = trainer.step(state, arrays)
        assert abs(float(m["loss"]) - float(out.loss.detach())) < 1e-5, step
        got = to_state_dict(trainer.model(state))
        diff = {n: float(np.abs(got[n] - p.detach().numpy()).max()) for n, p in tm.named_parameters()
                if p.requires_grad}
        worst.append(max(diff.values()))
        assert worst[-1] <= TOL, (step, sorted(diff.items(), key=lambda kv: -kv[1])[:3])
    moved = max(float((p.detach() - start[n]).abs().max()) for n, p in tm.named_parameters() if p.requires_grad)
    print(f"torch AdamW vs vchat_jax.train: max |param diff| per step {['%.2e' % w for w in worst]} "
          f"(params moved up to {moved:.2e})")
    assert moved > 1e-4  # steps 2 and 3 moved the parameters (step 1 is warmup: lr 0)
    frozen = jax.tree.leaves(state.frozen)
    assert all(np.isfinite(np.asarray(x)).all() for x in frozen)


def test_both_trainers_take_the_shared_flags_alike():
    """The flags of vchat/train_args.py are in both parsers with the same defaults and parse alike."""
    from vchat.train_args import train_parser
    from vchat_jax.cli import build_parser as jax_parser
    from vchat_jax.cli import parse_args as jax_args
    from vchat_torch.train_args import build_parser as torch_parser
    from vchat_torch.train_args import parse_args as torch_args

    shared = {a.dest: a.default for a in train_parser("p", "d", SCHEDULES).parser._actions if a.dest != "help"}
    for parser in (torch_parser(), jax_parser()):
        assert {d: a.default for a in parser._actions if (d := a.dest) in shared} == shared
    argv = ["--lm_model_name_or_path", "tiny", "--output_dir", "o", "--dataset_names", "synthetic", "--trainable",
            "lang_embed,lang_decoder", "--learning_rate", "3e-4", "--num_warmup_steps", "0.1", "--max_steps", "9",
            "--lr_scheduler_type", "linear", "--enable_mmca_attention", "--vis_proj", "perceiver", "--quiet"]
    t, j = vars(torch_args(argv)), vars(jax_args(argv))
    assert {k: t[k] for k in shared} == {k: j[k] for k in shared}
    assert t["trainable"] == ["lang_embed", "lang_decoder"]
