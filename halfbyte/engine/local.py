"""Local updates across islands: the sharded engine every step inside an island, an outer step
across islands every `local_steps` (tau) steps.

Layout. The W ranks form K islands of S = W / K consecutive ranks (e.g. one node each); island i
holds global ranks i*S .. (i+1)*S - 1 and runs ShardedDataParallel on its own process groups, so
island-local rank l owns shard l of every bucket. The ranks with the same island-local rank (one
per island) own the same shard indices and form the *outer group*. One island per rank (S = 1) is
plain local SGD / DiLoCo; one island (K = 1) is single-worker lookahead.

Outer step (every tau inner steps, identical on every island):
  1. pseudo-gradient of the owned shards: Delta = x_start - x_end (fp32 master shards)
  2. average over islands by a reduce-scatter in the outer group: rank i of the group gets chunk i
     of the average (uncompressed fp32, or quantized with error feedback: each rank adds its
     residual from the previous outer step before quantizing and keeps the new one, so what the
     islands receive, summed over outer steps, tracks the exact sum to within one step's error)
  3. the outer optimizer updates the exact outer weights of that chunk (its state lives with it:
     each rank keeps 1/W of the model's outer state)
  4. all-gather in the outer group: the new chunk itself (uncompressed), or its quantized
     difference to the weights every island holds (qWD: every rank adds the same decoded bytes,
     so all islands restart from identical weights and the error does not accumulate)
  5. the new shared weights become the engine's master shards and are all-gathered uncompressed
     into the replicas inside the island (so islands restart bit-identical even under qWD or
     direct weight modes). Inner AdamW state is kept.

Outer optimizers (one interface, `OuterOptimizer.step(params, pseudo_grad, inner_lr)`):
  sign-momentum  Yu et al., "Distributed Sign Momentum with Local Steps for Training Transformers"
                 (arXiv 2411.17866), Algorithm 1 (Sec. 2): a Lion-like global step driven by
                 the averaged pseudo-gradient. The exact arithmetic follows the authors' code
                 (github.com/shuhuayu/dist-sign-momentum, fairscale/.../gossip/fastdt.py,
                 branch `fastdt_use_lion`), with eta the inner optimizer's current learning rate:
                     d      = Delta / eta                        (pseudo-gradient per unit lr)
                     c      = beta1 * m + (1 - beta1) * d
                     x      = x * (1 - wd * lr * eta) - lr * eta * sign(c)
                     m      = beta2 * m + (1 - beta2) * d
                 Defaults from the authors' code and run script (nanoGPT/run_example.sh,
                 train_fastdt.py): lr (fastdt_lr) 1.0, beta1 0.95, beta2 0.98, weight decay 0.2
                 (their argparse and constructor default; their README example shows 0.1), tau 12.
                 The paper's body text (its hyperparameter tables) could not be retrieved here;
                 these values are the code's, not checked against the tables.
  nesterov       DiLoCo (Douillard et al., arXiv 2311.08105, Sec. 3 / Algorithm 1): outer SGD with
                 Nesterov momentum, lr 0.7, momentum 0.9, in torch.optim.SGD(nesterov=True)'s form:
                 buf = mu * buf + Delta;  x -= lr * (Delta + mu * buf).
  average        plain local SGD / FedAvg: x -= lr * Delta with lr 1.0 (x becomes the mean).

Usage (every rank; `lr` is the inner learning rate of this step):
    islands = build_islands(num_islands=K)                        # collective
    engine = ShardedDataParallel(model, islands.island, optim=..., comm=CommConfig.preset("sdp4bit"))
    local = LocalUpdates(engine, islands, OuterConfig("sign-momentum", local_steps=tau))
    for step ...:
        loss.backward(); engine.step(lr); local.step(lr); engine.zero_grad()
    local.save_checkpoint(path, extra) / local.load_checkpoint(path) -> extra
Inter-island bytes are counted in `local.stats` (islands.outer.stats), every outer hop as "inter".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from halfbyte.comm import HOP_REDUCE_SCATTER, Topology, all_gather_q, build_topology, chunk_numel
from halfbyte.comm import decode_chunks, divisors, encode_chunks, rank_seed, reduce_scatter_q
from halfbyte.comm.accounting import CommStats
from halfbyte.engine import seeds
from halfbyte.engine.sharded import ShardedDataParallel
from halfbyte.quant import QuantSpec

OUTER_OPTIMIZERS = ("sign-momentum", "nesterov", "average")

# Per-optimizer defaults for the fields left None (sources in the module docstring).
_DEFAULT_LR = {"sign-momentum": 1.0, "nesterov": 0.7, "average": 1.0}
_DEFAULT_WEIGHT_DECAY = {"sign-momentum": 0.2, "nesterov": 0.0, "average": 0.0}

# Seed streams of the outer collectives (the engine uses seeds.WEIGHTS = 0, seeds.GRADS = 1).
OUTER_GRADS = 2
OUTER_WEIGHTS = 3


@dataclass(frozen=True)
class OuterConfig:
    """The outer step across islands.

    optimizer:      "sign-momentum" | "nesterov" | "average".
    local_steps:    tau, inner steps between outer steps (>= 1).
    lr:             outer learning rate; None: 1.0 (sign-momentum, scaled by the inner lr),
                    0.7 (nesterov), 1.0 (average).
    betas:          sign-momentum's (beta1, beta2).
    momentum:       nesterov's momentum.
    weight_decay:   sign-momentum's decoupled weight decay (None: 0.2); other optimizers: 0.
    spec:           codec of the pseudo-gradient reduce-scatter and the update all-gather across
                    islands; None: uncompressed fp32.
    error_feedback: keep the pseudo-gradient quantization residual and add it to the next one.
    """

    optimizer: str = "sign-momentum"
    local_steps: int = 12
    lr: float | None = None
    betas: tuple[float, float] = (0.95, 0.98)
    momentum: float = 0.9
    weight_decay: float | None = None
    spec: QuantSpec | None = None
    error_feedback: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in OUTER_OPTIMIZERS:
            raise ValueError(f"OuterConfig.optimizer must be one of {OUTER_OPTIMIZERS}, got {self.optimizer!r}")
        tau = self.local_steps
        if isinstance(tau, bool) or not isinstance(tau, int) or tau < 1:
            raise ValueError(f"OuterConfig.local_steps (tau) must be an integer >= 1, got {tau!r}")
        if self.lr is None:
            object.__setattr__(self, "lr", _DEFAULT_LR[self.optimizer])
        if self.weight_decay is None:
            object.__setattr__(self, "weight_decay", _DEFAULT_WEIGHT_DECAY[self.optimizer])
        if not self.lr > 0:
            raise ValueError(f"OuterConfig.lr must be > 0, got {self.lr!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"OuterConfig.betas must be two values in [0, 1), got {self.betas!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"OuterConfig.momentum must be in [0, 1), got {self.momentum!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"OuterConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.weight_decay and self.optimizer != "sign-momentum":
            raise ValueError(f"OuterConfig.weight_decay is only used by 'sign-momentum'; set it to 0 "
                             f"or None for {self.optimizer!r}")
        if self.spec is not None and not isinstance(self.spec, QuantSpec):
            raise ValueError(f"OuterConfig.spec must be a QuantSpec or None, got {self.spec!r}")

    def describe(self) -> str:
        wire = "fp32" if self.spec is None else f"{self.spec}{' +EF' if self.error_feedback else ''}"
        return f"outer {self.optimizer} lr {self.lr} every {self.local_steps} steps, pseudo-grads {wire}"


# ---- outer optimizers ---------------------------------------------------------------------------
class OuterOptimizer:
    """Updates this rank's chunk of the outer weights in place from the averaged pseudo-gradient
    chunk (x_start - x_end, averaged over islands). `inner_lr`: the inner lr of the last step."""

    def __init__(self, config: OuterConfig, numel: int, device: torch.device) -> None:
        self.config = config
        self.state: dict[str, torch.Tensor] = {}

    def step(self, params: torch.Tensor, pseudo_grad: torch.Tensor, inner_lr: float) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.state):
            raise ValueError(f"outer optimizer state has keys {sorted(state)}, expected {sorted(self.state)}")
        for k, v in state.items():
            if v.shape != self.state[k].shape:
                raise ValueError(f"outer optimizer state {k!r} has shape {tuple(v.shape)}, expected "
                                 f"{tuple(self.state[k].shape)}")
            self.state[k].copy_(v)


class SignMomentum(OuterOptimizer):
    """Yu et al. 2024 (arXiv 2411.17866) Algorithm 1's global step, as in the authors' code."""

    def __init__(self, config: OuterConfig, numel: int, device: torch.device) -> None:
        super().__init__(config, numel, device)
        self.state["momentum"] = torch.zeros(numel, device=device)

    @torch.no_grad()
    def step(self, params: torch.Tensor, pseudo_grad: torch.Tensor, inner_lr: float) -> None:
        if not inner_lr > 0:
            raise ValueError(f"sign-momentum scales its step by the inner lr, which must be > 0, got {inner_lr!r}")
        beta1, beta2 = self.config.betas
        gamma = self.config.lr * inner_lr
        m = self.state["momentum"]
        d = pseudo_grad / inner_lr
        direction = m.mul(beta1).add_(d, alpha=1 - beta1).sign_()
        params.mul_(1 - self.config.weight_decay * gamma).add_(direction, alpha=-gamma)
        m.mul_(beta2).add_(d, alpha=1 - beta2)


class Nesterov(OuterOptimizer):
    """DiLoCo's outer optimizer: torch.optim.SGD(lr, momentum, nesterov=True) on the pseudo-gradient."""

    def __init__(self, config: OuterConfig, numel: int, device: torch.device) -> None:
        super().__init__(config, numel, device)
        self.state["momentum"] = torch.zeros(numel, device=device)

    @torch.no_grad()
    def step(self, params: torch.Tensor, pseudo_grad: torch.Tensor, inner_lr: float) -> None:
        mu = self.config.momentum
        buf = self.state["momentum"].mul_(mu).add_(pseudo_grad)
        params.add_(pseudo_grad.add(buf, alpha=mu), alpha=-self.config.lr)


class Average(OuterOptimizer):
    """Plain local SGD: with lr 1 the weights become the islands' average."""

    @torch.no_grad()
    def step(self, params: torch.Tensor, pseudo_grad: torch.Tensor, inner_lr: float) -> None:
        params.sub_(pseudo_grad, alpha=self.config.lr)


def make_outer_optimizer(config: OuterConfig, numel: int, device: torch.device) -> OuterOptimizer:
    cls = {"sign-momentum": SignMomentum, "nesterov": Nesterov, "average": Average}[config.optimizer]
    return cls(config, numel, device)


# ---- islands ------------------------------------------------------------------------------------
@dataclass
class Islands:
    """island: Topology of this rank's island (for the inner engine; ranks island-local).
    outer: Topology of the outer group (the K ranks with this island-local rank, one per island;
    rank = island index; every member counted as another node, so all its bytes are "inter")."""

    index: int
    num_islands: int
    island: Topology
    outer: Topology

    def describe(self) -> str:
        return f"{self.num_islands} island(s) of {self.island.describe()}"


def check_islands(world_size: int, num_islands: int) -> int:
    """Raise ValueError unless num_islands is a positive divisor of world_size; return ranks per island."""
    if isinstance(num_islands, bool) or not isinstance(num_islands, int) or num_islands < 1:
        raise ValueError(f"islands must be a positive integer, got {num_islands!r}")
    if world_size % num_islands:
        raise ValueError(f"islands ({num_islands}) must divide the world size ({world_size}): "
                         f"choose one of {divisors(world_size)}")
    return world_size // num_islands


def build_islands(num_islands: int, gpus_per_node: int | None = None, *,
                  device: torch.device | str | None = None) -> Islands:
    """Split the initialized world into `num_islands` islands of consecutive ranks. Collective.

    gpus_per_node as in build_topology. An island holds whole nodes, or lies inside one node
    (then it is one node of S ranks). Arguments are checked before any communication.
    """
    if not dist.is_initialized():
        raise RuntimeError("build_islands needs an initialized default process group")
    world, rank = dist.get_world_size(), dist.get_rank()
    S = check_islands(world, num_islands)
    world_topo = build_topology(gpus_per_node, device=device)  # validates L and LOCAL_RANK order
    L = world_topo.gpus_per_node
    if S % L and L % S:
        raise ValueError(f"an island of {S} ranks must hold whole nodes of {L} ranks or lie inside "
                         f"one node: choose islands so that {S} divides {L} or is a multiple of it")
    L_island = min(L, S)
    K, M_island = num_islands, S // L_island
    mesh = init_device_mesh(world_topo.device.type, (K, M_island, L_island),
                            mesh_dim_names=("island", "inter", "intra"))
    island_group, _ = dist.new_subgroups_by_enumeration(
        [list(range(i * S, (i + 1) * S)) for i in range(K)])
    single, _ = dist.new_subgroups_by_enumeration([[r] for r in range(world)])
    index, local = divmod(rank, S)
    island = Topology(
        rank=local, world_size=S, nodes=M_island, gpus_per_node=L_island, node=local // L_island,
        local_rank=local % L_island, device=world_topo.device, world_group=island_group,
        intra_group=mesh.get_group("intra"), inter_group=mesh.get_group("inter"),
        mesh=mesh["inter", "intra"])
    outer = Topology(
        rank=index, world_size=K, nodes=K, gpus_per_node=1, node=index, local_rank=0,
        device=world_topo.device, world_group=mesh.get_group("island"), intra_group=single,
        inter_group=mesh.get_group("island"), mesh=mesh["island"])
    return Islands(index=index, num_islands=K, island=island, outer=outer)


# ---- pseudo-gradient exchange -------------------------------------------------------------------
class PseudoGradientExchange:
    """The two collectives of an outer step over the outer group (K ranks, one per island).

    average(flat):   mean over the group of a flat fp32 vector of `numel` values -> this rank's
                     chunk (ceil(numel / K) values). With a spec: quantized reduce-scatter with
                     error feedback (the residual flat - decoded(sent) is kept and added next time).
    gather(chunk, shared): every rank's new chunk into `shared` (K * chunk values, the weights
                     every island holds). With a spec: qWD, the quantized chunk - own part of
                     shared, decoded and added by every rank.
    """

    def __init__(self, topo: Topology, numel: int, spec: QuantSpec | None, error_feedback: bool) -> None:
        self.topo, self.numel, self.spec = topo, numel, spec
        self.chunk = chunk_numel(numel, topo.world_size)
        self.residual = (torch.zeros(numel, device=topo.device)
                         if spec is not None and error_feedback else None)

    def average(self, flat: torch.Tensor, seed: int) -> torch.Tensor:
        if self.spec is None:
            return reduce_scatter_q(flat, None, self.topo, op="avg")
        if self.residual is not None:
            flat = flat + self.residual
            # The bytes reduce_scatter_q sends for this seed, decoded: what the peers receive.
            send = encode_chunks(flat, self.spec, self.topo.world_size,
                                 rank_seed(seed, self.topo.rank, HOP_REDUCE_SCATTER))
            self.residual = flat - decode_chunks(send, self.spec, self.numel)
        return reduce_scatter_q(flat, self.spec, self.topo, op="avg", out_dtype=torch.float32, seed=seed)

    def gather(self, chunk: torch.Tensor, shared: torch.Tensor, seed: int) -> None:
        c, r = self.chunk, self.topo.rank
        if self.spec is None:
            all_gather_q(chunk, None, self.topo, out=shared)
            return
        all_gather_q(chunk, self.spec, self.topo, out=shared, accumulate=True,
                     subtract=shared[r * c:(r + 1) * c], seed=seed)  # qWD: the codec sends chunk - shared


# ---- the outer loop -----------------------------------------------------------------------------
class LocalUpdates:
    """Outer steps across islands for an engine built on `islands.island`.

    Call `step(lr)` once after every engine.step(lr) (skipped inner steps included, so every
    island counts the same); every `local_steps`-th call runs the outer step (collective over the
    whole world) and returns True. The constructor makes every island start from global rank 0's
    weights (one broadcast over the world).
    """

    def __init__(self, engine: ShardedDataParallel, islands: Islands, config: OuterConfig,
                 seed: int = 0) -> None:
        """seed: base seed of the outer collectives' stochastic rounding, the same on every island
        (each island's engine has its own seed for the inner collectives)."""
        if engine.topo is not islands.island:
            raise ValueError("LocalUpdates: the engine must be built on islands.island "
                             "(ShardedDataParallel(model, islands.island, ...))")
        if not isinstance(config, OuterConfig):
            raise ValueError(f"LocalUpdates: config must be an OuterConfig, got {config!r}")
        self.engine, self.islands, self.config, self.seed = engine, islands, config, seed
        self.numel = sum(m.numel() for m in engine.master)
        K, device = islands.num_islands, islands.island.device
        self.exchange = PseudoGradientExchange(islands.outer, self.numel, config.spec, config.error_feedback)
        c = self.exchange.chunk
        self.outer_steps = 0
        self.steps_since_sync = 0

        self._sync_islands()
        # Weights every island starts the round from (flat master shards, padded to K chunks).
        self.start = torch.zeros(K * c, device=device)
        self.start[: self.numel] = self._flat_master()
        # Exact outer weights of the owned chunk (qWD leaves the shared copy one rounding behind).
        self.outer_params = self.start[islands.index * c:(islands.index + 1) * c].clone()
        self.optimizer = make_outer_optimizer(config, c, device)

    @property
    def stats(self) -> CommStats:
        """Bytes this rank sent to other islands."""
        return self.islands.outer.stats

    def step(self, lr: float | None = None) -> bool:
        """Count one inner step; run the outer step every local_steps calls. lr: the inner lr of
        the step just taken (None: the engine's AdamWConfig.lr)."""
        self.steps_since_sync += 1
        if self.steps_since_sync < self.config.local_steps:
            return False
        self._outer_step(self.engine.optim.lr if lr is None else lr)
        return True

    # ---- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's outer state (its chunk of the outer weights and optimizer state, the round's
        start shards, the error-feedback residual, the step counters)."""
        return {
            "optimizer_name": self.config.optimizer,
            "outer_steps": self.outer_steps,
            "steps_since_sync": self.steps_since_sync,
            "start": self.start.cpu().clone(),
            "outer_params": self.outer_params.cpu().clone(),
            "optimizer": self.optimizer.state_dict(),
            "residual": None if self.exchange.residual is None else self.exchange.residual.cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["optimizer_name"] != self.config.optimizer:
            raise ValueError(f"outer state was saved for {state['optimizer_name']!r}, this run uses "
                             f"{self.config.optimizer!r}")
        if state["start"].shape != self.start.shape:
            raise ValueError(f"outer state holds {state['start'].numel()} start values, this layout "
                             f"has {self.start.numel()}: islands, model or buckets changed")
        if (state["residual"] is None) != (self.exchange.residual is None):
            raise ValueError("outer state and this run disagree on the error-feedback residual "
                             "(spec or error_feedback changed)")
        self.optimizer.load_state_dict(state["optimizer"])
        self.start.copy_(state["start"])
        self.outer_params.copy_(state["outer_params"])
        if self.exchange.residual is not None:
            self.exchange.residual.copy_(state["residual"])
        self.outer_steps = state["outer_steps"]
        self.steps_since_sync = state["steps_since_sync"]

    def checkpoint_path(self, path: str | Path) -> Path:
        """Where this island's checkpoint lives under `path`."""
        return Path(path) / f"island{self.islands.index}"

    def save_checkpoint(self, path: str | Path, extra: dict | None = None) -> None:
        """Engine checkpoint of this island under path/island<i>, with the outer state in its extra."""
        self.engine.save_checkpoint(self.checkpoint_path(path), {**(extra or {}), "local_updates": self.state_dict()})

    def load_checkpoint(self, path: str | Path) -> dict:
        extra = self.engine.load_checkpoint(self.checkpoint_path(path))
        if "local_updates" not in extra:
            raise ValueError(f"checkpoint {self.checkpoint_path(path)} holds no local-updates state")
        self.load_state_dict(extra.pop("local_updates"))
        return extra

    # ---- internals ----------------------------------------------------------------------------
    def _flat_master(self) -> torch.Tensor:
        return torch.cat([m.view(-1) for m in self.engine.master])

    @torch.no_grad()
    def _sync_islands(self) -> None:
        """Global rank 0's replica and buffers everywhere; masters rebuilt from the replica."""
        engine = self.engine
        engine.wait_weights()
        for b, master in zip(engine.buckets, engine.master):
            dist.broadcast(b.replica, src=0)
            master.copy_(b.shard(b.replica, engine.topo.rank))
        for buf in engine.module.buffers():
            dist.broadcast(buf, src=0)

    @torch.no_grad()
    def _outer_step(self, inner_lr: float) -> None:
        engine, seed_base = self.engine, self.seed
        engine.wait_weights()
        pseudo_grad = self.start[: self.numel] - self._flat_master()
        mean = self.exchange.average(pseudo_grad, seeds.collective_seed(seed_base, self.outer_steps, 0, OUTER_GRADS))
        self.optimizer.step(self.outer_params, mean, inner_lr)
        self.exchange.gather(self.outer_params, self.start,
                             seeds.collective_seed(seed_base, self.outer_steps, 0, OUTER_WEIGHTS))
        # New masters; replicas gathered uncompressed inside the island (fast links, once per
        # round), so every island restarts from bit-identical weights whatever its CommConfig.
        offset = 0
        for b, master in zip(engine.buckets, engine.master):
            master.copy_(self.start[offset: offset + master.numel()].view_as(master))
            offset += master.numel()
            all_gather_q(master.to(b.replica.dtype), None, engine.topo, out=b.replica)
        self.outer_steps += 1
        self.steps_since_sync = 0


__all__ = [
    "OUTER_OPTIMIZERS", "Islands", "LocalUpdates", "OuterConfig", "OuterOptimizer",
    "PseudoGradientExchange", "build_islands", "check_islands",
    "make_outer_optimizer",
]
