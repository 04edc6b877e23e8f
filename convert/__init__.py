"""Converters between the reference's checkpoints, vchat_torch and vchat_jax, all driven by one table
(`vchat/param_map.py`)."""
