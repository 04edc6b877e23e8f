"""LoRA through PEFT: `--lang_lora_dim` on the decoder, `--vis_lora_dim` on the vision tower.

The reference wraps every `nn.Linear` whose qualified name contains `--lang_lora_module_name`
(default "model.layers.") or `--vis_lora_module_name` (default "encoder.layers."), with scaling 1 and
no dropout (inventory L1-L3). Here PEFT injects the adapters (alpha defaults to the rank, so the
scaling is 1); a name filter that matches nothing is an error (B17), and `merge_lora` folds the
adapters into the base weights for export, leaving the reference's key names.
"""

from __future__ import annotations

import torch
from torch import nn


def linear_names(module: nn.Module, needle: str) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and needle in n]


def add_lora(model: nn.Module, args) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    for part, dim, needle in (("lang_decoder", args.lang_lora_dim, args.lang_lora_module_name),
                              ("vis_encoder", args.vis_lora_dim, args.vis_lora_module_name)):
        if dim <= 0:
            continue
        module = getattr(model, part)
        targets = linear_names(module, needle)
        if not targets:
            raise SystemExit(f"--{'lang' if part == 'lang_decoder' else 'vis'}_lora_module_name {needle!r} matches no "
                             f"nn.Linear in {part}")
        alpha = args.lora_alpha if args.lora_alpha is not None else dim
        cfg = LoraConfig(r=dim, lora_alpha=alpha, lora_dropout=args.lora_dropout, target_modules=targets)
        inject_adapter_in_model(cfg, module)
        for name, p in module.named_parameters():
            p.requires_grad_("lora_" in name)


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base layer and put the base layer back. Returns the count."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
            merged += 1
    return merged
