"""Bytes on the wire: what one rank sends per link class, and a running tally (CommStats).

Convention: a rank "sends" each chunk or shard addressed to another rank exactly once (the logical
volume of the collective, independent of the ring/tree algorithm the backend picks). Peers on the
same node are "intra", all others "inter". Ranks are laid out r = node * L + local_rank.

The pure functions below are the numbers the collectives record from their actual buffers (a test
checks they agree), so the cost model can use them without running anything. `elem` is a QuantSpec
(compressed) or the bytes of one element of the uncompressed dtype.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from halfbyte.quant import QuantSpec

LINKS = ("intra", "inter")


def chunk_numel(numel: int, world: int) -> int:
    """Values of each of the W chunks of a reduce-scatter of `numel` values: ceil(numel / W)."""
    return -(-numel // world)


def message_nbytes(numel: int, elem: QuantSpec | int) -> int:
    """Bytes of one message of `numel` values: packed wire bytes, or numel * element bytes."""
    return elem.wire_nbytes(numel) if isinstance(elem, QuantSpec) else numel * elem


def _per_peer(nbytes: int, nodes: int, gpus_per_node: int) -> dict[str, int]:
    # One message to each of the L-1 node peers and to each of the (M-1)*L ranks on other nodes.
    return {"intra": (gpus_per_node - 1) * nbytes, "inter": (nodes - 1) * gpus_per_node * nbytes}


def all_gather_bytes(shard_numel: int, elem: QuantSpec | int, nodes: int, gpus_per_node: int) -> dict[str, int]:
    """All-gather of one `shard_numel`-value shard per rank: the shard goes to every other rank."""
    return _per_peer(message_nbytes(shard_numel, elem), nodes, gpus_per_node)


def reduce_scatter_bytes(numel: int, elem: QuantSpec | int, nodes: int, gpus_per_node: int) -> dict[str, int]:
    """One-level reduce-scatter of `numel` values: chunk r of ceil(N/W) values goes to rank r."""
    chunk = chunk_numel(numel, nodes * gpus_per_node)
    return _per_peer(message_nbytes(chunk, elem), nodes, gpus_per_node)


def reduce_scatter_two_level_bytes(numel: int, intra_spec: QuantSpec, inter_spec: QuantSpec,
                                   nodes: int, gpus_per_node: int) -> dict[str, int]:
    """Two-level reduce-scatter: each node peer gets the M chunks it owns on every node (intra_spec,
    one message), then each other node gets its one node-summed chunk (inter_spec).

    Inter bytes = (M-1) * wire(ceil(N/W)) ~= N/L * (M-1)/M * inter_spec.bits_per_value / 8.
    With L == 1 there is no intra hop.
    """
    # Chunks travel padded to whole inter_spec groups, so the node sum splits into per-node chunks.
    chunk = inter_spec.padded_numel(chunk_numel(numel, nodes * gpus_per_node))
    intra = (gpus_per_node - 1) * intra_spec.wire_nbytes(nodes * chunk)
    return {"intra": intra, "inter": (nodes - 1) * inter_spec.wire_nbytes(chunk)}


@dataclass
class CommStats:
    """Running tally of bytes this rank sent, per collective name and link class.

    `baseline` is what the same call would have sent uncompressed in its input dtype, so that logs
    can report the traffic saved.
    """

    _bytes: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: dict.fromkeys(LINKS, 0)))
    _baseline: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def record(self, op: str, sent: dict[str, int], baseline: dict[str, int] | None = None,
               calls: int = 1) -> None:
        """Add `calls` calls of `op` that sent `sent` bytes per link class together (`baseline`: what
        they would have sent uncompressed; default `sent`)."""
        unknown = set(sent) - set(LINKS)
        if unknown:
            raise ValueError(f"CommStats.record: link classes must be {LINKS}, got {sorted(unknown)}")
        for link, n in sent.items():
            self._bytes[op][link] += int(n)
        self._baseline[op] += int(sum((baseline or sent).values()))
        self._calls[op] += calls

    def totals(self) -> dict[str, int]:
        """Bytes sent per link class over all ops."""
        return {link: sum(b[link] for b in self._bytes.values()) for link in LINKS}

    def by_op(self) -> dict[str, dict[str, int]]:
        """{op: {"intra", "inter", "baseline", "calls"}}."""
        return {op: {**b, "baseline": self._baseline[op], "calls": self._calls[op]}
                for op, b in self._bytes.items()}

    def reset(self) -> None:
        self._bytes.clear()
        self._baseline.clear()
        self._calls.clear()

    def summary(self) -> dict[str, float]:
        """Flat numbers for logs: MB sent per link class, uncompressed-equivalent MB, MB saved."""
        totals = self.totals()
        sent = sum(totals.values())
        baseline = sum(self._baseline.values())
        return {
            "intra_MB": totals["intra"] / 1e6,
            "inter_MB": totals["inter"] / 1e6,
            "sent_MB": sent / 1e6,
            "baseline_MB": baseline / 1e6,
            "saved_MB": (baseline - sent) / 1e6,
            "calls": sum(self._calls.values()),
        }
