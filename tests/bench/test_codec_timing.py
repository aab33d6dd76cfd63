"""Every codec call on the training path happens inside a timed codec step, and each step makes no
more device work than its codec calls: one engine step per preset on gloo ranks (2 emulated nodes
x 2, and one node of 2), counted by a timer installed through halfbyte.comm.timing.

What it counts, per bucket and step (the table in docs/kernels.md):
  codec calls  outermost calls into the codec backend (the reference here; on a GPU each is one
               fused Triton launch for the presets' specs)
  layout ops   other kernel-launching torch ops inside the codec steps (copies, cats, pads): work a
               GPU would launch besides the codec kernels; the engine's buckets need none
"""

from __future__ import annotations

import collections
import time
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from halfbyte.comm import build_topology, spawn, timing
from halfbyte.comm.config import CommConfig
from halfbyte.engine import AdamWConfig, ShardedDataParallel
from halfbyte.quant import reference
from halfbyte.train.model import build_model

PRESETS = list(CommConfig.preset_names())
CODEC_FNS = ("quantize", "dequantize", "quantize_messages", "dequantize_messages", "dequantize_sum",
             "reduce_requantize", "reduce_requantize_messages")
VOCAB, BUCKET_NUMEL = 256, 150_000

# Per bucket and step: (codec calls, layout ops). Weights: encode_shard + decode_gathered (qWD and
# direct alike: the subtraction is fused). Gradients, two levels: encode_two_level, middle_hop,
# decode_sum; one level: encode_chunks, decode_sum.
EXPECTED = {
    "2x2": {"baseline": (0, 0), "zeropp": (5, 0), "sdp4bit": (5, 0), "qw4": (2, 0), "qwd": (2, 0),
            "tlq": (3, 0), "tlq-hs": (3, 0)},
    "1x2": {"baseline": (0, 0), "zeropp": (4, 0), "sdp4bit": (4, 0), "qw4": (2, 0), "qwd": (2, 0),
            "tlq": (2, 0), "tlq-hs": (2, 0)},
}


def expected_steps(comm: CommConfig) -> set[str]:
    """The outermost codec steps a step of the engine runs with `comm`."""
    steps = set() if comm.weights == "full" else {"encode_shard", "decode_gathered"}
    if comm.grads == "two-level":
        steps |= {"encode_two_level", "middle_hop", "decode_sum"}
    elif comm.grads == "one-level":
        steps |= {"encode_chunks", "decode_sum"}
    return steps


def _is_kernel(func: Any) -> bool:
    """A torch op that launches device work: not a view, not a bare allocation."""
    if func.overloadpacket.__name__ in ("empty", "empty_like", "empty_strided", "new_empty", "_unsafe_view"):
        return False  # allocations, and a view whose schema does not say so
    alias = func._schema.returns[0].alias_info if func._schema.returns else None
    return alias is None or alias.is_write  # views alias their input without writing it


class _LayoutOps(TorchDispatchMode):
    """Counts kernel-launching torch ops while no codec call is running."""

    def __init__(self, counter: "CountingTimer") -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.counter.in_codec_call and _is_kernel(func):
            self.counter.layout_ops[self.counter.step] += 1
            self.counter.layout_names[func.__name__] += 1
        return func(*args, **(kwargs or {}))


class CountingTimer:
    """A timing.Timer that times and counts the outermost codec steps and watches codec calls."""

    def __init__(self) -> None:
        self.depth = 0
        self.step = ""
        self.seconds: collections.Counter[str] = collections.Counter()
        self.steps: collections.Counter[str] = collections.Counter()
        self.codec_calls: collections.Counter[str] = collections.Counter()
        self.layout_ops: collections.Counter[str] = collections.Counter()
        self.layout_names: collections.Counter[str] = collections.Counter()
        self.untimed_calls: list[str] = []
        self.in_codec_call = False
        self._mode: _LayoutOps | None = None

    def begin(self, kind: str, name: str) -> Any:
        if kind != "codec":
            return None
        self.depth += 1
        if self.depth > 1:
            return "nested"
        self.step = name
        self._mode = _LayoutOps(self)
        self._mode.__enter__()
        return name, time.perf_counter()

    def end(self, token: Any) -> None:
        if token is None:
            return
        self.depth -= 1
        if token == "nested":
            return
        name, start = token
        self._mode.__exit__(None, None, None)
        self._mode = None
        self.seconds[name] += time.perf_counter() - start
        self.steps[name] += 1

    def spy(self, name: str, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if self.in_codec_call:  # the reference's own nested calls
                return fn(*args, **kwargs)
            if self.depth == 0:
                self.untimed_calls.append(name)
            self.codec_calls[self.step if self.depth else "<untimed>"] += 1
            self.in_codec_call = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.in_codec_call = False
        return call


def _step(model: torch.nn.Module, engine: ShardedDataParallel, tokens: torch.Tensor) -> None:
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    engine.step()
    engine.zero_grad()


def _count_worker(gpus_per_node: int) -> dict:
    topo = build_topology(gpus_per_node)
    originals = {name: getattr(reference, name) for name in CODEC_FNS}
    out = {}
    try:
        for preset in PRESETS:
            comm, _ = CommConfig.preset(preset).for_nodes(topo.nodes)
            torch.manual_seed(0)
            model = build_model("tiny", VOCAB)
            engine = ShardedDataParallel(model, topo, optim=AdamWConfig(), comm=comm,
                                         bucket_numel=BUCKET_NUMEL, seed=0)
            tokens = torch.randint(VOCAB, (2, 17), generator=torch.Generator().manual_seed(topo.rank))
            _step(model, engine, tokens)  # the first step's weight all-gather is waited in it too
            counter = CountingTimer()
            for name, fn in originals.items():
                setattr(reference, name, counter.spy(name, fn))
            with timing.installed(counter):
                _step(model, engine, tokens)
            for name, fn in originals.items():
                setattr(reference, name, fn)
            out[preset] = {"buckets": len(engine.buckets), "seconds": dict(counter.seconds),
                           "steps": dict(counter.steps), "codec_calls": dict(counter.codec_calls),
                           "layout_ops": dict(counter.layout_ops), "layout_names": dict(counter.layout_names),
                           "untimed": counter.untimed_calls}
    finally:
        for name, fn in originals.items():
            setattr(reference, name, fn)
    return out


def launch_table(nprocs: int, gpus_per_node: int) -> dict[str, dict]:
    """Per preset, rank 0's counts of one training step (see the module docstring)."""
    return spawn(_count_worker, nprocs, gpus_per_node, timeout_s=240)[0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout, nprocs, gpus_per_node", [("2x2", 4, 2), ("1x2", 2, 2)])
def test_every_codec_call_is_inside_a_timed_step(layout, nprocs, gpus_per_node):
    table = launch_table(nprocs, gpus_per_node)
    for preset, got in table.items():
        buckets = got["buckets"]
        assert buckets >= 2, "the test needs several buckets"
        assert got["untimed"] == [], f"{preset}: codec calls outside any timed codec step: {got['untimed']}"
        calls, layout_ops = EXPECTED[layout][preset]
        assert sum(got["codec_calls"].values()) == calls * buckets, (preset, got["codec_calls"])
        assert sum(got["layout_ops"].values()) == layout_ops * buckets, (preset, got["layout_names"])
        steps = expected_steps(CommConfig.preset(preset).for_nodes(nprocs // gpus_per_node)[0])
        assert set(got["steps"]) == steps, (preset, got["steps"])
        assert all(got["steps"][s] == buckets and got["seconds"][s] > 0 for s in steps), (preset, got)
        print(f"{layout} {preset}: {calls} codec calls and {layout_ops} layout ops per bucket "
              f"({buckets} buckets): {got['codec_calls']}")
