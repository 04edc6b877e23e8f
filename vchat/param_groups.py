"""Which parameters train, and in which AdamW group: pure functions over parameter names, shared by
both trainers (vchat_torch/optim.py, vchat_jax/optim.py).

- Trainable parts: the top-level parts of VisualChat named by `--trainable` (lang_embed and projection
  by default, as the reference); the fixed sin-cos `pos_embed` tables never train (B15).
- Groups, the reference's `get_optimizer_grouped_parameters` on the torch (reference) name of a
  parameter: {decay, no decay} x {other, name contains "embed"}. No decay when the name contains
  "bias" or "LayerNorm.weight"; the "embed" groups take `--learning_rate_pretraining_components`
  (0: `--learning_rate`).
"""

from __future__ import annotations

from collections.abc import Sequence

TRAINABLE_PARTS = ("lang_embed", "projection", "lang_decoder", "vis_encoder")
GROUPS = ("decay", "no_decay", "embed_decay", "embed_no_decay")


def check_parts(parts: Sequence[str]) -> tuple[str, ...]:
    """`parts` as a tuple; ValueError unless it is a non-empty selection from TRAINABLE_PARTS."""
    bad = [p for p in parts if p not in TRAINABLE_PARTS]
    if bad or not parts:
        raise ValueError(f"trainable parts must come from {TRAINABLE_PARTS}, got {list(parts)}")
    return tuple(parts)


def is_trainable(path: Sequence, parts: Sequence[str]) -> bool:
    """Whether the parameter at `path` (a torch name split at the dots, or an NNX state path) trains
    when `parts` train: its top-level part is one of them and it is not a sin-cos `pos_embed` table."""
    return path[0] in parts and path[-1] != "pos_embed"


def group_of(name: str) -> str:
    """The group (one of GROUPS) of the parameter with this torch (reference) name."""
    no_decay = "bias" in name or "LayerNorm.weight" in name
    return GROUPS[2 * ("embed" in name) + no_decay]


def group_hparams(group: str, learning_rate: float, learning_rate_pretraining_components: float,
                  weight_decay: float) -> tuple[float, float]:
    """(weight decay, learning rate) of a group under the flags of the same names."""
    embed_lr = learning_rate_pretraining_components or learning_rate
    return (0.0 if group.endswith("no_decay") else weight_decay), (embed_lr if group.startswith("embed")
                                                                  else learning_rate)
