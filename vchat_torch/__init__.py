"""vchat_torch: VisualChat in PyTorch on transformers' CLIP and LLaMA, trained with DeepSpeed."""

from .model import VisualChat, VisualChatOutput, visualchat_loss

__all__ = ["VisualChat", "VisualChatOutput", "visualchat_loss"]
