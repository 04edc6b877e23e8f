"""Generation with a KV cache: batched (left-padded), greedy or sampled.

Reproduces the reference's `generate` (which wraps transformers' generate, batch size 1): the first
step runs the spliced prompt (no batch padding to 8, positions `cumsum(mask > 0) - 1`); each later
step feeds one token against the cache. compat "dsvc" embeds each generated token with the
decoder's own `embed_tokens` (bug B2); "fixed" with `lang_embed`, as in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from vchat.splice import check_image_count

from .model import VisualChat


@dataclass
class GenerateOutput:
    ids: torch.Tensor  # (B, n) generated tokens (pad after EOS)
    step_logits: torch.Tensor  # (B, n, V) last-position logits of every step
    cache: object = None
    modality: torch.Tensor | None = None  # (B, L + n) modality of every cached position


def pick_next(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
              generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) -> (B,) next tokens: argmax, or a sample after temperature, top-k and top-p."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, 1e-6)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: VisualChat, images, input_ids, attention_mask=None, image_num=None, max_new_tokens: int = 128,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id: int | None = None, seed: int | None = None) -> GenerateOutput:
    """input_ids: (B, T) prompts, left-padded (attention_mask 0 on the padding); images: every image
    of the batch in sample order, or None; image_num: images per sample (default: each row's <image>
    count). Sampling draws from a torch.Generator seeded with `seed` (None: torch's global generator).
    Stops when every row has produced EOS or after max_new_tokens."""
    cfg = model.config
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    plan = model.plan(input_ids, attention_mask, image_num, pad_multiple=1, positions="cumsum", pad_side="left")
    n_images = check_image_count(plan, 0 if images is None else int(images.shape[0]), cfg.image_tokens)
    B = plan.shape[0]
    feats = model.encode_images(torch.as_tensor(images, device=model.device)) if n_images else None
    embeds = model.splice(plan, feats)
    modality = torch.as_tensor(plan.modality, device=model.device)  # (B, L)
    positions = torch.as_tensor(plan.position_ids, device=model.device)
    next_pos = positions.max(-1).values + 1  # (B,)
    embed_new = model.lang_decoder.model.embed_tokens if cfg.compat == "dsvc" else model.lang_embed
    generator = None if seed is None else torch.Generator(model.device).manual_seed(seed)

    cache = DynamicCache(config=model.lang_decoder.config)
    logits, cache = model.decode(embeds, modality, positions, cache=cache)
    done = torch.zeros(B, dtype=torch.bool, device=model.device)
    out_ids, out_logits = [], []
    for step in range(max_new_tokens):
        last = logits[:, -1].float()  # (B, V)
        tok = pick_next(last, do_sample, temperature, top_k, top_p, generator)
        tok = torch.where(done, torch.full_like(tok, cfg.pad_token_id), tok)
        out_ids.append(tok)
        out_logits.append(last)
        done = done | (tok == eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        ones = torch.ones(B, 1, dtype=modality.dtype, device=model.device)
        modality = torch.cat([modality, ones], dim=1)  # generated tokens are text
        logits, cache = model.decode(embed_new(tok[:, None]), ones, next_pos[:, None], cache=cache, m_keys=modality)
        next_pos = next_pos + 1
    return GenerateOutput(ids=torch.stack(out_ids, 1), step_logits=torch.stack(out_logits, 1), cache=cache,
                          modality=modality)
