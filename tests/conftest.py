"""Suite-wide options. `--shard I/K` runs every K-th test starting at the I-th (collection order), so
a machine whose calls are shorter than the suite (the GPU machine: 10 minutes a call) runs it in K
calls that together run every test once (scripts/gpu_tests.sh, SHARD=I/K)."""

from __future__ import annotations

import argparse

import pytest


def parse_shard(text: str) -> tuple[int, int]:
    parts = text.split("/")
    if len(parts) == 2 and all(p.isdigit() for p in parts) and 1 <= int(parts[0]) <= int(parts[1]):
        return int(parts[0]), int(parts[1])
    raise argparse.ArgumentTypeError(f"expected I/K with 1 <= I <= K, got '{text}'")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--shard", type=parse_shard, default=None, metavar="I/K",
                     help="run only the I-th of K round-robin parts of the collected tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    shard = config.getoption("shard")
    if shard is None:
        return
    index, count = shard
    # round robin, not contiguous blocks: a file's tests (often of like cost) spread over the shards
    keep = items[index - 1::count]
    config.hook.pytest_deselected(items=[item for n, item in enumerate(items) if n % count != index - 1])
    items[:] = keep
