"""Cost model for one training step of sharded data parallelism, per communication mode.

The step is compute plus the part of the weight all-gather and gradient reduce-scatter that compute
does not hide. Every collective is priced from its byte counts (`halfbyte.comm.accounting`, the
numbers the real collectives record) with an alpha-beta cost per link class:

    time = latency_steps * alpha + max(intra_bytes / intra_bw, inter_bytes / inter_bw)

`intra_bytes` / `inter_bytes` are what one GPU pushes through its NVLink port and its share of the
node's NICs. Two algorithms move the bytes:
  * ring (NCCL all-gather / reduce-scatter, used for uncompressed and quantized all-gathers): each
    rank forwards (W-1) messages; with L GPUs per node, 1/L of a GPU's traffic crosses the node
    boundary (NCCL gives each GPU one channel's boundary hop), the rest stays on NVLink.
  * all-to-all (quantized reduce-scatter): one direct message per peer, so the accounting's
    intra/inter split is the link load as is. Two-level = intra all-to-all, then inter all-to-all.

Tensor/pipeline parallelism (TP, PP) is accounted for by its effect on data parallelism only: a DP
rank holds params / (TP * PP) values, and a DP group has L // TP GPUs per node. TP all-reduces, PP
sends and the pipeline bubble are the same in every mode, so they are part of `compute_s`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from halfbyte.comm import accounting
from halfbyte.comm.config import CommConfig
from halfbyte.quant import QuantSpec

NIC_MODES = ("per-gpu", "per-node")


# ---- model -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """A GPT (Megatron layout: 4h MLP, learned positions, tied embeddings)."""

    name: str
    layers: int
    hidden: int
    seq_len: int = 2048
    vocab: int = 50304  # GPT-2's 50257 padded to a multiple of 128, as Megatron does

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "seq_len", "vocab"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelShape.{name} must be a positive integer, got {value!r}")

    @property
    def params(self) -> int:
        h = self.hidden
        per_layer = 12 * h * h + 13 * h  # qkv + proj + 4h MLP weights and biases, two layer norms
        return self.layers * per_layer + (self.vocab + self.seq_len) * h + 2 * h

    def flops_per_token(self) -> float:
        """Model FLOPs per trained token (forward + backward, no recompute): Megatron-LM's formula,
        the one behind the TFLOPs the SDP4Bit paper reports."""
        lh2 = self.layers * self.hidden ** 2
        return 72 * lh2 * (1 + self.seq_len / (6 * self.hidden) + self.vocab / (12 * self.layers * self.hidden))

    @classmethod
    def from_params(cls, params: float, layers: int, seq_len: int = 2048) -> ModelShape:
        """The hidden size that gives `params` with `layers` layers (12 * L * h^2 dominates)."""
        if not params > 0:
            raise ValueError(f"--params must be > 0, got {params!r}")
        if not isinstance(layers, int) or layers < 1:
            raise ValueError(f"--layers must be a positive integer, got {layers!r}")
        hidden = max(1, round(math.sqrt(params / (12 * layers))))
        return cls(f"{params / 1e9:g}B", layers, hidden, seq_len)


# The SDP4Bit speed-test models (layers, hidden) from the authors' Megatron scripts.
MODELS: dict[str, ModelShape] = {
    m.name: m
    for m in (
        ModelShape("125m", 12, 768),
        ModelShape("350m", 24, 1024),
        ModelShape("1.3b", 24, 2048),
        ModelShape("2.7b", 32, 2560),
        ModelShape("6.7b", 32, 4096),
        ModelShape("13b", 40, 5120),
        ModelShape("18b", 40, 6144),
    )
}


# ---- hardware ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cluster:
    """M nodes x L GPUs. Bandwidths in Gb/s per direction; latencies are per algorithm step.

    inter_gbps is one GPU's NIC (nic="per-gpu", rail-optimized: one NIC per GPU) or the whole
    node's NIC capacity (nic="per-node"), which its L GPUs share since they all communicate at once.
    intra_gbps is one GPU's NVLink bandwidth per direction.
    """

    nodes: int
    gpus_per_node: int
    intra_gbps: float = 1600.0
    inter_gbps: float = 100.0
    intra_latency_us: float = 1.0
    inter_latency_us: float = 5.0
    nic: str = "per-gpu"
    # Share of the ring's link bandwidth that all-to-all traffic (quantized reduce-scatters) reaches:
    # NCCL runs it as point-to-point send/recv, 0.7 of its ring over TCP sockets on 2 H200s.
    all_to_all_efficiency: float = 1.0

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Cluster.{name} must be a positive integer, got {value!r}")
        for name in ("intra_gbps", "inter_gbps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Cluster.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("intra_latency_us", "inter_latency_us"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"Cluster.{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 < self.all_to_all_efficiency <= 1:
            raise ValueError(f"Cluster.all_to_all_efficiency must be in (0, 1], got {self.all_to_all_efficiency!r}")
        if self.nic not in NIC_MODES:
            raise ValueError(f"Cluster.nic must be one of {NIC_MODES}, got {self.nic!r}")

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def intra_bytes_per_s(self) -> float:
        return self.intra_gbps * 1e9 / 8

    @property
    def inter_bytes_per_s(self) -> float:
        """One GPU's share of inter-node bandwidth."""
        share = 1 if self.nic == "per-gpu" else self.gpus_per_node
        return self.inter_gbps * 1e9 / 8 / share


@dataclass(frozen=True)
class Workload:
    """What one step does besides communicating.

    compute_s:     one step's compute time per GPU with no communication at all (forward, backward,
                   optimizer, and any TP/PP communication and pipeline bubble).
    tokens_per_step: tokens in one global batch.
    tp, pp:        tensor / pipeline parallel degrees; DP size = world / (tp * pp).
    grad_accum:    micro-batches per step; only the last one's backward hides the reduce-scatter,
                   only the first one's forward hides the all-gather.
    overlap:       True: weights all-gathered bucket by bucket during forward (prefetch), grads
                   reduce-scattered as buckets fill in backward (halfbyte's engine). False: both
                   fully exposed (Megatron-LM's default, what SDP4Bit's speed scripts ran).
    weight_bytes / grad_bytes: element size of uncompressed all-gather / reduce-scatter (bf16 = 2;
                   Megatron reduces gradients in fp32 (4) when training in bf16).
    codec_tbps:    codec kernel throughput, TB/s of bytes read + written. The codec runs on the
                   compute stream (the engine's kernels), so with overlap it is never hidden.
    optimizer_s:   the part of compute_s that no communication overlaps: the optimizer step, which
                   waits for the last reduce-scatter and precedes the first all-gather.
    forward_fraction: forward's share of compute_s - optimizer_s (the rest is backward).
    """

    compute_s: float
    tokens_per_step: int
    tp: int = 1
    pp: int = 1
    grad_accum: int = 1
    bucket_numel: int = 25_000_000
    overlap: bool = True
    weight_bytes: int = 2
    grad_bytes: int = 2
    master_bytes: int = 4
    codec_tbps: float = 1.0
    optimizer_s: float = 0.0
    forward_fraction: float = 1 / 3  # forward : backward = 1 : 2

    def __post_init__(self) -> None:
        if not self.compute_s >= 0:
            raise ValueError(f"Workload.compute_s must be >= 0, got {self.compute_s!r}")
        for name in ("tokens_per_step", "tp", "pp", "grad_accum", "bucket_numel"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Workload.{name} must be a positive integer, got {value!r}")
        for name in ("weight_bytes", "grad_bytes", "master_bytes"):
            if getattr(self, name) not in (1, 2, 4):
                raise ValueError(f"Workload.{name} must be 1, 2 or 4, got {getattr(self, name)!r}")
        if not self.codec_tbps > 0:
            raise ValueError(f"Workload.codec_tbps must be > 0, got {self.codec_tbps!r}")
        if not 0 <= self.optimizer_s <= self.compute_s:
            raise ValueError(f"Workload.optimizer_s must be in [0, compute_s = {self.compute_s!r}], "
                             f"got {self.optimizer_s!r}")
        if not 0 < self.forward_fraction < 1:
            raise ValueError(f"Workload.forward_fraction must be in (0, 1), got {self.forward_fraction!r}")


def dp_layout(cluster: Cluster, tp: int, pp: int) -> tuple[int, int]:
    """(nodes, gpus per node) of one data-parallel group.

    TP groups fill a node first (tp <= L), so L // tp DP ranks share a node; pipeline stages live on
    different nodes when tp * pp > L. This is how SDP4Bit builds its intra/inter groups.
    """
    L = cluster.gpus_per_node
    if tp > L or L % tp:
        raise ValueError(f"tensor parallel size {tp} must divide gpus per node ({L})")
    if cluster.world % (tp * pp):
        raise ValueError(f"tp * pp = {tp * pp} must divide the world size {cluster.world}")
    dp = cluster.world // (tp * pp)
    dp_per_node = max(1, L // (tp * pp)) if tp * pp <= L else 1
    return dp // dp_per_node, dp_per_node


# ---- collectives -------------------------------------------------------------------------------
@dataclass(frozen=True)
class CollectiveCost:
    """One collective over all buckets of a step, per GPU."""

    name: str
    algorithm: str  # "ring" | "all-to-all" | "two-level" | "none"
    steps: int  # latency-bound algorithm steps per bucket
    intra_bytes: float  # through this GPU's NVLink port
    inter_bytes: float  # through this GPU's share of the NICs
    codec_bytes: float  # read + written by the codec kernels
    wire_s: float
    codec_s: float

    @property
    def seconds(self) -> float:
        return self.wire_s + self.codec_s


def _elem(spec: QuantSpec | None, dtype_bytes: int) -> QuantSpec | int:
    return dtype_bytes if spec is None else spec


def _ring_loads(logical: dict[str, int], L: int, nodes: int) -> tuple[float, float]:
    """(intra, inter) link bytes of a ring collective whose logical volume is `logical`."""
    total = logical["intra"] + logical["inter"]
    if nodes == 1:
        return float(total), 0.0
    return total * (L - 1) / L, total / L


def _wire_time(intra: float, inter: float, intra_steps: int, inter_steps: int, cluster: Cluster) -> float:
    latency = intra_steps * cluster.intra_latency_us + inter_steps * cluster.inter_latency_us
    bandwidth = max(intra / cluster.intra_bytes_per_s, inter / cluster.inter_bytes_per_s)
    return latency * 1e-6 + bandwidth


def all_gather_cost(spec: QuantSpec | None, shard: int, buckets: int, M: int, L: int, cluster: Cluster,
                    wl: Workload, *, elem_bytes: int, source_bytes: int, accumulate: bool = False) -> CollectiveCost:
    """All-gather (ring) of `buckets` buckets whose per-rank shard is `shard` values: packed with
    `spec`, or uncompressed elements of `elem_bytes`. The codec reads `source_bytes` per shard value
    and writes the gathered values as `elem_bytes`; accumulate (qWD) adds them, reading the output too."""
    W = M * L
    logical = accounting.all_gather_bytes(shard, _elem(spec, elem_bytes), M, L)
    intra, inter = _ring_loads(logical, L, M)
    codec = 0.0
    if spec is not None:
        packed = spec.wire_nbytes(shard)
        codec = shard * source_bytes + packed + W * packed + W * shard * elem_bytes * (2 if accumulate else 1)
    return _total("all-gather", "ring", W - 1, intra, inter, codec, buckets, M, cluster, wl)


def reduce_scatter_cost(spec: QuantSpec | None, intra_spec: QuantSpec | None, numel: int, buckets: int,
                        M: int, L: int, cluster: Cluster, wl: Workload, *, elem_bytes: int) -> CollectiveCost:
    """Reduce-scatter of `buckets` buckets of `numel` values of `elem_bytes` each, into fp32 chunks.

    spec None: uncompressed ring. intra_spec None: one quantized all-to-all with `spec`. Both: two
    levels (`intra_spec` inside nodes, `spec` across); with one GPU per node only the inter hop
    exists, on one node only the intra hop (a single all-to-all with that hop's spec).
    """
    W = M * L
    chunk = accounting.chunk_numel(numel, W)
    if spec is None:
        logical = accounting.reduce_scatter_bytes(numel, elem_bytes, M, L)
        intra, inter = _ring_loads(logical, L, M)
        return _total("reduce-scatter", "ring", W - 1, intra, inter, 0.0, buckets, M, cluster, wl)
    if intra_spec is None or L == 1 or M == 1:
        one = intra_spec if (intra_spec is not None and M == 1) else spec
        logical = accounting.reduce_scatter_bytes(numel, one, M, L)
        packed = one.wire_nbytes(chunk)
        codec = numel * elem_bytes + W * packed + W * packed + chunk * 4
        return _total("reduce-scatter", "all-to-all", 1, logical["intra"], logical["inter"],
                      codec, buckets, M, cluster, wl)
    logical = accounting.reduce_scatter_two_level_bytes(numel, intra_spec, spec, M, L)
    hop1 = intra_spec.wire_nbytes(M * spec.padded_numel(chunk))
    hop2 = spec.wire_nbytes(chunk)
    quantize = numel * elem_bytes + L * hop1
    requantize = L * hop1 + M * hop2  # dequantize the L node chunks, sum, requantize M chunks
    decode = M * hop2 + chunk * 4
    return _total("reduce-scatter", "two-level", 2, logical["intra"], logical["inter"],
                  quantize + requantize + decode, buckets, M, cluster, wl)


def weight_gather_cost(comm: CommConfig, shard: int, buckets: int, M: int, L: int,
                       cluster: Cluster, wl: Workload) -> CollectiveCost:
    """The engine's weight all-gather: the fp32 master shard (qWD: minus the replica's) quantized,
    gathered into the replica in the weight dtype (qWD: added to it)."""
    qwd = comm.weights == "qwd"
    cost = all_gather_cost(comm.weight_spec, shard, buckets, M, L, cluster, wl, elem_bytes=wl.weight_bytes,
                           source_bytes=wl.master_bytes + (wl.weight_bytes if qwd else 0), accumulate=qwd)
    return replace(cost, name="weight all-gather")


def grad_reduce_cost(comm: CommConfig, numel: int, buckets: int, M: int, L: int,
                     cluster: Cluster, wl: Workload) -> CollectiveCost:
    """The engine's gradient reduce-scatter of `buckets` buckets of `numel` values each."""
    cost = reduce_scatter_cost(comm.grad_spec, comm.grad_intra_spec, numel, buckets, M, L, cluster, wl,
                               elem_bytes=wl.grad_bytes)
    return replace(cost, name="grad reduce-scatter")


def _total(name: str, algorithm: str, steps: int, intra: float, inter: float, codec: float,
           buckets: int, nodes: int, cluster: Cluster, wl: Workload) -> CollectiveCost:
    """Price one bucket's collective and scale it to all buckets of the step."""
    if not intra and not inter:
        return CollectiveCost(name, "none", 0, 0.0, 0.0, 0.0, 0.0, 0.0)
    slow = 1 / cluster.all_to_all_efficiency  # all-to-all bytes take this much longer than ring bytes
    if algorithm == "two-level":  # the hops (two all-to-alls) run one after the other
        wire = _wire_time(intra * slow, 0.0, 1, 0, cluster) + _wire_time(0.0, inter * slow, 0, 1, cluster)
    elif algorithm == "ring":  # NCCL's ring latency: W - M hops inside nodes, M - 1 across
        wire = _wire_time(intra, inter, steps - (nodes - 1), nodes - 1, cluster)
    else:  # all-to-all: every message posted at once, one latency of the slowest link used
        wire = _wire_time(intra * slow, inter * slow, int(not inter), int(bool(inter)), cluster)
    codec_s = codec / (wl.codec_tbps * 1e12)
    return CollectiveCost(name, algorithm, steps, intra * buckets, inter * buckets, codec * buckets,
                          wire * buckets, codec_s * buckets)


# ---- the step ----------------------------------------------------------------------------------
@dataclass
class StepEstimate:
    mode: str
    step_s: float
    compute_s: float
    exposed_s: float  # communication + codec time compute did not hide
    comm_s: float  # all communication + codec time, hidden or not
    codec_s: float
    inter_bytes: float  # per GPU per step
    intra_bytes: float
    tokens_per_s: float
    collectives: list[CollectiveCost] = field(default_factory=list)
    speedup: float = 1.0

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "collectives"}
        out["collectives"] = [c.__dict__ | {"seconds": c.seconds} for c in self.collectives]
        return out


def exposed_time(gather_s: float, reduce_s: float, buckets: int, forward_s: float,
                 backward_s: float, overlap: bool) -> float:
    """Communication left on the critical path.

    All-gathers run back to back from the start of forward and bucket i's forward waits for its
    gather; reduce-scatters start when their bucket's backward is done and queue behind each other.
    """
    if not overlap:
        return gather_s + reduce_s
    g, r = gather_s / buckets, reduce_s / buckets
    f, b = forward_s / buckets, backward_s / buckets
    comm_done = compute_done = 0.0
    for _ in range(buckets):
        comm_done += g
        compute_done = max(compute_done, comm_done) + f
    exposed = compute_done - forward_s
    comm_done = 0.0
    for i in range(buckets):
        comm_done = max(comm_done, (i + 1) * b) + r
    return exposed + comm_done - backward_s


def simulate_mode(mode: str, model_params: int, cluster: Cluster, wl: Workload) -> StepEstimate:
    """Estimate one step for preset `mode` (see CommConfig.preset)."""
    comm = CommConfig.preset(mode)
    M, L = dp_layout(cluster, wl.tp, wl.pp)
    W = M * L
    local = -(-model_params // (wl.tp * wl.pp))  # values one DP rank's replica holds
    buckets = max(1, -(-local // wl.bucket_numel))
    bucket = -(-local // buckets)
    align = W * comm.alignment  # buckets are padded so they split into W group-aligned shards
    bucket = -(-bucket // align) * align
    gather = weight_gather_cost(comm, bucket // W, buckets, M, L, cluster, wl)
    reduce = grad_reduce_cost(comm, bucket, buckets, M, L, cluster, wl)
    passes = wl.compute_s - wl.optimizer_s
    forward = passes * wl.forward_fraction / wl.grad_accum
    backward = passes * (1 - wl.forward_fraction) / wl.grad_accum
    codec = gather.codec_s + reduce.codec_s
    if wl.overlap:  # the wire time hides behind compute, the codec (on the compute stream) cannot
        exposed = codec + exposed_time(gather.wire_s, reduce.wire_s, buckets, forward, backward, True)
    else:
        exposed = gather.seconds + reduce.seconds
    step = wl.compute_s + exposed
    return StepEstimate(
        mode=mode, step_s=step, compute_s=wl.compute_s, exposed_s=exposed,
        comm_s=gather.seconds + reduce.seconds, codec_s=codec,
        inter_bytes=gather.inter_bytes + reduce.inter_bytes,
        intra_bytes=gather.intra_bytes + reduce.intra_bytes,
        tokens_per_s=wl.tokens_per_step / step if step > 0 else math.inf,
        collectives=[gather, reduce],
    )


def simulate(modes: list[str], model_params: int, cluster: Cluster, wl: Workload) -> list[StepEstimate]:
    """One estimate per mode, each with its speedup over `baseline` (always computed)."""
    if not modes:
        raise ValueError("modes must name at least one CommConfig preset")
    base = simulate_mode("baseline", model_params, cluster, wl)
    out = [base if m == "baseline" else simulate_mode(m, model_params, cluster, wl) for m in modes]
    for est in out:
        est.speedup = base.step_s / est.step_s if est.step_s > 0 else 1.0
    return out


def pipeline_bubble(pp: int, micro_batches: int) -> float:
    """Compute-time factor of a 1F1B pipeline: each stage idles (pp - 1) / micro_batches of a step."""
    return 1 + (pp - 1) / micro_batches


def compute_seconds(model: ModelShape, tokens_per_step: int, world: int, mfu: float, peak_tflops: float,
                    pp: int = 1, micro_batches: int = 1) -> float:
    """Compute time per step from FLOPs: flops_per_token * tokens / (world * mfu * peak), stretched
    by the pipeline bubble."""
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu!r}")
    if not peak_tflops > 0:
        raise ValueError(f"peak_tflops must be > 0, got {peak_tflops!r}")
    flops = model.flops_per_token() * tokens_per_step / world
    return flops / (mfu * peak_tflops * 1e12) * pipeline_bubble(pp, micro_batches)


def with_inter_gbps(cluster: Cluster, gbps: float) -> Cluster:
    return replace(cluster, inter_gbps=gbps)


# ---- SDP4Bit's published throughput table ------------------------------------------------------
@dataclass(frozen=True)
class Platform:
    """A cluster of the SDP4Bit speed test. Bandwidths other than the GPU count are not in the
    paper or its scripts; intra_gbps and peak_tflops are vendor figures for the GPU."""

    name: str
    nodes: int
    gpus_per_node: int
    intra_gbps: float  # NVLink per GPU per direction
    peak_tflops: float  # dense bf16


PLATFORMS: dict[str, Platform] = {
    "a100": Platform("16 nodes x 4 A100 (Slingshot 10)", 16, 4, 2400.0, 312.0),
    "h800": Platform("16 nodes x 8 H800 (InfiniBand)", 16, 8, 1600.0, 989.0),
}


@dataclass(frozen=True)
class PublishedRun:
    """One cell pair of SDP4Bit Table 2 (TFLOPs per GPU, Megatron's model-FLOPs count) with the
    parallel layout of its Table 8. Micro-batch 1, sequence 2048, no gradient accumulation."""

    model: str
    platform: str
    tp: int
    pp: int
    baseline_tflops: float
    sdp4bit_tflops: float
    speedup: float


SDP4BIT_TABLE2: tuple[PublishedRun, ...] = (
    PublishedRun("1.3b", "a100", 1, 1, 24.1, 57.6, 2.39),
    PublishedRun("2.7b", "a100", 1, 1, 24.0, 58.4, 2.43),
    PublishedRun("6.7b", "a100", 4, 1, 10.8, 37.1, 3.44),
    PublishedRun("13b", "a100", 4, 2, 9.7, 26.0, 2.68),
    PublishedRun("18b", "a100", 4, 2, 10.2, 29.8, 2.92),
    PublishedRun("1.3b", "h800", 1, 1, 69.1, 106.0, 1.53),
    PublishedRun("2.7b", "h800", 1, 1, 71.9, 116.9, 1.63),
    PublishedRun("6.7b", "h800", 4, 1, 26.2, 77.9, 2.97),
    PublishedRun("13b", "h800", 8, 1, 13.9, 53.5, 3.85),
    PublishedRun("18b", "h800", 8, 1, 14.5, 59.2, 4.08),
)


def published_setup(run: PublishedRun, inter_gbps: float, compute_s: float = 0.0,
                    codec_tbps: float = 1.0) -> tuple[int, Cluster, Workload]:
    """(params, cluster, workload) of a published run as Megatron ran it: no comm/compute overlap,
    bf16 weights all-gathered, gradients reduce-scattered in fp32."""
    p = PLATFORMS[run.platform]
    model = MODELS[run.model]
    cluster = Cluster(p.nodes, p.gpus_per_node, intra_gbps=p.intra_gbps, inter_gbps=inter_gbps)
    dp = cluster.world // (run.tp * run.pp)
    wl = Workload(compute_s=compute_s, tokens_per_step=dp * model.seq_len, tp=run.tp, pp=run.pp,
                  overlap=False, weight_bytes=2, grad_bytes=4, codec_tbps=codec_tbps)
    return model.params, cluster, wl


def published_step_s(run: PublishedRun, tflops: float) -> float:
    """Step time implied by a TFLOPs-per-GPU figure."""
    p = PLATFORMS[run.platform]
    model = MODELS[run.model]
    world = p.nodes * p.gpus_per_node
    tokens = world // (run.tp * run.pp) * model.seq_len
    return model.flops_per_token() * tokens / (world * tflops * 1e12)


def _comm_only(run: PublishedRun, inter_gbps: float, codec_tbps: float) -> tuple[float, float]:
    """(baseline, sdp4bit) communication + codec seconds per step at this bandwidth."""
    params, cluster, wl = published_setup(run, inter_gbps, 0.0, codec_tbps)
    base, sdp = simulate(["baseline", "sdp4bit"], params, cluster, wl)
    return base.step_s, sdp.step_s


def implied_bandwidth(run: PublishedRun, codec_tbps: float = 1.0) -> dict[str, float]:
    """Solve the model backwards: the per-GPU inter-node Gb/s and the compute time that make both
    published step times (baseline and SDP4Bit) come out exactly."""
    t_base = published_step_s(run, run.baseline_tflops)
    t_sdp = published_step_s(run, run.sdp4bit_tflops)
    lo, hi = 0.1, 1e6  # Gb/s; the saving (baseline - sdp4bit comm) falls as bandwidth grows
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        comm_base, comm_sdp = _comm_only(run, mid, codec_tbps)
        lo, hi = (mid, hi) if comm_base - comm_sdp > t_base - t_sdp else (lo, mid)
    gbps = math.sqrt(lo * hi)
    comm_base, comm_sdp = _comm_only(run, gbps, codec_tbps)
    compute = t_base - comm_base
    p = PLATFORMS[run.platform]
    model = MODELS[run.model]
    # TFLOPs of a busy GPU: the pipeline bubble is idle time, not slow compute.
    flops = model.flops_per_token() * published_setup(run, gbps)[2].tokens_per_step * pipeline_bubble(run.pp, 1)
    return {"inter_gbps_per_gpu": gbps, "compute_s": compute,
            "compute_tflops": flops / (p.nodes * p.gpus_per_node * compute) / 1e12 if compute > 0 else math.nan,
            "baseline_step_s": t_base, "sdp4bit_step_s": t_sdp}


def fit_platform(runs: list[PublishedRun], codec_tbps: float = 1.0) -> dict[str, float]:
    """Least squares (log step time) over all runs of one platform for two numbers: one per-GPU
    inter-node bandwidth and one compute rate (TFLOPs per busy GPU, all the non-DP work; the
    pipeline bubble of one micro-batch per step comes on top)."""
    platform = PLATFORMS[runs[0].platform]
    world = platform.nodes * platform.gpus_per_node
    targets = [(published_step_s(r, r.baseline_tflops), published_step_s(r, r.sdp4bit_tflops)) for r in runs]
    work = [MODELS[r.model].flops_per_token() * published_setup(r, 1.0)[2].tokens_per_step / world
            * pipeline_bubble(r.pp, 1) for r in runs]
    best = (math.inf, 0.0, 0.0)
    for i in range(161):
        gbps = 5.0 * 10 ** (i / 64)  # 5 .. 1600 Gb/s
        comms = [_comm_only(r, gbps, codec_tbps) for r in runs]
        for j in range(161):
            tflops = platform.peak_tflops * 10 ** (-2 * j / 160)  # peak .. peak / 100
            err = 0.0
            for w, (cb, cs), (tb, ts) in zip(work, comms, targets):
                compute = w / (tflops * 1e12)
                err += math.log((compute + cb) / tb) ** 2 + math.log((compute + cs) / ts) ** 2
            best = min(best, (err, gbps, tflops))
    err, gbps, tflops = best
    return {"inter_gbps_per_gpu": gbps, "compute_tflops": tflops,
            "rms_log_error": math.sqrt(err / (2 * len(runs)))}


def predict_run(run: PublishedRun, inter_gbps: float, compute_tflops: float,
                codec_tbps: float = 1.0) -> dict[str, float]:
    """Baseline and SDP4Bit step time and TFLOPs for a published run at the given parameters."""
    params, cluster, wl = published_setup(run, inter_gbps, 0.0, codec_tbps)
    flops_per_gpu = MODELS[run.model].flops_per_token() * wl.tokens_per_step / cluster.world
    wl = replace(wl, compute_s=flops_per_gpu / (compute_tflops * 1e12) * pipeline_bubble(run.pp, 1))
    base, sdp = simulate(["baseline", "sdp4bit"], params, cluster, wl)
    return {"baseline_step_s": base.step_s, "sdp4bit_step_s": sdp.step_s,
            "baseline_tflops": flops_per_gpu / base.step_s / 1e12,
            "sdp4bit_tflops": flops_per_gpu / sdp.step_s / 1e12, "speedup": sdp.speedup,
            "baseline_inter_MB": base.inter_bytes / 1e6, "sdp4bit_inter_MB": sdp.inter_bytes / 1e6,
            "compute_s": wl.compute_s}
