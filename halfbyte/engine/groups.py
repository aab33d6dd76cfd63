"""Parameter groups of the engine in torch.optim's form: which group each parameter belongs to,
each group's AdamW hyper-parameters, and the flags of torch.optim.AdamW's own state dicts."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from halfbyte.engine.config import AdamWConfig

HYPER_PARAMETERS = ("lr", "betas", "eps", "weight_decay")

# torch.optim.AdamW's options besides the hyper-parameters, as the engine computes them: written
# into state_dict() so that torch.optim.AdamW.load_state_dict restores AdamW (torch's Adam fills
# a missing decoupled_weight_decay with False, i.e. L2 Adam); load_state_dict refuses others.
TORCH_ADAMW_FLAGS: dict[str, Any] = {"amsgrad": False, "maximize": False, "capturable": False,
                                     "differentiable": False, "decoupled_weight_decay": True}
# Which kernels torch.optim.AdamW runs: not the engine's to take from a loaded state dict.
IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")
_MUST_MATCH = ("amsgrad", "maximize", "decoupled_weight_decay")


def torch_flags(config: AdamWConfig) -> dict[str, Any]:
    """The flags of a torch.optim.AdamW group that computes what the engine does, to the bit: the
    foreach implementation, or the fused kernel when config.fused."""
    return {**TORCH_ADAMW_FLAGS, "foreach": None if config.fused else True, "fused": True if config.fused else None}


def assign_groups(model: nn.Module, groups: list[dict[str, Any]]) -> dict[nn.Parameter, int]:
    """{trainable param: index of its group}. Raises ValueError for a tensor that is not one of
    the model's parameters, or a trainable parameter in no group (torch.optim would leave it
    untrained; here it would be communicated and never updated). Frozen parameters may be in a
    group, as with torch.optim: they are not trained."""
    names = {p: n for n, p in model.named_parameters()}
    index: dict[nn.Parameter, int] = {}
    for g, group in enumerate(groups):
        for p in group["params"]:
            if p not in names:
                raise ValueError(f"param_groups[{g}] holds a tensor of shape {tuple(p.shape)} that is not a "
                                 "parameter of the wrapped model: give the groups the model's own parameters")
            if p.requires_grad:
                index[p] = g
    missing = [n for p, n in names.items() if p.requires_grad and p not in index]
    if missing:
        raise ValueError(f"{len(missing)} trainable parameter(s) are in no parameter group (first: "
                         f"{', '.join(missing[:3])}): add them to a group, or set requires_grad=False "
                         "before wrapping")
    return index


def group_config(groups: list[dict[str, Any]], g: int, base: AdamWConfig, lr: float | None = None) -> AdamWConfig:
    """Group g's hyper-parameters as an AdamWConfig (base's other options), lr replaced by `lr`
    when given; ValueError naming the group when a value is invalid (AdamWConfig's checks)."""
    group = groups[g]
    try:
        return dataclasses.replace(base, lr=float(group["lr"] if lr is None else lr),
                                   betas=tuple(float(b) for b in group["betas"]),
                                   eps=float(group["eps"]), weight_decay=float(group["weight_decay"]))
    except KeyError as e:
        raise ValueError(f"param_groups[{g}] has no {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"param_groups[{g}]: {e}") from None


def check_torch_flags(group: dict[str, Any], g: int) -> None:
    """ValueError unless a loaded torch.optim state dict's group computes what the engine does."""
    for key in _MUST_MATCH:
        if key in group and group[key] != TORCH_ADAMW_FLAGS[key]:
            raise ValueError(f"the state dict's param_groups[{g}] has {key}={group[key]!r}: the engine runs "
                             f"AdamW with {key}={TORCH_ADAMW_FLAGS[key]!r} only")

