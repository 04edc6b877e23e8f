"""MMCA for transformers' LlamaForCausalLM, registered through its attention interface.

Mirrors `vchat/attention.py` (the numpy oracle) line for line: `branch_terms` builds each branch's
boolean (key_ok, causal) pair, vectorised over batch x length (no Python loop, unlike the
reference's image-row fix-up, bug B11). `prepare_branches` turns them, once per forward, into what
the kernel takes: an additive 0/-inf bias per branch plus the empty-row fallback. `mmca_attention`
is the function every decoder layer calls; the prepared branches reach it through the model's
forward kwargs (`mmca_branches=`), so no transformers code is copied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.models.llama.modeling_llama import repeat_kv

ATTN_IMPLEMENTATION = "vchat_mmca"


def branch_terms(m_q: torch.Tensor, m_k: torch.Tensor, mmca: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (key_ok, causal) pair of each branch, each (B, Lq, Lk) bool; queries are the last Lq keys."""
    B, Lq = m_q.shape
    Lk = m_k.shape[1]
    qi = torch.arange(Lq, device=m_q.device) + (Lk - Lq)  # (Lq,)
    ki = torch.arange(Lk, device=m_q.device)
    causal = (ki[None, None, :] <= qi[None, :, None]).expand(B, Lq, Lk)
    if not mmca:
        return [((m_k > 0)[:, None, :].expand(B, Lq, Lk), causal)]
    img = (m_k == 2)[:, None, :].expand(B, Lq, Lk)
    img = torch.where((m_q == 2)[:, :, None], (ki[None, None, :] == qi[None, :, None]), img)  # image rows: self only
    txt = (m_k == 1)[:, None, :].expand(B, Lq, Lk)
    return [(img, causal), (txt, causal)]


@dataclass
class Branch:
    bias: torch.Tensor  # (B, 1, Lq, Lk): 0 where allowed, -inf elsewhere; 0 on empty rows
    empty: torch.Tensor  # (B, 1, Lq, 1) bool: rows with no allowed key
    fallback: torch.Tensor | None  # (B, 1, Lq, Lk): the empty rows' weights ("dsvc"), None = zero ("fixed")


def prepare_branches(m_q: torch.Tensor, m_k: torch.Tensor, mmca: bool, compat: str) -> list[Branch]:
    """Turn the boolean terms into kernel inputs, once per forward (shared by every layer)."""
    out = []
    for key_ok, causal in branch_terms(m_q, m_k, mmca):
        allowed = (key_ok & causal)[:, None]  # (B, 1, Lq, Lk)
        empty = ~allowed.any(-1, keepdim=True)
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
        bias = bias.masked_fill(~allowed & ~empty, float("-inf"))
        fallback = None
        if compat == "dsvc":
            uniform = (key_ok ^ causal)[:, None].to(torch.float32)  # entries that are exactly M
            fallback = uniform / uniform.sum(-1, keepdim=True).clamp(min=1.0)
        elif compat != "fixed":
            raise ValueError(f"compat must be 'dsvc' or 'fixed', got {compat!r}")
        out.append(Branch(bias=bias, empty=empty, fallback=fallback))
    return out


def mmca_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    mmca_branches: list[Branch] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (B, H, Lq, hd); k, v: (B, Hkv, Lk, hd). Returns ((B, Lq, H, hd), weights (B, H, Lq, Lk))."""
    if mmca_branches is None:
        raise ValueError("vchat's attention needs `mmca_branches` (call the decoder through VisualChat)")
    key = repeat_kv(key, module.num_key_value_groups)  # (B, H, Lk, hd)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) / math.sqrt(query.shape[-1])  # (B, H, Lq, Lk)
    weights = None
    for br in mmca_branches:
        w = nn.functional.softmax(scores + br.bias, dim=-1, dtype=torch.float32)
        fill = br.fallback if br.fallback is not None else torch.zeros((), dtype=w.dtype, device=w.device)
        w = torch.where(br.empty, fill, w).to(query.dtype)
        weights = w if weights is None else weights + w
    if dropout > 0.0:
        weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value)  # (B, H, Lq, hd)
    return out.transpose(1, 2).contiguous(), weights


AttentionInterface.register(ATTN_IMPLEMENTATION, mmca_attention)
