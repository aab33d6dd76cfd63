"""The optimizer math every engine shares (real ranks, virtual ranks): clipping and AdamW on fp32
master shards. Elementwise, so applying it shard by shard equals applying it to the whole model."""

from __future__ import annotations

import math

import torch

from halfbyte.engine.config import AdamWConfig


@torch.no_grad()
def clip_(grads: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scale grads in place so that their global norm (`norm`) is at most max_norm; the same
    arithmetic as torch.nn.utils.clip_grad_norm_."""
    torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))


@torch.no_grad()
def adamw_(params: list[torch.Tensor], exp_avg: list[torch.Tensor], exp_avg_sq: list[torch.Tensor],
           grads: list[torch.Tensor], *, lr: float, step: int, config: AdamWConfig) -> None:
    """One torch.optim.AdamW step (decoupled weight decay, bias correction) in place with
    config's betas, eps and weight decay; step counts from 1. config.fused: torch's fused kernel
    (one pass over memory; the same math, different float rounding), else the foreach ops below,
    which are torch.optim.AdamW(foreach=True)'s to the bit."""
    beta1, beta2 = config.betas
    if config.fused:
        # The kernel reads the step count from a device tensor; torch's own wrapper increments it
        # before the call, so the kernel gets the step being taken, as here.
        steps = [torch.full((), float(step), device=params[0].device)] * len(params)
        torch._fused_adamw_(params, grads, exp_avg, exp_avg_sq, [], steps, lr=lr, beta1=beta1, beta2=beta2,
                            weight_decay=config.weight_decay, eps=config.eps, amsgrad=False, maximize=False)
        return
    torch._foreach_mul_(params, 1 - lr * config.weight_decay)
    torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sq, beta2)
    torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sq)
    torch._foreach_div_(denom, math.sqrt(1 - beta2**step))
    torch._foreach_add_(denom, config.eps)
    torch._foreach_addcdiv_(params, exp_avg, denom, -lr / (1 - beta1**step))
