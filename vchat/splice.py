"""The splice plan: where every image's tokens go in the decoder's input sequence.

The reference (`DeepSpeedViLModel.concat`) replaces each `<image>` token of a sample with the
`image_tokens` projected embeddings of one image, gives those positions modality 2 and label -100,
and right-pads the batch with `lang_embed(pad_id)` to the longest sample, rounded up to a multiple of
8 in training. It pairs image i of a sample with the (N-1-i)-th `<image>` slot (bug B1); compat
"dsvc" keeps that order ("reverse"), "fixed" uses the natural one.

The plan is pure index arithmetic, computed once in numpy and applied by each framework with one
gather: `embeds = where(image_index >= 0, feats.reshape(-1, D)[image_index], lang_embed(ids))`.

Example: ids `[BOS, a, <image>, b, <image>]`, two images X and Y of 2 tokens each, order "reverse"::

    position  0    1   2   3   4   5   6   7
    source    BOS  a   Y0  Y1  b   X0  X1  (pad to 8)
    modality  1    1   2   2   1   2   2   0
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100
ORDERS = ("reverse", "natural")


@dataclass(frozen=True)
class SplicePlan:
    ids: np.ndarray  # (B, L) int64: token to embed with lang_embed (pad id at image and padding slots)
    image_index: np.ndarray  # (B, L) int64: row of feats.reshape(-1, D) for image slots, -1 elsewhere
    modality: np.ndarray  # (B, L) int64: 0 padding, 1 text, 2 image
    labels: np.ndarray  # (B, L) int64: -100 at image slots, padding and masked text
    position_ids: np.ndarray  # (B, L) int64
    lengths: np.ndarray  # (B,) spliced length of each sample before batch padding

    @property
    def shape(self) -> tuple[int, int]:
        return self.ids.shape


def order_for(compat: str) -> str:
    return "reverse" if compat == "dsvc" else "natural"


def positions_from_modality(modality: np.ndarray) -> np.ndarray:
    """Generation position ids: `cumsum(m > 0) - 1`, and 1 at padding (the reference's rule)."""
    valid = modality > 0
    pos = np.cumsum(valid, axis=-1) - 1
    return np.where(valid, pos, 1).astype(np.int64)


def plan_splice(
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    image_num,
    image_tokens: int,
    image_token_id: int,
    pad_token_id: int,
    labels: np.ndarray | None = None,
    order: str = "natural",
    pad_multiple: int = 8,
    positions: str = "arange",
    pad_side: str = "right",
) -> SplicePlan:
    """Plan the splice of a batch.

    input_ids, attention_mask, labels: (B, T) arrays; image_num: images per sample (their features
    are stored sample after sample); image_tokens: embeddings per image. `pad_multiple` rounds the
    batch length up (8 in training, 1 in generation). `positions` is "arange" (training: 0..L-1 over
    the spliced sequence) or "cumsum" (generation: counts non-padding positions). `pad_side` "left"
    right-aligns every sample (batched generation appends new tokens at the end of each row).
    """
    if pad_side not in ("right", "left"):
        raise ValueError(f"pad_side must be 'right' or 'left', got {pad_side!r}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {ids.shape}")
    mask = np.asarray(attention_mask, dtype=np.int64)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    lab = np.full_like(ids, IGNORE_INDEX) if labels is None else np.asarray(labels, dtype=np.int64)
    if lab.shape != ids.shape:
        raise ValueError(f"labels shape {lab.shape} != input_ids shape {ids.shape}")
    nimg = np.asarray(image_num, dtype=np.int64).reshape(-1)
    B = ids.shape[0]
    if nimg.shape[0] != B:
        raise ValueError(f"image_num has {nimg.shape[0]} entries for a batch of {B} samples")

    is_img = ids == image_token_id  # (B, T)
    counts = is_img.sum(axis=1)
    for b in np.nonzero(counts != nimg)[0]:
        raise ValueError(f"sample {b}: {counts[b]} <image> tokens but image_num[{b}] = {nimg[b]}")
    for b in np.nonzero((is_img & (mask == 0)).any(axis=1))[0]:
        raise ValueError(f"sample {b}: an <image> token sits at a padding position (attention_mask 0)")

    width = np.where(is_img, image_tokens, 1)  # (B, T)
    start = np.cumsum(width, axis=1) - width  # (B, T): output position of each source token
    lengths = width.sum(axis=1)
    L = int(lengths.max()) if B else 0
    L = -(-L // pad_multiple) * pad_multiple
    if pad_side == "left":
        start = start + (L - lengths)[:, None]

    out_ids = np.full((B, L), pad_token_id, dtype=np.int64)
    out_img = np.full((B, L), -1, dtype=np.int64)
    out_mod = np.zeros((B, L), dtype=np.int64)
    out_lab = np.full((B, L), IGNORE_INDEX, dtype=np.int64)

    bt, tt = np.nonzero(~is_img)  # text and padding tokens
    pos = start[bt, tt]
    out_ids[bt, pos] = ids[bt, tt]
    out_mod[bt, pos] = (mask[bt, tt] > 0).astype(np.int64)
    out_lab[bt, pos] = lab[bt, tt]

    slot = np.cumsum(is_img, axis=1) - 1  # (B, T): k for the k-th <image> of its sample
    in_sample = (nimg[:, None] - 1 - slot) if order == "reverse" else slot
    first = np.concatenate([[0], np.cumsum(nimg)[:-1]])  # index of each sample's first image
    bi, ti = np.nonzero(is_img)
    r = np.tile(np.arange(image_tokens), bi.shape[0])
    bi_r = np.repeat(bi, image_tokens)
    ti_r = np.repeat(ti, image_tokens)
    pos = start[bi_r, ti_r] + r
    out_img[bi_r, pos] = (first[bi_r] + in_sample[bi_r, ti_r]) * image_tokens + r
    out_mod[bi_r, pos] = 2

    if positions == "arange":
        pos_ids = np.broadcast_to(np.arange(L, dtype=np.int64), (B, L)).copy()
    elif positions == "cumsum":
        pos_ids = positions_from_modality(out_mod)
    else:
        raise ValueError(f"positions must be 'arange' or 'cumsum', got {positions!r}")
    return SplicePlan(ids=out_ids, image_index=out_img, modality=out_mod, labels=out_lab,
                      position_ids=pos_ids, lengths=lengths.astype(np.int64))


def check_image_count(plan: SplicePlan, given: int, image_tokens: int) -> int:
    """The number of images `plan` splices in; raises unless `given` (images passed) is that many."""
    nimg = int((plan.modality == 2).sum()) // image_tokens
    if given != nimg:
        raise ValueError(f"the prompts hold {nimg} <image> tokens but {given} images were given")
    return nimg
