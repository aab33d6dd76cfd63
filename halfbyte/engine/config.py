"""Optimizer configuration of the engine: AdamWConfig (torch.optim.AdamW's hyper-parameters)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdamWConfig:
    """torch.optim.AdamW hyper-parameters (decoupled weight decay, bias correction).

    Weight decay applies to every parameter, as torch.optim.AdamW(model.parameters()) does.
    """

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1

    def __post_init__(self) -> None:
        if not self.lr >= 0:
            raise ValueError(f"AdamWConfig.lr must be >= 0, got {self.lr!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"AdamWConfig.betas must be two values in [0, 1), got {self.betas!r}")
        if not self.eps > 0:
            raise ValueError(f"AdamWConfig.eps must be > 0, got {self.eps!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"AdamWConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
