"""Cross-framework checks above vchat_torch and vchat_jax: logits against the reference's goldens
(`check_logits`) and speed ratios measured in one run (`bench`)."""
