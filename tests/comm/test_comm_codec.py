"""Pure parts of the comm layer (one process): wire layout helpers, seeds, byte accounting, stats."""

from __future__ import annotations

import torch

from halfbyte import comm, quant
from halfbyte.comm import CommStats, chunk_numel, rank_seed
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
