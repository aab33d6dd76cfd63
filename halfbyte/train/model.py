"""A small, clean GPT (pre-LN, RoPE or learned positions, tied embeddings, GELU MLP), its size presets,
and a thin wrapper that makes a Hugging Face causal LM look the same (`forward(idx) -> logits`)."""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    ctx: int = 128  # longest sequence the model accepts
    rope: bool = True  # rotary position embedding; False = learned absolute positions
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model={self.d_model} must be divisible by model.n_head={self.n_head}")
        if self.rope and (self.d_model // self.n_head) % 2:
            raise ValueError(f"RoPE needs an even head size, got d_model/n_head = {self.d_model // self.n_head}")


# name -> (n_layer, n_head, d_model, ctx)
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (4, 4, 128, 128),  # 1.3M parameters: the CPU demo (`halfbyte train`, ~3 min on 2 cores)
    "125m": (12, 12, 768, 2048),
    "350m": (24, 16, 1024, 2048),
    "1.3b": (24, 16, 2048, 2048),
}


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, ctx: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(ctx, dtype=torch.float32), inv_freq)  # (ctx, head_dim / 2)
        # derived from the config, so not saved in checkpoints
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, T, head_dim); rotates each (even, odd) pair by its position's angle."""
        t = x.shape[-2]
        cos, sin = self.cos[:t].to(x.dtype), self.sin[:t].to(x.dtype)
        x_even, x_odd = x[..., 0::2], x[..., 1::2]
        return torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1).flatten(-2)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.rotary = RotaryEmbedding(cfg.d_model // cfg.n_head, cfg.ctx) if cfg.rope else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model, bias=False)
        self.attn = CausalSelfAttention(cfg)
        self.ln_mlp = nn.LayerNorm(cfg.d_model, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=False),
            nn.GELU(),
            nn.Linear(4 * cfg.d_model, cfg.d_model, bias=False),
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_attn(x)))
        return x + self.drop(self.mlp(self.ln_mlp(x)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.ctx = cfg.ctx
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = None if cfg.rope else nn.Embedding(cfg.ctx, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=False)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init_weights)
        # GPT-2: scale the residual-stream output projections by 1/sqrt(2 * n_layer)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights count once

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: (B, T) token ids -> logits (B, T, vocab)."""
        if idx.shape[1] > self.ctx:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds the model's context {self.ctx}")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class HFCausalLM(nn.Module):
    """A transformers causal LM behind the same `forward(idx) -> logits` interface as GPT.

    `path` is a local directory with a config.json: with weights next to it they are loaded
    (from_pretrained); with the config alone (the usual start of a pre-training run) the model is
    built from it with random initialization (from torch's global RNG, so a seed set before makes it
    reproducible), and a warning says so. `pretrained` tells which."""

    def __init__(self, path: str):
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        self.pretrained = has_hf_weights(path)
        if self.pretrained:
            self.hf = AutoModelForCausalLM.from_pretrained(path)
        else:
            logger.warning("--model hf:%s has no weights (only config.json): building the model from its config "
                           "with random initialization", path)
            self.hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
        self.ctx = int(getattr(self.hf.config, "max_position_embeddings", 0) or 1 << 30)
        self.vocab_size = int(self.hf.config.vocab_size)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=idx, use_cache=False).logits


def has_hf_weights(path: str) -> bool:
    """True when the directory holds weights transformers' from_pretrained reads (safetensors or
    PyTorch, whole or sharded with an index), not only a config.json."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    names = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
    return any((Path(path) / name).is_file() for name in names)


def check_hf_model(path: str) -> None:
    """Raise ValueError early (before any worker starts) if `hf:<path>` cannot be loaded."""
    if importlib.util.find_spec("transformers") is None:
        raise ValueError(f"--model hf:{path} needs the transformers package: pip install transformers")
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"--model hf:{path}: no config.json there; pass a local directory of a HF causal LM")


def gpt_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The usual GPT parameter groups, in torch.optim's format (for torch.optim.AdamW or
    ShardedDataParallel(param_groups=...)): `weight_decay` on the weight matrices of the linear
    layers; none on embeddings (a tied output projection is the embedding), norms and biases, whose
    decay pulls scales and offsets towards 0 and rare tokens' embeddings towards the origin. The
    rule, for any model (GPT, HF): a trainable parameter of an nn.Embedding, or with fewer than two
    dimensions, does not decay. Trainable parameters only, each once; groups in that order."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # tied parameters once
        if p.requires_grad:
            (no_decay if id(p) in embeddings or p.dim() < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_model(name: str, vocab_size: int, **overrides) -> nn.Module:
    """`name` is a preset (tiny, 125m, 350m, 1.3b) or `hf:<local path>`; overrides replace preset fields."""
    if name.startswith("hf:"):
        check_hf_model(name[3:])
        return HFCausalLM(name[3:])
    if name not in PRESETS:
        raise ValueError(f"model {name!r} is unknown; use one of {', '.join(PRESETS)} or hf:<local path>")
    n_layer, n_head, d_model, ctx = PRESETS[name]
    fields = dict(n_layer=n_layer, n_head=n_head, d_model=d_model, ctx=ctx)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return GPT(GPTConfig(vocab_size=vocab_size, **fields))


@torch.no_grad()
def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.8,
             top_k: int | None = 50, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample continuations of idx (B, T); the context is cropped to the model's window."""
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.ctx :])[:, -1, :].float() / max(temperature, 1e-5)
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = F.softmax(logits, dim=-1)
        idx = torch.cat((idx, torch.multinomial(probs, 1, generator=generator)), dim=1)
    model.train(was_training)
    return idx
