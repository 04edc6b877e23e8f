"""Run under torchrun: VisualChat.from_hf inside deepspeed.zero.Init (ZeRO-3), then gather every parameter
to rank 0 and save the state dict; each rank reports how many elements it holds."""

import json
import sys

import deepspeed
import torch
import torch.distributed as dist

from vchat_torch.hf import from_hf

lm_dir, vision_dir, out = sys.argv[1:4]
deepspeed.init_distributed(dist_backend="gloo")
rank = dist.get_rank()
ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
model = from_hf(lm_dir, vision_dir, zero3=True, ds_config=ds)
local = sum(p.ds_tensor.numel() for p in model.parameters())
full = sum(p.ds_numel for p in model.parameters())
sd = {}
for name, p in model.named_parameters():
    with deepspeed.zero.GatheredParameters([p]):
        if rank == 0:
            sd[name] = p.data.detach().clone()
if rank == 0:
    torch.save(sd, out)
print("ZERO3", json.dumps({"rank": rank, "local": local, "full": full}), flush=True)
