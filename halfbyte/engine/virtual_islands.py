"""Local updates on virtual ranks: K islands of S virtual ranks each, in one process.

Every island is a VirtualDataParallel engine on its own model copy (islands drift apart between
outer steps, so one replica cannot stand for all of them). The outer step runs, for every
island-local rank l and every island k, the codec steps that LocalUpdates runs over its outer group
(halfbyte.engine.local): same pseudo-gradients, seeds, error-feedback residuals, outer optimizers
and qWD update gather, so a virtual run follows the real one. The uncompressed average sums the
islands in island order where the real run lets the backend choose (exact for K <= 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from halfbyte.comm import (
    HOP_ALL_GATHER,
    HOP_REDUCE_SCATTER,
    all_gather_bytes,
    chunk_numel,
    decode_chunks,
    decode_gathered,
    decode_sum,
    encode_chunks,
    encode_shard,
    rank_seed,
    reduce_scatter_bytes,
)
from halfbyte.comm.accounting import CommStats
from halfbyte.engine import checkpoint, seeds
from halfbyte.engine.local import (
    OUTER_GRADS,
    OUTER_WEIGHTS,
    OuterConfig,
    make_outer_optimizer,
)
from halfbyte.engine.virtual import VirtualDataParallel

FP32_BYTES = 4


class VirtualLocalUpdates:
    """LocalUpdates for islands of virtual ranks: `engines[k]` is island k. Call step(lr) after the
    engines' step(lr) every step (skipped ones included); every local_steps-th call runs the outer
    step and returns True. `stats` counts the inter-island bytes one real rank would send."""

    def __init__(self, engines: list[VirtualDataParallel], config: OuterConfig, seed: int = 0) -> None:
        """seed: base seed of the outer collectives, as LocalUpdates' seed."""
        self.engines, self.config, self.seed = engines, config, seed
        self.num_islands, self.island_size = len(engines), engines[0].world_size
        K, S = self.num_islands, self.island_size
        self.numel = sum(b.shard_numel for b in engines[0].buckets)  # values owned per island-local rank
        self.chunk = chunk_numel(self.numel, K)
        self.stats = CommStats()
        self.outer_steps = 0
        self.steps_since_sync = 0
        self._sync_islands()
        device = engines[0].topo.device
        # Per island-local rank l: the weights all islands start the round from (identical across
        # islands), the exact outer weights and outer optimizer of chunk i (owned by island i), and
        # the error-feedback residual of every island.
        self.start = [torch.zeros(K * self.chunk, device=device) for _ in range(S)]
        for l, start in enumerate(self.start):
            start[: self.numel] = self._flat_master(engines[0], l)
        c = self.chunk
        self.outer_params = [[s[i * c:(i + 1) * c].clone() for i in range(K)] for s in self.start]
        self.optimizers = [[make_outer_optimizer(config, c, device) for _ in range(K)] for _ in range(S)]
        use_residual = config.spec is not None and config.error_feedback
        self.residual = ([[torch.zeros(self.numel, device=device) for _ in range(K)] for _ in range(S)]
                         if use_residual else None)

    def step(self, lr: float | None = None) -> bool:
        self.steps_since_sync += 1
        if self.steps_since_sync < self.config.local_steps:
            return False
        self._outer_step(self.engines[0].optim.lr if lr is None else lr)
        return True

    # ---- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        def cpu(ts: list) -> list:
            return [cpu(t) if isinstance(t, list) else t.detach().cpu().clone() for t in ts]

        return {
            "optimizer_name": self.config.optimizer, "outer_steps": self.outer_steps,
            "steps_since_sync": self.steps_since_sync, "start": cpu(self.start),
            "outer_params": cpu(self.outer_params),
            "optimizer": [[o.state_dict() for o in row] for row in self.optimizers],
            "residual": None if self.residual is None else cpu(self.residual),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["optimizer_name"] != self.config.optimizer:
            raise ValueError(f"outer state was saved for {state['optimizer_name']!r}, this run uses "
                             f"{self.config.optimizer!r}")
        if [t.shape for t in state["start"]] != [t.shape for t in self.start]:
            raise ValueError("outer state has a different layout: islands, model or buckets changed")
        if (state["residual"] is None) != (self.residual is None):
            raise ValueError("outer state and this run disagree on the error-feedback residual "
                             "(outer bits or error_feedback changed)")
        for mine, saved in zip(self.start, state["start"]):
            mine.copy_(saved)
        for l in range(self.island_size):
            for i in range(self.num_islands):
                self.outer_params[l][i].copy_(state["outer_params"][l][i])
                self.optimizers[l][i].load_state_dict(state["optimizer"][l][i])
                if self.residual is not None:
                    self.residual[l][i].copy_(state["residual"][l][i])
        self.outer_steps = state["outer_steps"]
        self.steps_since_sync = state["steps_since_sync"]

    def save_checkpoint(self, path: str | Path, extra: dict | None = None) -> None:
        """path/island<k>/ per island (the outer state in island 0's extra), then path/COMPLETE."""
        path = Path(path)
        (path / checkpoint.MARKER).unlink(missing_ok=True)
        for k, engine in enumerate(self.engines):
            island_extra = {**(extra or {}), "local_updates": self.state_dict()} if k == 0 else {}
            engine.save_checkpoint(path / f"island{k}", island_extra)
        (path / checkpoint.MARKER).write_text("ok\n")

    def load_checkpoint(self, path: str | Path) -> dict:
        path = Path(path)
        extras = [engine.load_checkpoint(path / f"island{k}") for k, engine in enumerate(self.engines)]
        if "local_updates" not in extras[0]:
            raise ValueError(f"checkpoint {path} holds no local-updates state")
        self.load_state_dict(extras[0].pop("local_updates"))
        return extras[0]

    # ---- internals ----------------------------------------------------------------------------
    @staticmethod
    def _flat_master(engine: VirtualDataParallel, rank: int) -> torch.Tensor:
        B = len(engine.buckets)
        return torch.cat([m.view(-1) for m in engine.master[rank * B:(rank + 1) * B]])

    @torch.no_grad()
    def _sync_islands(self) -> None:
        """Island 0's weights, masters and buffers everywhere (LocalUpdates broadcasts rank 0's)."""
        first = self.engines[0]
        for engine in self.engines[1:]:
            for mine, theirs in zip(engine.buckets, first.buckets):
                mine.replica.copy_(theirs.replica)
            for mine, theirs in zip(engine.master, first.master):
                mine.copy_(theirs)
            for mine, theirs in zip(engine.module.buffers(), first.module.buffers()):
                mine.copy_(theirs)

    def _average(self, pseudo_grads: list[torch.Tensor], l: int, seed: int) -> list[torch.Tensor]:
        """Island i's chunk of the islands' mean pseudo-gradient, for every i."""
        K, c, spec = self.num_islands, self.chunk, self.config.spec
        if spec is None:
            total = pseudo_grads[0].clone()
            for g in pseudo_grads[1:]:
                total += g
            mean = torch.zeros(K * c, device=total.device)
            mean[: self.numel] = total
            return list(mean.div_(K).view(K, c))
        sends = []
        for k, g in enumerate(pseudo_grads):
            if self.residual is not None:
                g = g + self.residual[l][k]
            send = encode_chunks(g, spec, K, rank_seed(seed, k, HOP_REDUCE_SCATTER))
            if self.residual is not None:
                self.residual[l][k] = g - decode_chunks(send, spec, self.numel)
            sends.append(send)
        return [decode_sum(torch.stack([s[i] for s in sends]), spec, c, K, op="avg") for i in range(K)]

    def _gather(self, l: int, seed: int) -> None:
        """Every island's new chunk into start[l] (qWD with a spec, as LocalUpdates gathers it)."""
        c, spec, start = self.chunk, self.config.spec, self.start[l]
        if spec is None:
            for i, chunk in enumerate(self.outer_params[l]):
                start[i * c:(i + 1) * c].copy_(chunk)
            return
        sends = [encode_shard(chunk - start[i * c:(i + 1) * c], spec, rank_seed(seed, i, HOP_ALL_GATHER))
                 for i, chunk in enumerate(self.outer_params[l])]
        decode_gathered(torch.stack(sends), spec, c, start, accumulate=True)

    @torch.no_grad()
    def _outer_step(self, inner_lr: float) -> None:
        K, seed_base = self.num_islands, self.seed
        grads_seed = seeds.collective_seed(seed_base, self.outer_steps, 0, OUTER_GRADS)
        weights_seed = seeds.collective_seed(seed_base, self.outer_steps, 0, OUTER_WEIGHTS)
        for l, start in enumerate(self.start):
            pseudo_grads = [start[: self.numel] - self._flat_master(e, l) for e in self.engines]
            for i, mean in enumerate(self._average(pseudo_grads, l, grads_seed)):
                self.optimizers[l][i].step(self.outer_params[l][i], mean, inner_lr)
            self._gather(l, weights_seed)
            for engine in self.engines:  # new masters; replicas as the uncompressed island all-gather
                B, offset = len(engine.buckets), 0
                for b, master in zip(engine.buckets, engine.master[l * B:(l + 1) * B]):
                    master.copy_(start[offset: offset + master.numel()].view_as(master))
                    offset += master.numel()
                    b.shard(b.replica, l).copy_(master)
        spec_or_fp32 = self.config.spec or FP32_BYTES
        self.stats.record("reduce_scatter", reduce_scatter_bytes(self.numel, spec_or_fp32, K, 1))
        self.stats.record("all_gather", all_gather_bytes(self.chunk, spec_or_fp32, K, 1))
        self.outer_steps += 1
        self.steps_since_sync = 0
