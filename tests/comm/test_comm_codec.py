"""Pure parts of the comm layer (one process): wire layout helpers, seeds, byte accounting, stats,
the timing hooks of the codec steps."""

from __future__ import annotations

import torch

from halfbyte import comm, quant
from halfbyte.comm import CommStats, chunk_numel, rank_seed, timing
from halfbyte.quant import to_message_major, to_section_major
from halfbyte.quant import QuantSpec


def test_message_major_rows_are_standalone_wire_buffers():
    spec = QuantSpec(4, group_size=64, symmetric=False)
    x = torch.randn(3, 128)
    rows = comm.pack_messages(x, spec, seed=None)
    assert rows.shape == (3, spec.wire_nbytes(128))
    for i in range(3):
        alone = quant.quantize(x[i], spec).data
        assert torch.equal(rows[i], alone)
    assert torch.equal(to_message_major(to_section_major(rows, spec, 128), spec, 3, 128), rows)


def test_split_chunks_pads_like_reduce_scatter_tensor():
    x = torch.arange(10.0)
    chunks = comm.split_chunks(x, 4, 8)
    assert chunk_numel(10, 4) == 3
    assert chunks.shape == (4, 8)
    assert torch.equal(chunks[:, :3].reshape(-1)[:10], x)
    assert chunks[3, 1:].abs().sum() == 0 and chunks[:, 3:].abs().sum() == 0


def test_rank_seeds_are_deterministic_and_distinct():
    seeds = {rank_seed(5, r, hop) for r in range(64) for hop in (1, 2, 3, 4)}
    assert len(seeds) == 256 and all(0 <= s < 2**62 for s in seeds)
    assert rank_seed(5, 3, 1) == rank_seed(5, 3, 1) != rank_seed(6, 3, 1)
    assert rank_seed(None, 0, 1) is None


def test_two_level_inter_bytes_match_design_formula():
    spec8, spec4 = QuantSpec(8, hadamard=32), QuantSpec(4, hadamard=32)
    M, L, N = 4, 8, 2**24
    b = comm.reduce_scatter_two_level_bytes(N, spec8, spec4, M, L)
    assert b["inter"] == N // L * (M - 1) // M * spec4.bits_per_value / 8  # N/L * (M-1)/M * wire bits
    assert b["intra"] == (L - 1) * N // L * spec8.bits_per_value / 8
    one = comm.reduce_scatter_bytes(N, spec4, M, L)
    assert one["inter"] == L * b["inter"]  # the point of two levels: L times less inter-node traffic
    assert comm.reduce_scatter_two_level_bytes(N, spec8, spec4, M, 1)["intra"] == 0
    assert comm.all_gather_bytes(1000, 2, 2, 2) == {"intra": 2000, "inter": 4000}


def test_comm_stats_totals_and_summary():
    stats = CommStats()
    stats.record("all_gather", {"intra": 10, "inter": 20}, {"intra": 40, "inter": 80})
    stats.record("all_gather", {"intra": 1, "inter": 2})
    stats.record("reduce_scatter", {"inter": 5})
    assert stats.totals() == {"intra": 11, "inter": 27}
    assert stats.by_op()["all_gather"] == {"intra": 11, "inter": 22, "baseline": 123, "calls": 2}
    summary = stats.summary()
    assert summary["calls"] == 3 and abs(summary["saved_MB"] - (128 - 38) / 1e6) < 1e-12
    stats.reset()
    assert stats.totals() == {"intra": 0, "inter": 0} and stats.by_op() == {}


class _Log:
    """A timing.Timer that records what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def begin(self, kind: str, name: str) -> str:
        self.events.append(("begin", kind, name))
        return name

    def end(self, token: str) -> None:
        self.events.append(("end", token))


def test_timing_regions_reach_the_timer_installed_when_they_began():
    outer, inner = _Log(), _Log()
    with timing.region("codec", "encode_chunks"):  # nothing installed: a no-op
        pass
    with timing.installed(outer):
        with timing.region("codec", "encode_chunks"):
            with timing.installed(inner):
                with timing.region("wait", "comm"):
                    pass
    with timing.region("codec", "decode_sum"):  # uninstalled again
        pass
    assert outer.events == [("begin", "codec", "encode_chunks"), ("end", "encode_chunks")]
    assert inner.events == [("begin", "wait", "comm"), ("end", "comm")]


def test_every_codec_step_reports_itself():
    """Each name in timing.CODEC_STEPS is a function of the collectives whose call is one region of
    that name (the outermost), so a profiler sees the step whoever calls it and however imported."""
    spec, intra, inter = QuantSpec(4), QuantSpec(8, hadamard=32), QuantSpec(4, hadamard=32)
    full, W, M, L = torch.randn(4 * 256), 4, 2, 2
    sends = comm.encode_chunks(full, spec, W, None)
    cp = inter.padded_numel(chunk_numel(full.numel(), W))
    first = comm.encode_two_level(full, intra, inter, M, L, None)
    gathered = torch.stack([comm.encode_shard(full[:256], spec, None)] * 2)
    calls = {
        "pack_messages": lambda: comm.pack_messages(full.view(4, 256), spec, seed=None),
        "encode_chunks": lambda: comm.encode_chunks(full, spec, W, None),
        "decode_chunks": lambda: comm.decode_chunks(sends, spec, full.numel()),
        "decode_sum": lambda: comm.decode_sum(sends, spec, 256, W),
        "encode_two_level": lambda: comm.encode_two_level(full, intra, inter, M, L, None),
        "middle_hop": lambda: comm.middle_hop(first, intra, inter, M, cp, None),
        "encode_shard": lambda: comm.encode_shard(full[:256], spec, None),
        "decode_gathered": lambda: comm.decode_gathered(gathered, spec, 256, torch.empty(512)),
    }
    assert set(calls) == set(timing.CODEC_STEPS)
    for name, call in calls.items():
        log = _Log()
        with timing.installed(log):
            call()
        assert log.events[0] == ("begin", "codec", name) and log.events[-1] == ("end", name), log.events


def test_a_handle_reports_its_first_wait():
    log = _Log()
    received = comm.encode_chunks(torch.ones(256), QuantSpec(4), 1, None)
    handle = comm.CommHandle(None, lambda: comm.decode_sum(received, QuantSpec(4), 256, 1))
    with timing.installed(log):
        result = handle.wait()
        assert handle.wait() is result  # done: the second wait neither waits nor reports
    assert [e[:2] for e in log.events] == [("begin", "wait"), ("begin", "codec"), ("end", "decode_sum"), ("end", "comm")]
