"""Helpers shared by the torch training tests (a plain module, imported by name)."""

from vchat.config import LLMConfig, ModelConfig, VisionConfig
from vchat_torch.train_args import parse_args


def args_for(*flags, model="tiny"):
    """`vchat train` flags for in-process checks (nothing is written)."""
    return parse_args(["--lm_model_name_or_path", model, "--output_dir", "unused", "--precision", "fp32",
                       "--enable_mmca_attention", *flags])


def tiny_qwen_json(tmp_path):
    """A config JSON of a tiny model with the Qwen-VL tower."""
    cfg = ModelConfig(vision=VisionConfig(kind="qwen", image_size=32, patch_size=8, hidden_size=48,
                                          intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                          layer_norm_eps=1e-6, hidden_act="gelu", output_dim=128, n_queries=4,
                                          pos_embed_rows=16),
                      llm=LLMConfig(max_position_embeddings=1024))
    path = str(tmp_path / "qwen_tiny.json")
    cfg.save(path)
    return path
