"""A 2-process ZeRO-3 build from an HF directory (zero.Init, each tensor written into its partitioned
parameter) equals the 1-process model, and no rank holds the whole model."""

import json
import os
import socket
import subprocess
import sys

import torch
from hf_dirs import make_llama_dir

from vchat_torch.hf import from_hf

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BIN = os.path.dirname(sys.executable)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_zero3_build_equals_one_process(tmp_path, clip_dir):
    lm = make_llama_dir(str(tmp_path / "llama"), kv_heads=2, shard_size="20KB")
    out = tmp_path / "sd.pt"
    env = dict(os.environ, DS_ACCELERATOR="cpu", PATH=f"{BIN}:{os.environ['PATH']}", OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT)
    env.pop("RANK", None)
    cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(HERE, "zero3_build.py"), lm, clip_dir, str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [json.loads(line.split("ZERO3 ", 1)[1]) for line in r.stdout.splitlines() if "ZERO3 " in line]
    assert len(ranks) == 2 and all(x["local"] < 0.6 * x["full"] for x in ranks), ranks
    gathered = torch.load(out, weights_only=True)
    want = dict(from_hf(lm, clip_dir).named_parameters())
    assert set(gathered) == set(want)
    assert all(torch.equal(gathered[k], want[k].detach()) for k in want)
