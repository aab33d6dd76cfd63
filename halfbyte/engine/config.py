"""Configuration of the engine: the optimizer (AdamWConfig: torch.optim.AdamW's hyper-parameters)
and the engine's own options (EngineConfig). Field descriptions are in the docstrings, in the
`name: text` form the trainer's --help reads."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdamWConfig:
    """torch.optim.AdamW hyper-parameters (decoupled weight decay, bias correction).

    lr:           peak learning rate (a schedule may pass each step's own to engine.step)
    betas:        coefficients of the running averages of the gradient and its square
    eps:          added to the denominator for numerical stability
    weight_decay: decoupled weight decay (the default of every parameter group)
    fused:        torch's fused AdamW kernel on the master shards (one pass over memory) instead of
                  foreach ops; the same math to float rounding
    """

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    fused: bool = False

    def __post_init__(self) -> None:
        if not self.lr >= 0 or self.lr == float("inf"):
            raise ValueError(f"AdamWConfig.lr must be a finite number >= 0, got {self.lr!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"AdamWConfig.betas must be two values in [0, 1), got {self.betas!r}")
        if not 0 < self.eps < float("inf"):
            raise ValueError(f"AdamWConfig.eps must be a finite number > 0, got {self.eps!r}")
        if not 0 <= self.weight_decay < float("inf"):
            raise ValueError(f"AdamWConfig.weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not isinstance(self.fused, bool):
            raise ValueError(f"AdamWConfig.fused must be true or false, got {self.fused!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Options of ShardedDataParallel besides the optimizer and the communication.

    bucket_numel: values per communication bucket (one reduce-scatter and one all-gather each)
    grad_clip:    clip the global gradient norm to this; none or 0: off
    """

    bucket_numel: int = 25_000_000
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.bucket_numel, bool) or not isinstance(self.bucket_numel, int) or self.bucket_numel < 1:
            raise ValueError(f"EngineConfig.bucket_numel must be a positive integer, got {self.bucket_numel!r}")
        if self.grad_clip == 0:
            object.__setattr__(self, "grad_clip", None)
        if self.grad_clip is not None and not 0 < self.grad_clip < float("inf"):
            raise ValueError(f"EngineConfig.grad_clip must be a finite number > 0, or none/0 (off), "
                             f"got {self.grad_clip!r}")
