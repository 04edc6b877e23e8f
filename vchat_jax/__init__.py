"""vchat_jax: the Flax NNX twin of vchat_torch (same files, class and attribute names)."""

from .model import VisualChat

__all__ = ["VisualChat"]
