"""VisualChat in PyTorch: the reference's `DeepSpeedViLModel` on transformers' own CLIP and LLaMA.

Submodules keep the reference's names, so a reference checkpoint's keys are this model's
state-dict keys: `vis_encoder` (frozen), `projection` (trainable), `lang_embed` (a trainable copy of
the decoder's embedding table: every prompt token is embedded with it) and `lang_decoder` (a frozen
`LlamaForCausalLM` whose attention is MMCA, see attention.py).

Forward: vision features -> projection -> the splice plan (vchat/splice.py) places them at the
`<image>` slots -> the decoder reads the spliced embeddings -> logits and the loss of
reference/MMCA.md.

The public API mirrors vchat_jax.VisualChat method for method (encode_images, plan, splice, decode,
forward / __call__, generate, save_pretrained, from_pretrained; VisualChatOutput; forward_planned):
docs/ARCHITECTURE.md lists it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from vchat.config import ModelConfig
from vchat.splice import IGNORE_INDEX, SplicePlan, check_image_count, order_for, plan_splice

from .attention import ATTN_IMPLEMENTATION, prepare_branches
from .projection import build_projection
from .vision import build_vision


def llama_config(cfg: ModelConfig) -> LlamaConfig:
    c = cfg.llm
    hf = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                     num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                     num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps,
                     rope_theta=c.rope_theta, max_position_embeddings=c.max_position_embeddings,
                     hidden_act=c.hidden_act, tie_word_embeddings=c.tie_word_embeddings,
                     initializer_range=c.initializer_range, bos_token_id=cfg.bos_token_id,
                     eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    hf._attn_implementation = ATTN_IMPLEMENTATION
    return hf


def as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@dataclass
class VisualChatOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor  # (B, L, V)
    modality: torch.Tensor  # (B, L): 0 padding, 1 text, 2 image
    labels: torch.Tensor  # (B, L) spliced labels


def visualchat_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits[:, :-1] against labels[:, 1:], averaged over every supervised token of
    the batch; with none, the reference falls back on the last two positions of the flattened batch."""
    V = logits.shape[-1]
    shift_logits = logits[:, :-1].reshape(-1, V)
    shift_labels = labels[:, 1:].reshape(-1)
    keep = shift_labels != IGNORE_INDEX
    if not bool(keep.any()):
        shift_logits, shift_labels = shift_logits[-2:], shift_labels[-2:]
    else:
        shift_logits, shift_labels = shift_logits[keep], shift_labels[keep]
    return nn.functional.cross_entropy(shift_logits.float(), shift_labels)


class VisualChat(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vis_encoder = build_vision(config.vision)
        self.projection = build_projection(config)
        self.lang_decoder = LlamaForCausalLM(llama_config(config))
        self.lang_embed = nn.Embedding(config.llm.vocab_size, config.llm.hidden_size)
        with torch.no_grad():
            self.lang_embed.weight.copy_(self.lang_decoder.model.embed_tokens.weight)
        self.vis_encoder.requires_grad_(False)
        self.lang_decoder.requires_grad_(False)

    # -- pieces ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.lang_embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lang_embed.weight.dtype

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) pixels (cast to the tower's dtype) -> (N, image_tokens, hidden) projected features."""
        images = images.to(next(self.vis_encoder.parameters()).dtype)
        if any(p.requires_grad for p in self.vis_encoder.parameters()):  # LoRA on the tower
            feats = self.vis_encoder(images)
        else:
            with torch.no_grad():
                feats = self.vis_encoder(images)
        return self.projection(feats.to(self.dtype))

    def plan(self, input_ids, attention_mask=None, image_num=None, labels=None, pad_multiple: int = 8,
             positions: str = "arange", pad_side: str = "right") -> SplicePlan:
        """The splice plan (numpy) of a batch; image_num defaults to each row's count of <image> tokens."""
        cfg = self.config
        ids = as_numpy(input_ids)
        mask = np.ones_like(ids) if attention_mask is None else as_numpy(attention_mask)
        if image_num is None:
            image_num = (ids == cfg.image_token_id).sum(axis=1)
        return plan_splice(ids, mask, as_numpy(image_num), cfg.image_tokens, cfg.image_token_id, cfg.pad_token_id,
                           None if labels is None else as_numpy(labels), order=order_for(cfg.compat),
                           pad_multiple=pad_multiple, positions=positions, pad_side=pad_side)

    def splice(self, plan: SplicePlan, feats: torch.Tensor | None) -> torch.Tensor:
        """Embeddings (B, L, hidden): lang_embed for text and padding, image features at image slots."""
        ids = torch.as_tensor(plan.ids, device=self.device)
        embeds = self.lang_embed(ids)  # (B, L, D)
        if feats is None or feats.shape[0] == 0:
            return embeds
        index = torch.as_tensor(plan.image_index, device=self.device)
        flat = feats.reshape(-1, feats.shape[-1])  # (N * T, D)
        picked = flat[index.clamp(min=0)]  # (B, L, D)
        return torch.where((index >= 0)[..., None], picked.to(embeds.dtype), embeds)

    def decode(self, embeds, modality, position_ids, cache=None, m_keys=None) -> tuple[torch.Tensor, object]:
        """Run the decoder on embeddings (B, Lq, D); `m_keys` is the modality of every key (cache
        included), `modality` that of the queries. Returns logits and the updated cache."""
        m_keys = modality if m_keys is None else m_keys
        branches = prepare_branches(modality, m_keys, self.config.mmca, self.config.compat, self.config.attention)
        out = self.lang_decoder(inputs_embeds=embeds, position_ids=position_ids, cache=cache,
                                use_cache=cache is not None, mmca_branches=branches)
        return out.logits, out.cache

    # -- the model ---------------------------------------------------------------------------------
    def forward(self, images, input_ids, attention_mask=None, labels=None, image_num=None,
                pad_multiple: int = 8) -> VisualChatOutput:
        """images: (sum image_num, 3, H, W) in sample order, or None; input_ids, attention_mask, labels:
        (B, T). Returns the loss (when labels are given) and logits over the spliced sequence."""
        plan = self.plan(input_ids, attention_mask, image_num, labels, pad_multiple=pad_multiple)
        nimg = check_image_count(plan, 0 if images is None else int(images.shape[0]), self.config.image_tokens)
        images = torch.as_tensor(images, device=self.device) if nimg else None
        return forward_planned(self, plan, images, with_loss=labels is not None)

    # -- checkpoints and generation live beside the model --------------------------------------------
    def save_pretrained(self, path: str, trainable_only: bool = False, extra_files: dict | None = None) -> None:
        """See vchat_torch.checkpoint.save_pretrained."""
        from .checkpoint import save_pretrained

        save_pretrained(self, path, trainable_only=trainable_only, extra_files=extra_files)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "VisualChat":
        """See vchat_torch.checkpoint.from_pretrained."""
        from .checkpoint import from_pretrained

        return from_pretrained(path, **kwargs)

    def generate(self, images, input_ids, attention_mask=None, image_num=None, **kwargs):
        """See vchat_torch.generate.generate."""
        from .generate import generate

        return generate(self, images, input_ids, attention_mask=attention_mask, image_num=image_num, **kwargs)


def forward_planned(model: VisualChat, plan: SplicePlan, images: torch.Tensor | None,
                    with_loss: bool = True) -> VisualChatOutput:
    """The forward pass of a planned batch: images (N, 3, H, W) or None, features spliced by `plan`; the
    loss when `with_loss`. `VisualChat.forward` is `plan` then this."""
    feats = None if images is None or images.shape[0] == 0 else model.encode_images(images)
    modality = torch.as_tensor(plan.modality, device=model.device)
    positions = torch.as_tensor(plan.position_ids, device=model.device)
    logits, _ = model.decode(model.splice(plan, feats), modality, positions)
    labels = torch.as_tensor(plan.labels, device=model.device)
    loss = visualchat_loss(logits, labels) if with_loss else None
    return VisualChatOutput(loss=loss, logits=logits, modality=modality, labels=labels)
