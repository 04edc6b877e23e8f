"""LoRA through PEFT: `--lang_lora_dim` on the decoder, `--vis_lora_dim` on the vision tower.

The reference (`utils/module/lora.py`, inventory L1-L5) replaces every `nn.Linear` whose qualified
name inside the part contains `--lang_lora_module_name` (default "model.layers.": q/k/v/o and
gate/up/down of every decoder layer) or `--vis_lora_module_name` (default "encoder.layers.": HF
CLIP's q/k/v/out_proj and fc1/fc2) by `y = x W^T + b + (x R L) * (1 / r)`: R (in, r) kaiming-uniform,
L (r, out) zeros, the base weight frozen. Here PEFT injects the adapters with the same math: A = R^T
drawn from the same U(-1/sqrt(r), 1/sqrt(r)), B = L^T zeros, scaling alpha / r with alpha 1 unless
`--lora_alpha` says otherwise. What changes: a filter that matches nothing is an error (the
reference silently trains nothing, B17; Qwen's tower is named `transformer.resblocks.*`), and
`--only_optimize_lora` freezes everything but the adapters inside the LoRA'd part even when
`--trainable` names that part (in the reference those parts are frozen anyway, so it is a no-op).

Export (`merged_state_dict`) folds `W + s * B @ A` into a copy of the state dict under the
reference's key names, so a checkpoint loads into a plain `VisualChat`; the live model is untouched.
`merge_lora` does the same to a model in place (for using a trained model in memory).
"""

from __future__ import annotations

import math

import torch
from torch import nn

PARTS = (("lang_decoder", "lang"), ("vis_encoder", "vis"))


def lora_targets(module: nn.Module, needle: str) -> list[str]:
    """Qualified names of the `nn.Linear`s of `module` whose name contains `needle`. The projections
    inside `nn.MultiheadAttention` are left out: it reads their weights directly, so an adapter there
    would never run."""
    inside_mha = {f"{n}.{c}" if n else c for n, m in module.named_modules() if isinstance(m, nn.MultiheadAttention)
                  for c, _ in m.named_children()}
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and needle in n and n not in inside_mha]


def add_lora(model: nn.Module, args) -> None:
    """Inject adapters into `model.lang_decoder` / `model.vis_encoder` per the flags (see the module doc)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    trainable_parts = set(getattr(args, "trainable", ()))
    for part, flag in PARTS:
        dim, needle = getattr(args, f"{flag}_lora_dim"), getattr(args, f"{flag}_lora_module_name")
        if dim <= 0:
            continue
        module = getattr(model, part)
        targets = lora_targets(module, needle)
        if not targets:
            linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
            raise SystemExit(f"--{flag}_lora_module_name {needle!r} matches no nn.Linear in {part} (its Linear layers "
                             f"are named like {', '.join(linears[:3]) or 'nothing'}); pick a part of those names")
        was_trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        alpha = args.lora_alpha if args.lora_alpha is not None else 1.0
        cfg = LoraConfig(r=dim, lora_alpha=alpha, lora_dropout=args.lora_dropout, target_modules=targets)
        inject_adapter_in_model(cfg, module)
        for m in module.modules():
            if isinstance(m, LoraLayer):  # the reference's R: kaiming_uniform(a=sqrt(5)) on (in, r), fan_in r
                for a in m.lora_A.values():
                    nn.init.uniform_(a.weight, -1 / math.sqrt(dim), 1 / math.sqrt(dim))
        only_lora = args.only_optimize_lora or part not in trainable_parts
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
            else:  # PEFT froze everything else; a wrapped layer's weight stays frozen (as the reference)
                p.requires_grad_(not only_lora and not name.endswith("base_layer.weight")
                                 and base_name(name) in was_trainable)


def base_name(key: str) -> str:
    """A LoRA-wrapped layer's key under the reference's name: `x.base_layer.weight` -> `x.weight`."""
    return key.replace(".base_layer.", ".")


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def merged_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """`sd` (a full state dict of `model`, e.g. gathered from ZeRO-3) with every adapter folded in:
    `W = W_base + scaling * B @ A` (computed in float32, stored in W's dtype) under `x.weight`, and
    `x.base_layer.bias` renamed `x.bias`. Returns the new dict and the names of the folded weights."""
    out = dict(sd)
    folded = set()
    for name, layer in lora_layers(model).items():
        if getattr(layer, "use_dora", {}) and any(layer.use_dora.values()):
            raise ValueError(f"{name}: DoRA adapters cannot be merged into the reference layout")
        w_key = f"{name}.base_layer.weight"
        w = out.pop(w_key)
        delta = torch.zeros(w.shape, dtype=torch.float32, device="cpu")
        for adapter in layer.lora_A:
            a = out.pop(f"{name}.lora_A.{adapter}.weight").to("cpu", torch.float32)  # (r, in)
            b = out.pop(f"{name}.lora_B.{adapter}.weight").to("cpu", torch.float32)  # (out, r)
            delta += layer.scaling[adapter] * (b @ a)  # (out, in)
        out[f"{name}.weight"] = (w.to("cpu", torch.float32) + delta).to(w.dtype)
        folded.add(f"{name}.weight")
        if f"{name}.base_layer.bias" in out:
            out[f"{name}.bias"] = out.pop(f"{name}.base_layer.bias")
        left = [k for k in out if k.startswith(f"{name}.") and ("lora_" in k or ".base_layer." in k)]
        if left:
            raise ValueError(f"{name}: adapter tensors this export does not know how to fold: {left}")
    return out, folded


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base layer and put the base layer back, in place. Returns the count."""
    merged = 0
    for name, module in list(lora_layers(model).items()):
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
        merged += 1
    return merged
