"""The engine tests' toy models and data, shared by the test modules and the spawned ranks' worker
bodies (importable by name: conftest.py puts this folder on sys.path, which travels to them)."""

from __future__ import annotations

import torch
from torch import nn


def make_mlp(seed: int = 0, width: int = 32, unused: bool = False) -> nn.Module:
    """8 -> width -> width -> 1 with tanh; `unused`: one more Linear, registered but never called."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))
    if unused:
        model.add_module("unused", nn.Linear(4, 4))
    return model


def used_forward(model: nn.Sequential):
    """The forward of make_mlp(unused=True) without the unused layer."""
    layers = [m for name, m in model.named_children() if name != "unused"]
    return lambda x: nn.Sequential(*layers)(x)


class TinyTransformer(nn.Module):
    def __init__(self, seed: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(8, 16)
        self.block = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, dropout=dropout,
                                                batch_first=True)
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.inp(x)).mean(dim=1))


class Tied(nn.Module):
    """Token ids -> logits with the output projection tied to the embedding (one parameter)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(10, 6)
        self.mid = nn.Linear(6, 6)
        self.out = nn.Linear(6, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mid(self.emb(idx))))


class NormNet(nn.Module):
    """Every kind of parameter the usual no-decay groups tell apart, and running statistics:
    token embedding -> Linear -> BatchNorm -> tanh -> Linear -> LayerNorm -> Linear (biases). The
    Linear before the BatchNorm has no bias: BatchNorm cancels it, so its true gradient is zero and
    what it gets is summation-order noise (which Adam would scale up to +-lr steps)."""

    def __init__(self, seed: int = 0, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(12, 8)
        self.inp = nn.Linear(8, width, bias=False)
        self.bn = nn.BatchNorm1d(width)
        self.mid = nn.Linear(width, width)
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, 1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx).mean(dim=1)
        return self.head(self.ln(self.mid(torch.tanh(self.bn(self.inp(x))))))

    def groups(self, weight_decay: float = 0.1, no_decay_lr: float | None = None) -> list[dict]:
        """torch-style groups: matrices decay; embedding, norms and biases do not."""
        decay = [self.inp.weight, self.mid.weight, self.head.weight]
        rest = [p for p in self.parameters() if all(p is not q for q in decay)]
        no_decay = {"params": rest, "weight_decay": 0.0}
        if no_decay_lr is not None:
            no_decay["lr"] = no_decay_lr
        return [{"params": decay, "weight_decay": weight_decay}, no_decay]


class Fp32LayerNorm(nn.LayerNorm):
    """A LayerNorm kept in fp32 inside a bf16 model (as HF's RMSNorms compute): input upcast,
    output back in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class MixedNet(nn.Module):
    """bf16 Linear layers with fp32 LayerNorms between them: two parameter dtypes in one model."""

    def __init__(self, seed: int = 0, width: int = 32) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(8, width).bfloat16()
        self.ln1 = Fp32LayerNorm(width)
        self.mid = nn.Linear(width, width).bfloat16()
        self.ln2 = Fp32LayerNorm(width)
        self.head = nn.Linear(width, 1).bfloat16()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.ln1(self.inp(x.bfloat16())))
        return self.head(torch.tanh(self.ln2(self.mid(h)))).float()


_teacher = torch.Generator().manual_seed(12345)
TEACHER_IN = torch.randn(8, 16, generator=_teacher) / 8**0.5
TEACHER_OUT = torch.randn(16, 1, generator=_teacher)


def regression_batch(step: int, rank: int, micro: int = 0, n: int = 16, seq: int | None = None):
    """Rank- and step-specific data (independent of the global RNG); the target is a fixed random
    one-layer teacher, so the loss has a clear floor of 0."""
    g = torch.Generator().manual_seed(100_003 * step + 1009 * rank + micro)
    x = torch.randn((n, seq, 8) if seq else (n, 8), generator=g)
    flat = x.mean(dim=1) * seq**0.5 if seq else x
    return x, torch.tanh(flat @ TEACHER_IN) @ TEACHER_OUT


def token_batch(step: int, rank: int, n: int = 16, seq: int = 4):
    """Token ids for NormNet and a target that depends on them (and on the rank: BatchNorm
    statistics then differ between ranks)."""
    g = torch.Generator().manual_seed(7919 * step + 31 * rank + 1)
    idx = torch.randint(0, 12, (n, seq), generator=g)
    return idx, (idx.float().mean(dim=1, keepdim=True) - 5.5) / 3 + 0.5 * rank


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
