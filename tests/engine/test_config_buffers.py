"""Single-process engine tests: CommConfig validation and presets, bucket layout, seeds, and
configuration errors raised before any communication."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from halfbyte.comm.accounting import CommStats
from halfbyte.engine import AdamWConfig, CommConfig, ShardedDataParallel
from halfbyte.engine.world import ProcessGroupWorld
from halfbyte.engine.buffers import build_buckets, plan_buckets
from halfbyte.engine.seeds import GRADS, WEIGHTS, collective_seed
from halfbyte.quant import QuantSpec
from toys import Tied

INT4 = QuantSpec(bits=4, group_size=128)


def test_presets_match_the_published_settings():
    sdp = CommConfig.preset("sdp4bit")
    assert (sdp.weights, sdp.grads) == ("qwd", "two-level")
    assert sdp.weight_spec == QuantSpec(bits=4, group_size=2048, symmetric=True, rounding="stochastic")
    assert sdp.grad_intra_spec == QuantSpec(bits=8, group_size=128, rounding="stochastic", hadamard=32)
    assert sdp.grad_spec == QuantSpec(bits=4, group_size=128, rounding="stochastic", hadamard=32)
    z = CommConfig.preset("zeropp")
    assert z.weights == "direct" and z.weight_spec == QuantSpec(bits=8, group_size=2048)
    assert z.grad_intra_spec == z.grad_spec == QuantSpec(bits=4, group_size=128)
    assert CommConfig.preset("baseline") == CommConfig()
    assert CommConfig.preset("qw4").weights == "direct" and CommConfig.preset("qw4").grads == "full"
    assert CommConfig.preset("qwd").weights == "qwd" and CommConfig.preset("qwd").grads == "full"
    assert CommConfig.preset("tlq").grad_spec.hadamard == 0
    assert CommConfig.preset("tlq-hs").grad_spec.hadamard == 32
    assert CommConfig.preset("tlq").weights == CommConfig.preset("tlq-hs").weights == "full"
    assert sdp.alignment == 2048 and CommConfig.preset("tlq").alignment == 128
    assert CommConfig.preset("baseline").alignment == 1
    assert "qwd int4/g2048/sr" in sdp.describe() and "int8/g128/sr/H32" in sdp.describe()
    with pytest.raises(ValueError, match="valid presets: baseline, zeropp, sdp4bit, qw4, qwd, tlq, tlq-hs"):
        CommConfig.preset("sdp8bit")


@pytest.mark.parametrize("kwargs, message", [
    (dict(weights="int4"), "CommConfig.weights must be one of"),
    (dict(grads="three-level"), "CommConfig.grads must be one of"),
    (dict(weights="qwd"), "needs a weight_spec"),
    (dict(weights="direct"), "needs a weight_spec"),
    (dict(weight_spec=INT4), "only used with weights='direct' or 'qwd'"),
    (dict(grads="one-level"), "needs a grad_spec"),
    (dict(grads="full", grad_spec=INT4), "only used with grads="),
    (dict(grads="one-level", grad_spec=INT4, grad_intra_spec=INT4), "only used with grads='two-level'"),
    (dict(grads="two-level", grad_spec=INT4), "needs a grad_intra_spec"),
    (dict(grads="two-level", grad_spec=QuantSpec(hadamard=32), grad_intra_spec=QuantSpec(bits=8, hadamard=16)),
     r"grad_intra_spec.hadamard \(16\) must equal grad_spec.hadamard \(32\)"),
    (dict(weights="direct", weight_spec="int4"), "must be a QuantSpec"),
    # 2 bits are for the outer exchange (with error feedback) only: every hop here refuses them
    (dict(weights="qwd", weight_spec=QuantSpec(bits=2, group_size=2048)),
     r"CommConfig.weight_spec.bits must be 4 or 8, got 2"),
    (dict(grads="one-level", grad_spec=QuantSpec(bits=2)), r"CommConfig.grad_spec.bits must be 4 or 8, got 2"),
    (dict(grads="two-level", grad_spec=INT4, grad_intra_spec=QuantSpec(bits=2)),
     r"CommConfig.grad_intra_spec.bits must be 4 or 8, got 2"),
])
def test_bad_comm_configs_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CommConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(betas=(0.9, 1.0)), dict(eps=0.0),
                                    dict(weight_decay=-0.1)])
def test_bad_adamw_configs_raise(kwargs):
    with pytest.raises(ValueError, match="AdamWConfig"):
        AdamWConfig(**kwargs)


def _no_network_topology(nodes: int, gpus_per_node: int) -> ProcessGroupWorld:
    """A world of real ranks without any process group: any collective the engine tried would fail
    with a different error than the ones these tests expect."""
    return ProcessGroupWorld(SimpleNamespace(rank=0, world_size=nodes * gpus_per_node, nodes=nodes,
                                             gpus_per_node=gpus_per_node, device=torch.device("cpu"),
                                             world_group=None, stats=CommStats()))


@pytest.mark.parametrize("preset", ["zeropp", "sdp4bit", "tlq", "tlq-hs"])
def test_two_level_on_one_node_raises_before_communicating(preset):
    model = nn.Linear(4, 4)
    before = model.weight.data_ptr()
    with pytest.raises(ValueError, match=r"needs at least 2 nodes.*CommConfig.for_nodes\(1\)"):
        ShardedDataParallel(model, _no_network_topology(1, 4), comm=CommConfig.preset(preset))
    assert model.weight.data_ptr() == before  # not even moved into buckets


def test_model_on_another_device_raises_before_communicating():
    topo = _no_network_topology(2, 2)
    topo.device = torch.device("meta")  # where the world's collectives would run
    with pytest.raises(ValueError, match=r"model's parameters are on \['cpu'\].*move the model"):
        ShardedDataParallel(nn.Linear(4, 4), topo, comm=CommConfig.preset("baseline"))


def test_bad_grad_clip_raises_before_communicating():
    with pytest.raises(ValueError, match="grad_clip must be > 0 or None"):
        ShardedDataParallel(nn.Linear(4, 4), _no_network_topology(1, 2),
                            comm=CommConfig.preset("baseline"), grad_clip=0.0)


def test_plan_buckets_closes_at_threshold():
    assert plan_buckets([5, 5, 5, 20, 1], 10) == [[0, 1], [2, 3], [4]]
    assert plan_buckets([50], 10) == [[0]]
    with pytest.raises(ValueError, match="bucket_numel"):
        plan_buckets([1], 0)


def test_buckets_are_views_aligned_shards_in_reverse_order():
    model = Tied()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    world, align = 4, 128
    buckets = build_buckets(model, bucket_numel=40, world_size=world, alignment=align)

    names = [n for b in buckets for n in b.names]
    assert names == ["mid.bias", "mid.weight", "emb.weight"]  # reverse registration, tied once
    assert [b.numel for b in buckets] == [42, 60]
    for b in buckets:
        assert b.shard_numel % align == 0 and b.padded_numel == world * b.shard_numel >= b.numel
        assert b.replica.numel() == b.grad.numel() == b.padded_numel
        assert sum(b.valid_in_shard(r) for r in range(world)) == b.numel
        for i, (n, p) in enumerate(zip(b.names, b.params)):
            assert p.data_ptr() == b.replica.data_ptr() + b.offsets[i] * p.element_size()
            assert p.grad.data_ptr() == b.grad.data_ptr() + b.offsets[i] * p.element_size()
            assert torch.equal(p, original[n])

    # autograd accumulates straight into the flat gradient buffers
    model(torch.tensor([1, 2, 3])).sum().backward()
    model(torch.tensor([4])).sum().backward()
    flat_grads = torch.cat([b.grad[: b.numel] for b in buckets])
    assert flat_grads.abs().sum() > 0
    assert torch.equal(flat_grads, torch.cat([p.grad.reshape(-1) for b in buckets for p in b.params]))


def test_buckets_hold_one_group_and_one_dtype_each_and_complete_in_backward_order():
    """fp32 norms in a bf16 model, two parameter groups: every bucket is one (group, dtype), keeps
    its params' dtype, and buckets are ordered by their last parameter in backward (reverse
    registration) order, so launching in index order never waits on a bucket still filling."""
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.LayerNorm(8))
    model[0].bfloat16()
    model[2].bfloat16()
    no_decay = {model[0].bias, model[1].weight, model[1].bias, model[2].bias, model[3].weight, model[3].bias}
    groups = {p: int(p in no_decay) for p in model.parameters()}
    buckets = build_buckets(model, bucket_numel=20, world_size=2, alignment=1, groups=groups)
    backward = [n for n, _ in reversed(list(model.named_parameters()))]
    for b in buckets:
        assert {p.dtype for p in b.params} == {b.replica.dtype} == {b.grad.dtype}
        assert {groups[p] for p in b.params} == {b.group}
    assert [[backward.index(n) for n in b.names][-1] for b in buckets] == sorted(
        [backward.index(n) for n in b.names][-1] for b in buckets)
    assert sorted(n for b in buckets for n in b.names) == sorted(backward)
    assert [(b.names, b.group, b.replica.dtype) for b in buckets] == [
        (["2.weight"], 0, torch.bfloat16),  # 64 values >= 20: full at once
        (["3.bias", "3.weight", "1.bias"], 1, torch.float32),  # full with its third parameter
        (["1.weight"], 1, torch.float32),  # the rest of each key closes at the end
        (["2.bias", "0.bias"], 1, torch.bfloat16),
        (["0.weight"], 0, torch.bfloat16)]
    assert plan_buckets([5, 5, 5], 10, keys=["a", "b", "a"]) == [[1], [0, 2]]  # by last member


def test_float64_parameters_are_refused_before_communicating():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).to(torch.float64))
    with pytest.raises(ValueError, match=r"parameter 1.weight is torch.float64.*fp32 and bf16"):
        ShardedDataParallel(model, _no_network_topology(1, 2), comm=CommConfig.preset("baseline"))


def test_collective_seeds_are_deterministic_and_distinct():
    seen = {collective_seed(s, step, b, stream)
            for s in (0, 1) for step in range(20) for b in range(5) for stream in (WEIGHTS, GRADS)}
    assert len(seen) == 2 * 20 * 5 * 2
    assert collective_seed(3, 7, 1, GRADS) == collective_seed(3, 7, 1, GRADS)
    assert all(0 <= s < 2**62 for s in seen)


def test_single_node_rule_runs_two_level_grads_one_level_with_the_inter_codec():
    sdp4bit = CommConfig.preset("sdp4bit")
    same, note = sdp4bit.for_nodes(2)
    assert same is sdp4bit and note is None
    one, note = sdp4bit.for_nodes(1)
    assert (one.grads, one.grad_spec, one.grad_intra_spec) == ("one-level", sdp4bit.grad_spec, None)
    assert one.weights == sdp4bit.weights and "1 node" in note
    qwd = CommConfig.preset("qwd")
    assert qwd.for_nodes(1) == (qwd, None)
