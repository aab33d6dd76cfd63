"""Local updates across islands: the sharded engine every step inside an island, an outer step
across islands every `local_steps` (tau) steps. Written once for real and virtual ranks.

Layout. The W ranks form K islands of S = W / K consecutive ranks (e.g. one node each); island i
holds global ranks i*S .. (i+1)*S - 1 and runs ShardedDataParallel on its own world, so island-local
rank l owns shard l of every bucket. The ranks with the same island-local rank (one per island) own
the same shard indices and form the *outer group* of l. One island per rank (S = 1) is plain local
SGD / DiLoCo; one island (K = 1) is single-worker lookahead.

Worlds. `build_islands` splits a torch.distributed job (this process: one rank of one island, an
outer group of K processes); `virtual_islands` plays all K islands of S virtual ranks in this
process (one model copy per island: islands drift apart between outer steps), with the outer
collectives replayed by halfbyte.comm.emulate. `OuterExchange` is the only difference.

Outer step (every tau inner steps, identical on every island), for every island-local rank l:
  1. pseudo-gradient of the owned shards: Delta = x_start - x_end (fp32 master shards)
  2. average over islands by a reduce-scatter in the outer group: island i gets chunk i of the
     average (uncompressed fp32, or quantized with error feedback: each island adds its residual
     from the previous outer step before quantizing and keeps the new one, so what the islands
     receive, summed over outer steps, tracks the exact sum to within one step's error)
  3. the outer optimizer updates the exact outer weights of that chunk (its state lives with it:
     each rank keeps 1/W of the model's outer state)
  4. all-gather in the outer group: the new chunk itself (uncompressed), or its quantized
     difference to the weights every island holds (qWD: every island adds the same decoded
     bytes, so all islands restart from identical weights and the error does not accumulate)
  5. the new shared weights become the engine's master shards and are all-gathered uncompressed
     into the replicas inside the island (so islands restart bit-identical even under qWD or
     direct weight modes). Inner AdamW state is kept.
With `delay` d > 0 (Streaming DiLoCo's overlapped exchange, Douillard et al. 2025, arXiv 2501.18512):
steps 1-2 start at the round's end and the islands keep training from their own weights;
the reduce-scatter runs behind the next inner step, the all-gather behind steps 2..d, and after the
d-th step every island takes the new outer weights x_new (the next round's anchor) merged with its
progress since the round's end: x <- x + (x_new - x_end) (delay_mix none: CoCoD-SGD's rule, Shen et
al., IJCAI 2019, arXiv 1906.12043: no inner step is lost) or x <- alpha x + (1 - alpha) x_new
(delay_mix alpha: Streaming DiLoCo's merge; alpha 0, torchft's and MaxText's default, drops the d
steps' progress). The next round's pseudo-gradient is taken against x_new, so every inner step counts
in exactly one round.

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

Usage (`lr` is the inner learning rate of this step):
    islands = build_islands(num_islands=K)                  # collective; or virtual_islands(K, S)
    engines = [ShardedDataParallel(model, world, optim=..., comm=CommConfig.preset("sdp4bit"))
               for model, world in zip(models, islands.worlds)]      # one per island held here
    local = LocalUpdates(engines, islands, OuterConfig("sign-momentum", local_steps=tau))
    for step ...:
        backward per island; engine.step(lr) for each; local.step(lr); engine.zero_grad() for each
    local.flush()                     # after the last step (delay > 0): apply the exchange in flight
    local.save_checkpoint(path, extra) / local.load_checkpoint(path) -> extra
Inter-island bytes are counted in `local.stats`, every outer hop as "inter".
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from halfbyte.comm import emulate
from halfbyte.comm.accounting import CommStats, chunk_numel
from halfbyte.comm.collectives import HOP_REDUCE_SCATTER, all_gather_q, decode_chunks, encode_chunks, rank_seed
from halfbyte.comm.collectives import reduce_scatter_q
from halfbyte.comm.topology import Topology, build_topology, divisors
from halfbyte.engine import checkpoint, seeds
from halfbyte.engine.sharded import ShardedDataParallel
from halfbyte.engine.world import ProcessGroupWorld, VirtualWorld, World
from halfbyte.quant import QuantSpec

OUTER_OPTIMIZERS = ("sign-momentum", "nesterov", "average")

# Per-optimizer defaults for the fields left None (sources in the module docstring).
_DEFAULT_LR = {"sign-momentum": 1.0, "nesterov": 0.7, "average": 1.0}
_DEFAULT_WEIGHT_DECAY = {"sign-momentum": 0.2, "nesterov": 0.0, "average": 0.0}

# Seed streams of the outer collectives (the engine uses seeds.WEIGHTS = 0, seeds.GRADS = 1).
OUTER_GRADS = 2
OUTER_WEIGHTS = 3


def _is_default(config: OuterConfig, name: str) -> bool:
    """Whether the field `name` holds its declared default (a list of the same values counts: TOML
    reads tuples as lists)."""
    value, default = getattr(config, name), OuterConfig.__dataclass_fields__[name].default
    return (tuple(value) if isinstance(value, list) else value) == default


@dataclass(frozen=True)
class OuterConfig:
    """The outer step across islands (local updates).

    optimizer:      outer optimizer: sign-momentum | nesterov | average, or none: every step
                    synchronous data parallel, no islands (the other outer options must then keep
                    their defaults)
    local_steps:    tau, inner steps between outer steps
    islands:        islands of consecutive ranks (0: one per (emulated) node)
    lr:             outer learning rate (none: sign-momentum 1.0 x the inner lr, nesterov 0.7,
                    average 1.0); a sign-momentum round moves each weight by lr x the inner lr,
                    one inner step's worth: 1.0 is the authors' setting at tau 12, too small at tau 32
                    (docs/local_updates.md)
    betas:          sign-momentum's (beta1 of the update direction, beta2 of the momentum)
    momentum:       nesterov's momentum
    weight_decay:   sign-momentum's decoupled weight decay (none: 0.2); other optimizers: 0
    spec:           codec of the pseudo-gradient exchange across islands (none: uncompressed fp32);
                    2 bits (--outer-bits 2) run on the reference codec, every tau steps
    error_feedback: keep the exchange's quantization residual and add it to the next one
    delay:          inner steps between starting the outer exchange after a round's last inner step
                    and applying its result (the exchange runs behind them: Streaming DiLoCo's
                    overlap); 0: synchronous, the islands wait for the exchange. Must be < local_steps
    delay_mix:      with delay: how the islands take the result. none: keep each island's progress
                    since the exchange started (weights += new outer weights - weights at the
                    round's end; CoCoD-SGD's rule); a number alpha in [0, 1): weights = alpha *
                    weights + (1 - alpha) * new outer weights (Streaming DiLoCo's merge; 0 drops
                    the delay steps' progress)
    """

    optimizer: str = "sign-momentum"
    local_steps: int = 12
    islands: int = 0
    lr: float | None = None
    betas: tuple[float, float] = (0.95, 0.98)
    momentum: float = 0.9
    weight_decay: float | None = None
    spec: QuantSpec | None = field(default=None, metadata={"template": QuantSpec(
        bits=4, group_size=128, rounding="stochastic", hadamard=32)})
    error_feedback: bool = True
    delay: int = 0
    delay_mix: float | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in OUTER_OPTIMIZERS + ("none",):
            raise ValueError(f"OuterConfig.optimizer must be one of {OUTER_OPTIMIZERS + ('none',)}, "
                             f"got {self.optimizer!r}")
        tau = self.local_steps
        if isinstance(tau, bool) or not isinstance(tau, int) or tau < 1:
            raise ValueError(f"OuterConfig.local_steps (tau) must be an integer >= 1, got {tau!r}")
        if isinstance(self.islands, bool) or not isinstance(self.islands, int) or self.islands < 0:
            raise ValueError(f"OuterConfig.islands must be an integer >= 1 (or 0: one per node), got {self.islands!r}")
        d = self.delay
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < tau:
            raise ValueError(f"OuterConfig.delay must be an integer in [0, local_steps = {tau}), got {d!r}")
        if self.delay_mix is not None and not 0.0 <= self.delay_mix < 1.0:  # 1: islands never take the outer weights
            raise ValueError(f"OuterConfig.delay_mix must be none or a number in [0, 1), got {self.delay_mix!r}")
        if self.delay_mix is not None and not d:
            raise ValueError("OuterConfig.delay_mix is only used with a delay (outer.delay > 0); leave it unset")
        if not self.enabled:
            # the others would be ignored: a run asked for islands would train plain data parallel
            unused = [f"outer.{f.name}" for f in fields(self)
                      if f.name != "optimizer" and not _is_default(self, f.name)]
            if unused:
                one = len(unused) == 1
                raise ValueError(f"{', '.join(unused)} appl{'ies' if one else 'y'} only to local updates, which are "
                                 f"off (outer.optimizer none): add --outer {' | '.join(sorted(OUTER_OPTIMIZERS))}, "
                                 f"or drop {'it' if one else 'them'}")
            return
        if self.lr is None:
            object.__setattr__(self, "lr", _DEFAULT_LR[self.optimizer])
        if self.weight_decay is None:
            object.__setattr__(self, "weight_decay", _DEFAULT_WEIGHT_DECAY[self.optimizer])
        if not 0 < self.lr < float("inf"):
            raise ValueError(f"OuterConfig.lr must be a finite number > 0, got {self.lr!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"OuterConfig.betas must be two values in [0, 1), got {self.betas!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"OuterConfig.momentum must be in [0, 1), got {self.momentum!r}")
        if not 0 <= self.weight_decay < float("inf"):
            raise ValueError(f"OuterConfig.weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.weight_decay and self.optimizer != "sign-momentum":
            raise ValueError(f"OuterConfig.weight_decay is only used by 'sign-momentum'; set it to 0 "
                             f"or None for {self.optimizer!r}")
        if self.spec is not None and not isinstance(self.spec, QuantSpec):
            raise ValueError(f"OuterConfig.spec must be a QuantSpec or None, got {self.spec!r}")

    @property
    def enabled(self) -> bool:
        return self.optimizer != "none"

    def describe(self) -> str:
        wire = "fp32" if self.spec is None else f"{self.spec}{' +EF' if self.error_feedback else ''}"
        delay = ""
        if self.delay:
            mix = "progress kept" if self.delay_mix is None else f"mix {self.delay_mix:g}"
            delay = f", applied {self.delay} step{'s' if self.delay > 1 else ''} later ({mix})"
        return f"outer {self.optimizer} lr {self.lr} every {self.local_steps} steps, pseudo-grads {wire}{delay}"


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
def check_islands(world_size: int, num_islands: int) -> int:
    """Raise ValueError unless num_islands is a positive divisor of world_size; return ranks per island."""
    if isinstance(num_islands, bool) or not isinstance(num_islands, int) or num_islands < 1:
        raise ValueError(f"islands must be a positive integer, got {num_islands!r}")
    if world_size % num_islands:
        raise ValueError(f"islands ({num_islands}) must divide the world size ({world_size}): "
                         f"choose one of {divisors(world_size)}")
    return world_size // num_islands


def island_gpus_per_node(island_size: int, gpus_per_node: int) -> int:
    """Ranks per node inside an island: an island holds whole nodes or lies inside one node."""
    S, L = island_size, gpus_per_node
    if S % L and L % S:
        raise ValueError(f"an island of {S} ranks must hold whole nodes of {L} ranks or lie inside "
                         f"one node: choose islands so that {S} divides {L} or is a multiple of it")
    return min(L, S)


class OuterExchange(ABC):
    """The two collectives of an outer step over the outer group of one island-local rank (K
    islands), for the islands this process holds, with the error-feedback residuals.

    average(flats, seed): the mean over islands of one flat fp32 vector per held island (`numel`
                  values) -> each held island's chunk (ceil(numel / K) values). With a spec:
                  quantized, with error feedback when enabled (the residual flat - decoded(sent)
                  is kept and added next time).
    start_average: average, started: returns a function that waits for the transfer and returns
                  the result (real ranks: async collectives that run behind the inner steps; virtual
                  islands compute at once).
    start_gather(chunks, shared, seed): every island's new chunk into `shared` (K * chunk values,
                  the weights every island holds), started; returns the wait. With a spec: qWD, the
                  quantized chunk - own part of shared, decoded and added by every island.
    What they read is read when they start.
    """

    def __init__(self, islands: tuple[int, ...], num_islands: int, numel: int, spec: QuantSpec | None,
                 error_feedback: bool, device: torch.device) -> None:
        self.islands, self.num_islands, self.numel, self.spec = islands, num_islands, numel, spec
        self.chunk = chunk_numel(numel, num_islands)
        self.residual = ([torch.zeros(numel, device=device) for _ in islands]
                         if spec is not None and error_feedback else None)

    def average(self, flats: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
        return self.start_average(flats, seed)()

    def start_average(self, flats: list[torch.Tensor], seed: int) -> Callable[[], list[torch.Tensor]]:
        if self.residual is not None:
            flats = [f + r for f, r in zip(flats, self.residual)]
            for i, (island, flat) in enumerate(zip(self.islands, flats)):
                # The bytes the reduce-scatter sends for this seed, decoded: what the peers receive.
                send = encode_chunks(flat, self.spec, self.num_islands,
                                     rank_seed(seed, island, HOP_REDUCE_SCATTER))
                self.residual[i] = flat - decode_chunks(send, self.spec, self.numel)
        return self._start_average(flats, seed)

    @abstractmethod
    def _start_average(self, flats: list[torch.Tensor], seed: int) -> Callable[[], list[torch.Tensor]]: ...

    @abstractmethod
    def start_gather(self, chunks: list[torch.Tensor], shared: torch.Tensor, seed: int) -> Callable[[], None]: ...


class ProcessExchange(OuterExchange):
    """This process is island `topo.rank` of an outer group of K processes (a Topology of K nodes)."""

    def __init__(self, topo: Topology, numel: int, spec: QuantSpec | None, error_feedback: bool) -> None:
        super().__init__((topo.rank,), topo.world_size, numel, spec, error_feedback, topo.device)
        self.topo = topo

    def _start_average(self, flats: list[torch.Tensor], seed: int) -> Callable[[], list[torch.Tensor]]:
        (flat,) = flats
        if self.spec is None:
            handle = reduce_scatter_q(flat, None, self.topo, op="avg", async_op=True)
        else:
            handle = reduce_scatter_q(flat, self.spec, self.topo, op="avg", out_dtype=torch.float32, seed=seed,
                                      async_op=True)
        return lambda: [handle.wait()]

    def start_gather(self, chunks: list[torch.Tensor], shared: torch.Tensor, seed: int) -> Callable[[], None]:
        (chunk,), c, r = chunks, self.chunk, self.topo.rank
        if self.spec is None:
            handle = all_gather_q(chunk, None, self.topo, out=shared, async_op=True)
        else:  # qWD: the codec sends chunk - shared
            handle = all_gather_q(chunk, self.spec, self.topo, out=shared, accumulate=True,
                                  subtract=shared[r * c:(r + 1) * c], seed=seed, async_op=True)

        def wait() -> None:
            handle.wait()
        return wait


class VirtualExchange(OuterExchange):
    """All K islands in this process: the outer collectives replayed (halfbyte.comm.emulate)."""

    def __init__(self, num_islands: int, numel: int, spec: QuantSpec | None, error_feedback: bool,
                 device: torch.device, stats: CommStats) -> None:
        super().__init__(tuple(range(num_islands)), num_islands, numel, spec, error_feedback, device)
        self.stats = stats

    def _start_average(self, flats: list[torch.Tensor], seed: int) -> Callable[[], list[torch.Tensor]]:
        means = emulate.reduce_scatter(flats, self.spec, seed, nodes=self.num_islands, op="avg",
                                       out_dtype=torch.float32, stats=self.stats)
        return lambda: means

    def start_gather(self, chunks: list[torch.Tensor], shared: torch.Tensor, seed: int) -> Callable[[], None]:
        c = self.chunk
        parts = [shared[i * c:(i + 1) * c] for i in range(self.num_islands)]
        emulate.all_gather(chunks, self.spec, seed, shared, nodes=self.num_islands,
                           accumulate=self.spec is not None,
                           subtract=parts if self.spec is not None else None, stats=self.stats)
        return lambda: None


@dataclass
class Islands:
    """The islands this process holds.

    owned:  island indices held here (one for a torch.distributed job, all K for virtual ranks)
    worlds: the World of each held island, for its engine (ranks island-local)
    world:  the World every process of the run is in (checkpoints are written over it)
    outer:  the outer group's Topology (K processes, one per island; every member its own node, so
            all its bytes are "inter"); None for virtual islands
    stats:  bytes sent between islands by the ranks this process plays
    """

    num_islands: int
    owned: tuple[int, ...]
    worlds: list[World]
    world: World
    outer: Topology | None
    stats: CommStats

    def describe(self) -> str:
        return f"{self.num_islands} island(s) of {self.worlds[0].describe()}"

    def exchanges(self, numel: int, spec: QuantSpec | None, error_feedback: bool) -> list[OuterExchange]:
        """One exchange per island-local rank held here (its outer group)."""
        if self.outer is not None:
            return [ProcessExchange(self.outer, numel, spec, error_feedback)]
        S, device = self.worlds[0].world_size, self.worlds[0].device
        return [VirtualExchange(self.num_islands, numel, spec, error_feedback, device, self.stats)
                for _ in range(S)]

    @torch.no_grad()
    def sync_(self, engines: list[ShardedDataParallel]) -> None:
        """Island 0's replica and buffers in every island; master shards rebuilt from the replica."""
        first = engines[0]
        for engine in engines:
            engine.wait_weights()
            for b, other in zip(engine.buckets, first.buckets):
                if self.outer is not None:
                    dist.broadcast(b.replica, group_src=0, group=self.outer.world_group)
                else:
                    b.replica.copy_(other.replica)
            for buf, other in zip(engine.module.buffers(), first.module.buffers()):
                if self.outer is not None:
                    dist.broadcast(buf, group_src=0, group=self.outer.world_group)
                else:
                    buf.copy_(other)
            for j, rank in enumerate(engine.world.owned):
                for b, master in zip(engine.buckets, engine.master[j]):
                    master.copy_(b.shard(b.replica, rank))


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
    L_island = island_gpus_per_node(S, world_topo.gpus_per_node)
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
    return Islands(num_islands=K, owned=(index,), worlds=[ProcessGroupWorld(island)],
                   world=ProcessGroupWorld(world_topo), outer=outer, stats=outer.stats)


def virtual_islands(num_islands: int, island_size: int, gpus_per_node: int | None = None,
                    device: torch.device | str = "cpu") -> Islands:
    """K islands of `island_size` virtual ranks each, all in this process; gpus_per_node: ranks per
    (emulated) node of the whole layout (None: one node per island)."""
    S = island_size
    check_islands(num_islands * S, num_islands)
    L = island_gpus_per_node(S, S if gpus_per_node is None else gpus_per_node)
    worlds: list[World] = [VirtualWorld(S, L, device) for _ in range(num_islands)]
    return Islands(num_islands=num_islands, owned=tuple(range(num_islands)), worlds=worlds,
                   world=worlds[0], outer=None, stats=CommStats())


# ---- the outer loop -----------------------------------------------------------------------------
class LocalUpdates:
    """Outer steps across islands for the engines of the islands this process holds
    (`engines[i]` is island islands.owned[i], built on islands.worlds[i]).

    Call `step(lr)` once after every engines' step(lr) (skipped inner steps included, so every
    island counts the same); every `local_steps`-th call ends a round and runs the outer step
    (collective over the whole world). It returns True on the calls after which an outer update
    was applied: the round's end, or with `config.delay` = d, d calls later. The constructor makes
    every island start from island 0's weights.

    Delayed exchange (d > 0), in three stages so that it runs behind the inner steps: at the round's
    end the pseudo-gradient's reduce-scatter starts (an async collective on real ranks); at the next
    call it is waited for, the outer optimizer steps and the all-gather of the new outer weights
    starts; at the d-th call it is waited for and every island takes the new outer weights (the
    anchor of the next round) with its progress since the round's end (`delay_mix`). With d = 1
    the all-gather is waited for at once: only the reduce-scatter is hidden. `flush()` applies an
    exchange in flight now (at the end of training). The arithmetic is the same whenever a
    transfer ends, so a checkpoint waits for the transfer in flight and stores its result (the
    averaged chunks, or the new outer weights) with the round-end weights the merge needs: a
    resumed run is bit-identical and counts the same bytes.
    """

    def __init__(self, engines: list[ShardedDataParallel], islands: Islands, config: OuterConfig,
                 seed: int = 0) -> None:
        """seed: base seed of the outer collectives' stochastic rounding, the same on every island
        (each island's engine has its own seed for the inner collectives)."""
        if len(engines) != len(islands.worlds) or any(e.world is not w for e, w in zip(engines, islands.worlds)):
            raise ValueError("LocalUpdates: engine i must be built on islands.worlds[i] "
                             "(ShardedDataParallel(model, islands.worlds[i], ...)), one per held island")
        if not isinstance(config, OuterConfig) or not config.enabled:
            raise ValueError(f"LocalUpdates: config must be an OuterConfig with an outer optimizer, got {config!r}")
        self.engines, self.islands, self.config, self.seed = engines, islands, config, seed
        first = engines[0]
        self.numel = sum(b.shard_numel for b in first.buckets)  # values one island-local rank owns
        self.exchanges = islands.exchanges(self.numel, config.spec, config.error_feedback)
        K, c, device = islands.num_islands, self.exchanges[0].chunk, first.world.device
        self.outer_steps = 0
        self.steps_since_sync = 0

        islands.sync_(engines)
        # Per island-local rank held here: the weights every island starts the round from (the
        # flat master shards, padded to K chunks), and per held island i the exact outer weights
        # of chunk i (qWD leaves the shared copy one rounding behind) with its outer optimizer.
        self.start = [torch.zeros(K * c, device=device) for _ in first.world.owned]
        for j, start in enumerate(self.start):
            start[: self.numel] = self._flat_master(first, j)
        self.outer_params = [[start[i * c:(i + 1) * c].clone() for i in islands.owned] for start in self.start]
        # Per held island-local rank: the positions of `start` that are no parameter's (bucket
        # padding inside the shards, and the tail up to K chunks).
        self._padding = [torch.ones(K * c, dtype=torch.bool, device=device) for _ in first.world.owned]
        for mask, rank in zip(self._padding, first.world.owned):
            offset = 0
            for b in first.buckets:
                mask[offset: offset + b.valid_in_shard(rank)] = False
                offset += b.shard_numel
        self.optimizers = [[make_outer_optimizer(config, c, device) for _ in islands.owned] for _ in self.start]
        # The exchange in flight (delay > 0): None, "reducing" (reduce-scatter started), "reduced"
        # (its averages in _means: a checkpoint was taken), "gathering" (outer step taken,
        # all-gather started) or "gathered" (the new outer weights in `start`, the merge due); per
        # held island-local rank and island, the flat master shards at the round's end (what the
        # merge subtracts) and the averaged chunk.
        self.pending: str | None = None
        self._pending_lr = 0.0
        self._waits: list[Callable[[], Any]] = []
        delayed = range(1 if config.delay else 0)
        self._round_end = [[torch.zeros(self.numel, device=device) for _ in islands.owned]
                           for _ in self.start for _ in delayed]
        self._means = [[torch.zeros(c, device=device) for _ in islands.owned] for _ in self.start for _ in delayed]

    @property
    def stats(self) -> CommStats:
        """Bytes the ranks of this process sent to other islands."""
        return self.islands.stats

    def step(self, lr: float | None = None) -> bool:
        """Count one inner step; end the round every local_steps calls. lr: the inner lr of the step
        just taken (None: the engines' parameter groups' lr, which must be one value). True when an
        outer update was applied to the weights after this step."""
        self.steps_since_sync += 1
        applied = False
        if self.pending is not None:  # delay > 0: the exchange started at the round's end
            if self.pending in ("reducing", "reduced"):
                self._outer_update_and_gather()
            if self.steps_since_sync >= self.config.delay:
                self._apply()
                applied = True
        if self.steps_since_sync < self.config.local_steps:
            return applied
        if lr is None:
            lrs = {float(g["lr"]) for g in self.engines[0].param_groups}
            if len(lrs) > 1:
                raise ValueError(f"LocalUpdates.step(lr=None): the engine's parameter groups have different "
                                 f"lrs {sorted(lrs)}; pass the inner lr the outer step scales by")
            (lr,) = lrs
        self._start_exchange(lr)
        if self.config.delay:
            return applied
        self._outer_update_and_gather()
        self._apply()
        return True

    def flush(self) -> bool:
        """Apply the exchange in flight now (collective; at the end of training, so that the islands
        end on the outer weights: called right after a round's end, they end identical, as with
        delay 0). True if there was one."""
        if self.pending is None:
            return False
        self._apply()
        return True

    # ---- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path, extra: dict | None = None) -> None:
        """Every held island's engine (keys `island<k>.`) and the outer state, in one checkpoint.
        A transfer in flight is waited for first and its result stored (the outer step and the
        all-gather run when they would have: the bytes the run records stay the same)."""
        if self.pending == "reducing":
            for means, wait in zip(self._means, self._waits):
                for mean, got in zip(means, wait()):
                    mean.copy_(got)
            self._waits, self.pending = [], "reduced"
        if self.pending == "gathering":
            self._finish_transfers()
        checkpoint.save(path, self._engines_by_prefix(), extra or {}, self.islands.world, self._state())

    def load_checkpoint(self, path: str | Path) -> dict:
        state = self._state()
        extra = checkpoint.load(path, self._engines_by_prefix(), self.islands.world, state)
        counters = state["outer.counters"]
        if counters["optimizer"] != self.config.optimizer:
            raise checkpoint.CheckpointError(
                f"checkpoint {path} was written with the outer optimizer {counters['optimizer']!r}, this run "
                f"uses {self.config.optimizer!r}")
        pending, delay = counters.get("pending"), counters.get("delay", 0)
        if pending is not None and delay != self.config.delay:
            raise checkpoint.CheckpointError(
                f"checkpoint {path} was saved {counters['steps_since_sync']} step(s) into an outer exchange "
                f"applied {delay} step(s) after its start; this run has delay {self.config.delay}: resume with "
                f"--outer.delay {delay}")
        self.outer_steps, self.steps_since_sync = counters["outer_steps"], counters["steps_since_sync"]
        self.pending, self._waits, self._pending_lr = pending, [], counters.get("pending_lr", 0.0)
        return extra

    def _engines_by_prefix(self) -> dict[str, ShardedDataParallel]:
        return {f"island{k}.": e for k, e in zip(self.islands.owned, self.engines)}

    def _state(self) -> dict[str, Any]:
        """The outer state as checkpoint entries: the round's start weights (the same in every
        island), each chunk's exact outer weights and optimizer state, each island's residual and,
        with delay, its weights at the round's end."""
        first, c = self.engines[0], self.exchanges[0].chunk
        state: dict[str, Any] = {"outer.counters": {"optimizer": self.config.optimizer,
                                                    "outer_steps": self.outer_steps,
                                                    "steps_since_sync": self.steps_since_sync,
                                                    "delay": self.config.delay, "pending": self.pending,
                                                    "pending_lr": self._pending_lr}}
        vectors: dict[str, list[tuple[int, int, torch.Tensor]]] = {"outer.start": []}
        for j, start in enumerate(self.start):
            vectors["outer.start"].append((j, 0, start[: self.numel]))
            for i, island in enumerate(self.islands.owned):
                q0 = island * c
                vectors.setdefault("outer.params", []).append((j, q0, self.outer_params[j][i]))
                for name, t in self.optimizers[j][i].state.items():
                    vectors.setdefault(f"outer.{name}", []).append((j, q0, t))
                residual = self.exchanges[j].residual
                if residual is not None:
                    vectors.setdefault(f"island{island}.outer.residual", []).append((j, 0, residual[i]))
                if self._round_end:
                    vectors.setdefault(f"island{island}.outer.round_end", []).append((j, 0, self._round_end[j][i]))
                    vectors.setdefault("outer.pending_mean", []).append((j, q0, self._means[j][i]))
        for key, parts in vectors.items():
            state |= {f"{key}.{n}": v for n, v in checkpoint.vector_pieces(first, parts).items()}
        return state

    # ---- internals ----------------------------------------------------------------------------
    @staticmethod
    def _flat_master(engine: ShardedDataParallel, j: int) -> torch.Tensor:
        return torch.cat([m.view(-1) for m in engine.master[j]])

    def _seed(self, stream: int) -> int:
        return seeds.collective_seed(self.seed, self.outer_steps, 0, stream)

    @torch.no_grad()
    def _start_exchange(self, inner_lr: float) -> None:
        """The round's end: every island's pseudo-gradient Delta = start - x_end, its average started."""
        for engine in self.engines:
            engine.wait_weights()
        self._pending_lr, self._waits = inner_lr, []
        for j, (start, exchange) in enumerate(zip(self.start, self.exchanges)):
            ends = [self._flat_master(e, j) for e in self.engines]
            for i, end in enumerate(ends if self._round_end else []):
                self._round_end[j][i].copy_(end)
            self._waits.append(exchange.start_average([start[: self.numel] - end for end in ends],
                                                      self._seed(OUTER_GRADS)))
        self.pending, self.steps_since_sync = "reducing", 0

    @torch.no_grad()
    def _outer_update_and_gather(self) -> None:
        """Wait for the averages, step the outer optimizer of every held chunk, start the all-gather."""
        waits, self._waits = self._waits, []
        averages = [wait() for wait in waits] if self.pending == "reducing" else self._means
        for j, (exchange, means) in enumerate(zip(self.exchanges, averages)):
            # A Hadamard rotation spreads codec noise into the padding: keep it (and what the outer
            # optimizer derives from it) at zero there, as the masters are.
            padding, c = self._padding[j], exchange.chunk
            for residual in exchange.residual or []:
                residual[padding[: self.numel]] = 0
            for i, (island, mean) in enumerate(zip(self.islands.owned, means)):
                mean[padding[island * c:(island + 1) * c]] = 0
                self.optimizers[j][i].step(self.outer_params[j][i], mean, self._pending_lr)
            self._waits.append(exchange.start_gather(self.outer_params[j], self.start[j], self._seed(OUTER_WEIGHTS)))
        self.pending = "gathering"

    def _finish_transfers(self) -> None:
        """Carry an exchange in flight to its merge: the new outer weights in `start`."""
        if self.pending in ("reducing", "reduced"):
            self._outer_update_and_gather()
        if self.pending == "gathering":
            for wait in self._waits:
                wait()
            self._waits = []
            for start, padding in zip(self.start, self._padding):
                start[padding] = 0  # the quantized gather's noise must not stay in the padding
            self.pending = "gathered"

    @torch.no_grad()
    def _apply(self) -> None:
        """The new outer weights become every island's masters: exactly (right at the round's end:
        delay 0 or a flush), or merged with the island's progress since the round's end."""
        self._finish_transfers()
        for engine in self.engines:
            engine.wait_weights()
        exact, mix = self.steps_since_sync == 0, self.config.delay_mix
        for j, start in enumerate(self.start):
            for i, engine in enumerate(self.engines):
                offset = 0
                for master in engine.master[j]:
                    new = start[offset: offset + master.numel()].view_as(master)
                    if exact or mix == 0:
                        master.copy_(new)
                    elif mix is None:
                        # CoCoD-SGD (Shen et al., IJCAI 2019, arXiv 1906.12043): the progress made
                        # during the exchange is kept, added to the new outer weights.
                        end = self._round_end[j][i][offset: offset + master.numel()].view_as(master)
                        master.add_(new - end)
                    else:  # Streaming DiLoCo (Douillard et al. 2025, arXiv 2501.18512): mixing factor alpha
                        master.mul_(mix).add_(new, alpha=1 - mix)
                    offset += master.numel()
        for engine in self.engines:
            engine.zero_padding_()
        # Replicas gathered uncompressed inside the island (fast links, once per round), so every
        # island restarts from bit-identical weights (delay 0) whatever its CommConfig.
        for engine in self.engines:
            engine.refresh_replica()
        self.outer_steps += 1
        self.pending = None


__all__ = [
    "OUTER_OPTIMIZERS", "Islands", "LocalUpdates", "OuterConfig", "OuterExchange", "OuterOptimizer",
    "build_islands", "check_islands", "make_outer_optimizer", "virtual_islands",
]
