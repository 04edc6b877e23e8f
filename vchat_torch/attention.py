"""MMCA for transformers' LlamaForCausalLM, registered through its attention interface.

`mmca_attention` is the function every decoder layer calls; what it needs about the sequence reaches
it through the model's forward kwargs (`mmca_branches=`, made once per forward by `prepare_branches`),
so no transformers code is copied. Three kernels compute the same thing (reference/MMCA.md), chosen by
`ModelConfig.attention` ("auto" = "flex" on CUDA, "sdpa" elsewhere):

- "dense": the readable twin of the numpy oracle (`vchat/attention.py`): `branch_terms` builds each
  branch's boolean (key_ok, causal) pair, vectorised over batch x length; one additive bias and one
  (B, H, Lq, Lk) softmax per branch; the only kernel that returns attention weights.
- "sdpa" (CPU and any device): `F.scaled_dot_product_attention` per branch, pinned to the flash kernel
  (no L x L tensor in forward or backward). The text (or plain causal) branch is one call with a
  (B, 1, 1, Lk) key mask and `is_causal=True`. The image branch is needed by non-image queries only (an
  image query's image branch is its own value): each run of non-image positions attends, unmasked, to
  the image keys before it, gathered (`ImageRuns`).
- "flex" (CUDA; on CPU its compiled forward runs, inference only): FlexAttention per branch with block
  masks made from per-block summaries of the modality ids (`block_mask`, no dense mask) and mask_mod
  closures for the partial blocks.

A decode step (a few queries against a KV cache, Lq < Lk) takes the same kernels with an explicit
(B, 1, Lq, Lk) mask, O(Lk) per query. Under compat "dsvc" a branch row with no allowed key averages V
over the set X of MMCA.md, by prefix sums in O(L x d) (`empty_row_mean`); under "fixed" it is zero,
which is what both fast kernels give such a row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.models.llama.modeling_llama import repeat_kv

ATTN_IMPLEMENTATION = "vchat_mmca"
FLEX_BLOCK = 128  # FlexAttention's tile (queries and keys)


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


@dataclass
class ImageRuns:
    """The image branch of a prefill for samples that share one layout: `rows` (G,) batch indices,
    `image_keys` (Ni,) positions of the image tokens, `pieces` the sequence cut into runs in order:
    (start, end, c) with c = -1 for a run of image tokens (their own values) and otherwise the number
    of image keys before a run of non-image positions (0: an empty row of the branch)."""

    rows: torch.Tensor
    image_keys: torch.Tensor
    pieces: list[tuple[int, int, int]]


@dataclass
class FastBranches:
    """What the "sdpa" and "flex" kernels need, made once per forward (shared by every layer)."""

    kind: str  # "sdpa" | "flex"
    mmca: bool
    compat: str
    m_q: torch.Tensor  # (B, Lq) modality of the queries, the last Lq keys
    m_k: torch.Tensor  # (B, Lk)
    key_ok: list[torch.Tensor]  # per branch (image, text; or plain) (B, Lk) bool: the branch's keys
    runs: list[ImageRuns] = field(default_factory=list)  # "sdpa" prefill with MMCA
    block_masks: list = field(default_factory=list)  # "flex": one BlockMask per branch

    @property
    def offset(self) -> int:
        return self.m_k.shape[1] - self.m_q.shape[1]


def prepare_branches(m_q: torch.Tensor, m_k: torch.Tensor, mmca: bool, compat: str,
                     attention: str = "dense") -> list[Branch] | FastBranches:
    """Turn the modality ids into kernel inputs, once per forward (shared by every layer)."""
    if compat not in ("dsvc", "fixed"):
        raise ValueError(f"compat must be 'dsvc' or 'fixed', got {compat!r}")
    if attention == "auto":
        attention = "flex" if m_q.is_cuda else "sdpa"
    if attention == "dense":
        return prepare_dense(m_q, m_k, mmca, compat)
    if attention not in ("sdpa", "flex"):
        raise ValueError(f"attention must be 'auto', 'dense', 'sdpa' or 'flex', got {attention!r}")
    key_ok = [m_k == 2, m_k == 1] if mmca else [m_k > 0]
    fast = FastBranches(attention, mmca, compat, m_q, m_k, key_ok)
    if attention == "flex":
        q_ok = [m_q != 2, None] if mmca else [None]
        fast.block_masks = [block_mask(ok, qo, m_q, m_k) for ok, qo in zip(key_ok, q_ok)]
    elif mmca and m_q.shape[1] == m_k.shape[1]:
        fast.runs = image_runs(m_q)
    return fast


def prepare_dense(m_q: torch.Tensor, m_k: torch.Tensor, mmca: bool, compat: str) -> list[Branch]:
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
        out.append(Branch(bias=bias, empty=empty, fallback=fallback))
    return out


def image_runs(m: torch.Tensor) -> list[ImageRuns]:
    """Cut each sample of a prefill (B, L) into runs of image / non-image positions; samples with the
    same layout share one entry."""
    image = (m == 2).cpu().numpy()
    layouts: dict[tuple, list[int]] = {}
    for b, row in enumerate(image):
        cuts = [0, *(np.flatnonzero(row[1:] != row[:-1]) + 1).tolist(), len(row)]
        before = np.cumsum(row)[np.array(cuts[:-1]) - 1] * (np.array(cuts[:-1]) > 0)  # image keys before each run
        pieces = tuple((s, e, -1 if row[s] else int(n)) for s, e, n in zip(cuts[:-1], cuts[1:], before))
        layouts.setdefault(pieces, []).append(b)
    return [ImageRuns(rows=torch.tensor(rows, device=m.device), pieces=list(pieces),
                      image_keys=torch.tensor([i for s, e, c in pieces if c < 0 for i in range(s, e)], dtype=torch.long,
                                              device=m.device))
            for pieces, rows in layouts.items()]


def block_mask(key_ok: torch.Tensor, q_ok: torch.Tensor | None, m_q: torch.Tensor, m_k: torch.Tensor):
    """A FlexAttention BlockMask for `key_ok[b, k] & q_ok[b, q] & (k <= q + offset)` made from per-tile
    summaries (any / all of the ids in a tile), never a dense mask; mask_mod settles the partial tiles."""
    from torch.nn.attention.flex_attention import BlockMask

    B, Lq = m_q.shape
    Lk = m_k.shape[1]
    off, S = Lk - Lq, FLEX_BLOCK
    nq, nk = -(-Lq // S), -(-Lk // S)
    q_ok_t = torch.ones_like(m_q, dtype=torch.bool) if q_ok is None else q_ok

    def tiles(ok: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:  # (B, n) any, all; padding is not ok
        t = F.pad(ok, (0, n * S - ok.shape[1])).view(ok.shape[0], n, S)  # (B, n, S)
        return t.any(-1), t.all(-1)

    (k_any, k_all), (q_any, q_all) = tiles(key_ok, nk), tiles(q_ok_t, nq)
    q_first = torch.arange(nq, device=m_q.device) * S + off  # (nq,) key index of each tile's first query
    q_last = (q_first + S - 1).clamp(max=Lk - 1)
    k_first = torch.arange(nk, device=m_q.device) * S
    some = (k_first[None, :] <= q_last[:, None])[None] & q_any[:, :, None] & k_any[:, None, :]  # (B, nq, nk)
    full = (k_first[None, :] + S - 1 <= q_first[:, None])[None] & q_all[:, :, None] & k_all[:, None, :]
    partial = some & ~full

    def ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, 1, nq), (B, 1, nq, nk)
        idx = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True)
        return blocks.sum(-1, dtype=torch.int32)[:, None], idx.to(torch.int32)[:, None]

    def mask_mod(b, h, q, k):
        ok = key_ok[b, k] & (k <= q + off)
        return ok if q_ok is None else ok & q_ok[b, q]

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=S, mask_mod=mask_mod,
                                    seq_lengths=(Lq, Lk))


def empty_row_mean(value: torch.Tensor, key_ok: torch.Tensor, offset: int,
                   rows: torch.Tensor | None = None) -> torch.Tensor | None:
    """compat "dsvc": the output of a branch's empty rows, (B, Hkv, Lq, D), zero on other rows (None
    if there is no empty row). value: (B, Hkv, Lk, D); key_ok: (B, Lk) the branch's keys; rows:
    (B, Lq) bool, the rows the branch applies to (default all). A row q (key index qi = offset + q) is
    empty when no key k <= qi is ok, so empty rows are among the first n; such a row averages V over
    X = {k <= qi} + {k > qi, key ok}."""
    Lq = value.shape[2] - offset
    qi = torch.arange(Lq, device=value.device) + offset  # (Lq,)
    empty = key_ok.cumsum(-1)[:, qi] == 0  # (B, Lq)
    if rows is not None:
        empty &= rows
    if not bool(empty.any()):
        return None
    n = int(empty.any(0).nonzero().max()) + 1  # rows up to the last empty one, keys up to offset + n
    v = value.float()
    prefix = v[:, :, : offset + n].cumsum(2)[:, :, offset:]  # (B, Hkv, n, D)
    total = torch.einsum("bk,bhkd->bhd", key_ok.to(v.dtype), v)[:, :, None]  # (B, Hkv, 1, D)
    count = qi[None, :n] + 1 + key_ok.sum(-1, keepdim=True)  # (B, n) |X| of an empty row
    mean = torch.where(empty[:, None, :n, None], (prefix + total) / count[:, None, :, None], 0.0)
    return F.pad(mean, (0, 0, 0, Lq - n)).to(value.dtype)  # (B, Hkv, Lq, D)


def sdpa(q, k, v, mask=None, causal=False, dropout=0.0) -> torch.Tensor:
    """SDPA pinned to the flash kernel on CPU (it takes a key mask with is_causal) and to the
    memory-efficient one elsewhere: never the math backend, which builds the weights."""
    backend = SDPBackend.FLASH_ATTENTION if q.device.type == "cpu" else SDPBackend.EFFICIENT_ATTENTION
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout)


def key_masked(q, k, v, key_ok, offset, dropout) -> torch.Tensor:
    """Causal attention over the keys where key_ok (B, Lk): (B, H, Lq, D); an empty row gives 0."""
    if offset == 0:
        return sdpa(q, k, v, key_ok[:, None, None, :], causal=True, dropout=dropout)
    qi = torch.arange(q.shape[2], device=q.device) + offset
    causal = torch.arange(k.shape[2], device=q.device)[None, :] <= qi[:, None]  # (Lq, Lk), Lq a few queries
    return sdpa(q, k, v, key_ok[:, None, None, :] & causal, dropout=dropout)


def image_branch_prefill(q, k, v, runs: list[ImageRuns], dropout) -> torch.Tensor:
    """The image branch of a prefill, (B, H, L, D): image rows take their own value, each run of
    non-image rows attends to the (gathered) image keys before it, rows with none give 0."""
    out = None
    for r in runs:
        one = len(runs) == 1
        qg, kg, vg = (x if one else x.index_select(0, r.rows) for x in (q, k, v))
        k_img, v_img = kg.index_select(2, r.image_keys), vg.index_select(2, r.image_keys)  # (G, H, Ni, D)
        sizes = [e - s for s, e, _ in r.pieces]
        pieces = []
        for (s, e, c), q_run, v_run in zip(r.pieces, qg.split(sizes, 2), vg.split(sizes, 2)):
            if c < 0:
                pieces.append(v_run)
            elif c == 0:
                pieces.append(torch.zeros_like(v_run))
            else:
                pieces.append(sdpa(q_run, k_img[:, :, :c], v_img[:, :, :c], dropout=dropout))
        part = torch.cat(pieces, dim=2)  # (G, H, L, D)
        if one:
            return part
        out = (q.new_zeros(q.shape) if out is None else out).index_copy(0, r.rows, part)
    return out


@lru_cache(maxsize=1)
def compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def fast_attention(module: nn.Module, query, key, value, fast: FastBranches, dropout: float) -> torch.Tensor:
    """q: (B, H, Lq, hd); k, v: (B, Hkv, Lk, hd) -> (B, H, Lq, hd), no weights."""
    n_rep = module.num_key_value_groups
    k, v = repeat_kv(key, n_rep), repeat_kv(value, n_rep)  # (B, H, Lk, hd)
    off = fast.offset
    dropout = dropout if module.training else 0.0
    outs = []
    for i, ok in enumerate(fast.key_ok):
        image = fast.mmca and i == 0
        if fast.kind == "flex":
            o = compiled_flex()(query, k, v, block_mask=fast.block_masks[i])
            if image:  # image rows: their own value
                o = o + torch.where((fast.m_q == 2)[:, None, :, None], v[:, :, off:], 0.0)
        elif image and fast.runs:
            o = image_branch_prefill(query, k, v, fast.runs, dropout)
        elif image:  # a decode step: the oracle's terms, (B, 1, Lq, Lk)
            key_ok, causal = branch_terms(fast.m_q, fast.m_k, True)[0]
            o = sdpa(query, k, v, (key_ok & causal)[:, None], dropout=dropout)
        else:
            o = key_masked(query, k, v, ok, off, dropout)
        if fast.compat == "dsvc":
            fill = empty_row_mean(value, ok, off, (fast.m_q != 2) if image else None)
            o = o if fill is None else o + repeat_kv(fill, n_rep)
        outs.append(o)
    return sum(outs)


def mmca_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    mmca_branches: list[Branch] | FastBranches | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q: (B, H, Lq, hd); k, v: (B, Hkv, Lk, hd). Returns ((B, Lq, H, hd), weights (B, H, Lq, Lk) from
    the dense kernel, None from the fast ones)."""
    if mmca_branches is None:
        raise ValueError("vchat's attention needs `mmca_branches` (call the decoder through VisualChat)")
    if isinstance(mmca_branches, FastBranches):
        out = fast_attention(module, query, key, value, mmca_branches, dropout)  # (B, H, Lq, hd)
        return out.transpose(1, 2).contiguous(), None
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
