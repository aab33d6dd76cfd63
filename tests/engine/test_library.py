"""The engine as a PyTorch user drops it in (issue 18): parameter groups and an LR scheduler as with
torch.optim, clip_grad_norm_, torch's state dicts, mixed parameter dtypes, buffers, safetensors, HF
models from a config, and what used to fail silently (loading weights after wrapping, a change of
requires_grad, torch's clip_grad_norm_ on the model, drifting BatchNorm statistics).

One spawned job per world size (2 ranks as 2 nodes x 1, 4 ranks as 2 nodes x 2) runs every check
(process start-up dominates on 2 cores); each test below asserts one of them on both. Worker bodies
are module-level functions of this file, imported by name in the spawned ranks.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR

from halfbyte.comm import build_topology, spawn
from halfbyte.engine import AdamWConfig, CommConfig, ProcessGroupWorld, ShardedDataParallel, VirtualWorld
from halfbyte.engine.optim import adamw_
from halfbyte.train.model import build_model, gpt_param_groups

import test_library as workers  # this file, importable by name in the spawned ranks
from toys import MixedNet, NormNet, Tied, make_mlp, mse, regression_batch, token_batch

HAS_SAFETENSORS = importlib.util.find_spec("safetensors") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
BASELINE = CommConfig.preset("baseline")
LR, NO_DECAY_LR, WEIGHT_DECAY = 1e-2, 5e-3, 0.1
PARITY_STEPS = 8
MIXED_STEPS = 6


def schedule(step: int) -> float:
    """Warm-up over 3 steps, then linear decay: what LambdaLR multiplies each group's lr by."""
    return min(1.0, (step + 1) / 3) * (1 - step / 20)


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    every = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(every, t.contiguous())
    return every


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """The spawned ranks' intra-op threads (1): another count changes float summation orders."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _message(call) -> str:
    """The message of the RuntimeError or ValueError `call()` raises ('' when it does not)."""
    try:
        call()
    except (RuntimeError, ValueError) as e:
        return str(e)
    return ""


# ---- parity with DDP + torch.optim.AdamW, groups, LambdaLR, clipping, state dicts ----------------
def parity(topo, fused: bool) -> dict:
    """NormNet with no-decay groups (their own lr), LambdaLR, engine.clip_grad_norm_ vs DDP +
    torch.optim.AdamW + torch's clip on the reduced gradients, one micro-batch per step (DDP then
    broadcasts the same buffers as the engine). Then one more step by four optimizers: both of them
    going on, a fresh engine loaded from torch's state dict and a torch AdamW loaded from the
    engine's: all four must agree."""
    rank = topo.rank
    model = NormNet(seed=3)
    ref = copy.deepcopy(model)
    engine = ShardedDataParallel(model, topo, optim=AdamWConfig(lr=LR, fused=fused), comm=BASELINE,
                                 bucket_numel=100, grad_clip=None,
                                 param_groups=model.groups(WEIGHT_DECAY, NO_DECAY_LR))
    ddp = DistributedDataParallel(ref)
    opt = torch.optim.AdamW(ref.groups(WEIGHT_DECAY, NO_DECAY_LR), lr=LR, betas=(0.9, 0.95), fused=fused)
    scheduler, ref_scheduler = LambdaLR(engine, schedule), LambdaLR(opt, schedule)
    out: dict = {"buckets": [(b.group, len(b.params)) for b in engine.buckets], "steps": []}

    def train_step(step: int) -> dict:
        idx, y = token_batch(step, rank)
        loss = mse(model(idx), y)
        loss.backward()
        ref_loss = mse(ddp(idx), y)
        ref_loss.backward()
        norm = engine.clip_grad_norm_(0.5)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        result = engine.step()
        opt.step()
        engine.zero_grad()
        opt.zero_grad()
        return {"loss": loss.item(), "ref_loss": ref_loss.item(), "norm": float(norm), "ref_norm": float(ref_norm),
                "step_norm": result.grad_norm, "lrs": [g["lr"] for g in engine.param_groups],
                "ref_lrs": [g["lr"] for g in opt.param_groups]}

    for step in range(PARITY_STEPS):
        out["steps"].append(train_step(step))
        scheduler.step()
        ref_scheduler.step()
    engine.wait_weights()
    out["params"] = {n: (p.detach().clone(), q.detach().clone())
                     for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters())}
    out["buffers"] = {n: t.clone() for n, t in model.named_buffers()}
    out["ref_buffers_of_rank0"] = {n: _gather(t)[0] for n, t in ref.named_buffers()}
    ours, theirs = engine.state_dict(), copy.deepcopy(opt.state_dict())  # torch's holds live tensors
    out["state_dicts"] = (ours, theirs)

    # One more step by four optimizers from the same state.
    from_torch_model = NormNet(seed=99)
    from_torch = ShardedDataParallel(from_torch_model, topo, optim=AdamWConfig(lr=LR, fused=fused), comm=BASELINE,
                                     bucket_numel=100, grad_clip=None,
                                     param_groups=from_torch_model.groups(WEIGHT_DECAY, NO_DECAY_LR))
    from_torch_model.load_state_dict(ref.state_dict())
    from_torch.load_state_dict(copy.deepcopy(theirs))
    from_engine_model = NormNet(seed=98)
    from_engine_model.load_state_dict(engine.full_state_dict())
    from_engine_ddp = DistributedDataParallel(from_engine_model)
    from_engine = torch.optim.AdamW(from_engine_model.groups(WEIGHT_DECAY, NO_DECAY_LR), lr=LR, fused=fused)
    from_engine.load_state_dict(copy.deepcopy(ours))  # torch steps the loaded step tensors in place
    out["loaded_flags"] = [g["decoupled_weight_decay"] for g in from_engine.param_groups]
    idx, y = token_batch(PARITY_STEPS, rank)
    for m, step, zero in ((model, engine.step, engine.zero_grad), (ddp, opt.step, opt.zero_grad),
                          (from_torch_model, from_torch.step, from_torch.zero_grad),
                          (from_engine_ddp, from_engine.step, from_engine.zero_grad)):
        mse(m(idx), y).backward()
        step()
        zero()
    for e in (engine, from_torch):
        e.wait_weights()
    out["after"] = [dict((n, p.detach().clone()) for n, p in m.named_parameters())
                    for m in (model, ref, from_torch_model, from_engine_model)]
    return out


# ---- what used to fail silently ---------------------------------------------------------------------
def torch_clip_on_the_model(topo) -> dict:
    """torch.nn.utils.clip_grad_norm_ on the wrapped model clips this rank's local, already sent
    gradient: refused at step(), and the engine trains on afterwards; a backward after
    engine.clip_grad_norm_ (which finished the reduction) raises instead of being lost."""
    rank = topo.rank
    model = make_mlp(seed=1)
    engine = ShardedDataParallel(model, topo, comm=BASELINE, bucket_numel=300, grad_clip=None)
    x, y = regression_batch(0, rank)
    (mse(model(x), y) * (10 + 20 * rank)).backward()
    local = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    error = _message(engine.step)
    mse(model(x), y).backward()
    norm = float(engine.clip_grad_norm_(1.0))
    late = _message(lambda: mse(model(x), y).backward())  # the reduction is done: it would be lost
    result = engine.step()
    engine.zero_grad()
    engine.check_replicas()
    return {"error": error, "late": late, "local_norm": local, "norm": norm, "step": result.grad_norm,
            "steps": engine.step_count}


def load_after_wrapping(topo) -> dict:
    """model.load_state_dict(...) after wrapping (the whole model, then one submodule) writes the fp32
    masters, in full precision even into a bf16 model; one step at lr 1e-6 stays at the loaded
    weights. assign=True is refused."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = make_mlp(seed=2).to(dtype)
        engine = ShardedDataParallel(model, topo, optim=AdamWConfig(lr=1e-6, weight_decay=0.0),
                                     comm=CommConfig.preset("qwd"), bucket_numel=300)
        for step in range(2):
            x, y = regression_batch(step, topo.rank)
            mse(model(x.to(dtype)).float(), y).backward()
            engine.step(1e-2)
            engine.zero_grad()
        target = make_mlp(seed=5).state_dict()  # fp32 values, most not representable in bf16
        model.load_state_dict(target)
        masters = engine.full_state_dict()
        loaded = {"masters_exact": all(torch.equal(masters[k], target[k]) for k in target),
                  "replica_is_cast": all(torch.equal(p.detach(), target[n].to(dtype))
                                         for n, p in model.named_parameters())}
        layer = make_mlp(seed=6)[2].state_dict()
        model[2].load_state_dict(layer)
        loaded["submodule_exact"] = torch.equal(engine.full_state_dict()["2.weight"], layer["weight"])
        target |= {f"2.{k}": v for k, v in layer.items()}
        x, y = regression_batch(9, topo.rank)
        mse(model(x.to(dtype)).float(), y).backward()
        engine.step()
        engine.zero_grad()
        engine.wait_weights()
        loaded["err_after_step"] = max((p.detach().float() - target[n]).abs().max().item()
                                       for n, p in model.named_parameters())
        loaded["assign"] = _message(lambda: model.load_state_dict(target, assign=True))
        out[str(dtype)] = loaded
    return out


def requires_grad_changes(topo) -> dict:
    """Unfreezing, freezing or replacing a parameter's storage after wrapping is refused at the
    next step (with the fix); with the change undone the engine trains on."""
    model = make_mlp(seed=3)
    model[0].weight.requires_grad_(False)
    engine = ShardedDataParallel(model, topo, optim=AdamWConfig(lr=1e-2), comm=BASELINE, bucket_numel=300)
    x, y = regression_batch(0, topo.rank)

    def attempt() -> str:
        mse(model(x), y).backward()
        message = _message(engine.step)
        engine.zero_grad()
        return message

    out = {}
    model[0].weight.requires_grad_(True)
    out["unfrozen"] = attempt()
    model[0].weight.requires_grad_(False)
    out["undone"] = attempt()
    model[2].weight.requires_grad_(False)
    out["frozen"] = attempt()
    model[2].weight.requires_grad_(True)
    old = model[2].bias.data
    model[2].bias.data = old.clone()
    out["rebound"] = attempt()
    model[2].bias.data = old
    out["steps"] = engine.step_count
    engine.check_replicas()
    return out


def train_ranks(model: nn.Module, engine: ShardedDataParallel, world, steps: int, batch,
                after_step=lambda model: None) -> list[float]:
    """`steps` steps of every rank this process plays on batch(step, rank), MSE loss: the losses."""
    losses = []
    for step in range(steps):
        for r in world.owned:
            with engine.as_rank(r):
                x, y = batch(step, r)
                loss = mse(model(x), y)
                loss.backward()
            losses.append(loss.item())
        engine.step()
        engine.zero_grad()
        after_step(model)
    return losses


def norm_run(world, broadcast: bool, after_step=lambda model: None) -> dict:
    """NormNet on rank-dependent data (BatchNorm statistics differ between ranks) on `world` (real
    or virtual), sdp4bit without clipping (bit-identical between the two): losses and buffers."""
    model = NormNet(seed=4)
    comm, _ = CommConfig.preset("sdp4bit").for_nodes(world.nodes)
    engine = ShardedDataParallel(model, world, comm=comm, bucket_numel=200, grad_clip=None,
                                 broadcast_buffers=broadcast)
    losses = train_ranks(model, engine, world, 4, token_batch, after_step)
    engine.check_replicas()
    return {"losses": losses, "buffers": {n: t.clone() for n, t in model.named_buffers()}, "engine": engine}


def buffers(topo) -> dict:
    """With broadcast_buffers (the default) every rank holds the first rank's BatchNorm statistics
    after each step and check_replicas covers buffers; without, they drift apart."""
    out = {}
    for broadcast in (True, False):
        drift: list[float] = []

        def measure(model: nn.Module) -> None:
            every = _gather(model.bn.running_mean)
            drift.append(max((t - every[0]).abs().max().item() for t in every))

        run = norm_run(ProcessGroupWorld(topo), broadcast, measure)
        out[broadcast] = {"drift": drift, "losses": run["losses"], "buffers": run["buffers"]}
    model, engine = run["engine"].module, run["engine"]
    if topo.rank == 1:
        with torch.no_grad():
            model.bn.running_var[0] += 1.0
    out["one_rank_changed"] = _message(engine.check_replicas)  # broadcast_buffers=False: not checked
    model = NormNet(seed=4)
    engine = ShardedDataParallel(model, topo, comm=BASELINE, bucket_numel=200)
    if topo.rank == 1:
        with torch.no_grad():
            model.bn.running_var[0] += 1.0
    out["differs"] = _message(engine.check_replicas)
    return out


# ---- mixed dtypes, safetensors, checkpoints with groups, HF from a config -------------------------------
def mixed_run(world, preset: str, steps: int) -> dict:
    """MixedNet (bf16 linears, fp32 norms) on `world` (real or virtual): losses of the ranks this
    process plays, the replica and fp32 masters by name, the bytes."""
    model = MixedNet(seed=5)
    comm, _ = CommConfig.preset(preset).for_nodes(world.nodes)
    engine = ShardedDataParallel(model, world, optim=AdamWConfig(lr=3e-2), comm=comm, bucket_numel=500,
                                 grad_clip=None, seed=3)
    world.stats.reset()  # a process group's counters are shared by every engine on it
    losses = train_ranks(model, engine, world, steps, regression_batch)
    engine.wait_weights()
    engine.check_replicas()
    return {"losses": losses, "replica": {n: p.detach().clone() for n, p in model.named_parameters()},
            "masters": engine.full_state_dict(), "stats": engine.stats.by_op(),
            "buckets": [(b.replica.dtype, b.grad.dtype, {p.dtype for p in b.params}) for b in engine.buckets]}


def save_safetensors(topo, root: str) -> dict:
    """engine.save_safetensors writes exactly the file safetensors.torch.save_model writes for an
    unwrapped model holding the fp32 masters (a tied model; one with BatchNorm buffers), under qwd
    (the replica is not the master); save_model on the wrapped model fails."""
    from safetensors.torch import load_file, save_model

    out = {}
    for name, make, data in (("tied", lambda: Tied(seed=6), lambda s, r: torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(10 * s + r))),
                             ("norm", lambda: NormNet(seed=6), lambda s, r: token_batch(s, r)[0])):
        model = make()
        engine = ShardedDataParallel(model, topo, optim=AdamWConfig(lr=1e-2), comm=CommConfig.preset("qwd"),
                                     bucket_numel=60)
        for step in range(2):
            model(data(step, topo.rank)).square().mean().backward()
            engine.step()
            engine.zero_grad()
        path = Path(root) / f"{name}.safetensors"
        engine.save_safetensors(path)
        full = engine.full_state_dict()
        ref = make()
        ref.load_state_dict(full)
        ref_path = Path(root) / f"{name}-ref{topo.rank}.safetensors"
        save_model(ref, str(ref_path))
        loaded = load_file(str(path))
        out[name] = {"same_bytes": path.read_bytes() == ref_path.read_bytes(),
                     "masters": all(torch.equal(loaded[k], full[k]) for k in loaded),
                     "replica_differs": any(not torch.equal(p.detach(), full[n]) for n, p in model.named_parameters()),
                     "keys": sorted(loaded), "wrapped": _message(lambda: save_model(model, str(ref_path) + ".x"))}
    return out


def grouped_checkpoint(topo, root: str) -> dict:
    """A checkpoint of an engine with groups and a LambdaLR: its param_groups entries are each
    parameter's group's; a fresh engine resumes with the group lrs and continues bit-identically;
    an engine with other groups or other weight decay is refused."""
    path = Path(root) / "grouped"

    def fresh(groups: bool = True, weight_decay: float = WEIGHT_DECAY):
        model = NormNet(seed=7)
        engine = ShardedDataParallel(model, topo, optim=AdamWConfig(lr=LR), comm=CommConfig.preset("qwd"),
                                     bucket_numel=100,
                                     param_groups=model.groups(weight_decay, NO_DECAY_LR) if groups else None)
        return model, engine, LambdaLR(engine, schedule)

    def train(model, engine, scheduler, steps) -> list[float]:
        losses = []
        for step in steps:
            idx, y = token_batch(step, topo.rank)
            loss = mse(model(idx), y)
            loss.backward()
            engine.step()
            engine.zero_grad()
            scheduler.step()
            losses.append(loss.item())
        return losses

    model, engine, scheduler = fresh()
    train(model, engine, scheduler, range(3))
    saved_lrs = [g["lr"] for g in engine.param_groups]
    engine.save_checkpoint(path, {"scheduler": scheduler.state_dict()})
    expected = train(model, engine, scheduler, range(3, 5))

    model2, engine2, scheduler2 = fresh()
    extra = engine2.load_checkpoint(path)
    scheduler2.load_state_dict(extra["scheduler"])
    out = {"saved_lrs": saved_lrs, "loaded_lrs": [g["lr"] for g in engine2.param_groups],
           "expected": expected, "resumed": train(model2, engine2, scheduler2, range(3, 5))}
    entries = {f"optimizer.param_groups.{n}.{k}": None for n in ("inp.weight", "ln.weight", "emb.weight")
               for k in ("lr", "weight_decay")}
    dcp.load(entries, checkpoint_id=str(path), process_group=topo.world_group)
    out["entries"] = entries
    out["other_groups"] = _message(lambda: fresh(groups=False)[1].load_checkpoint(path))
    out["other_decay"] = _message(lambda: fresh(weight_decay=0.2)[1].load_checkpoint(path))
    return out


def hf_from_config(topo, config_dir: str) -> dict:
    """A HF Llama built from a config.json alone (random init, the same on every rank by seed) trains
    with the GPT parameter groups and sdp4bit."""
    torch.manual_seed(0)
    model = build_model(f"hf:{config_dir}", 0)
    comm, _ = CommConfig.preset("sdp4bit").for_nodes(topo.nodes)
    engine = ShardedDataParallel(model, topo, optim=AdamWConfig(lr=2e-2), comm=comm, bucket_numel=4000,
                                 param_groups=gpt_param_groups(model, WEIGHT_DECAY))
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(topo.rank))
    losses = []
    for _ in range(6):  # memorize one batch per rank
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        engine.step()
        engine.zero_grad()
        losses.append(loss.item())
    engine.check_replicas()
    return {"pretrained": model.pretrained, "losses": losses,
            "groups": [len(g["params"]) for g in engine.param_groups],
            "buckets_per_group": [sum(b.group == g for b in engine.buckets) for g in range(2)]}


def library_worker(root: str, hf_dir: str | None) -> dict:
    """Every check of this file on one rank (2 ranks: 2 nodes x 1; 4 ranks: 2 nodes x 2)."""
    torch.set_num_threads(1)
    topo = build_topology(gpus_per_node=max(1, dist.get_world_size() // 2))
    out = {"parity": {fused: parity(topo, fused) for fused in (False, True)},
           "torch_clip": torch_clip_on_the_model(topo), "load": load_after_wrapping(topo),
           "requires_grad": requires_grad_changes(topo), "buffers": buffers(topo),
           "mixed": {preset: mixed_run(ProcessGroupWorld(topo), preset, MIXED_STEPS) for preset in ("baseline", "sdp4bit")},
           "checkpoint": grouped_checkpoint(topo, root)}
    if HAS_SAFETENSORS:
        out["safetensors"] = save_safetensors(topo, root)
    if hf_dir is not None:
        out["hf"] = hf_from_config(topo, hf_dir)
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=["2-ranks", "4-ranks"])
def run(request, tmp_path_factory) -> tuple[int, list[dict]]:
    root = tmp_path_factory.mktemp(f"library{request.param}")
    hf_dir = None
    if HAS_TRANSFORMERS:
        hf_dir = root / "hf"
        hf_dir.mkdir()
        (hf_dir / "config.json").write_text(json.dumps(TINY_LLAMA))
    return request.param, spawn(workers.library_worker, request.param, str(root),
                                None if hf_dir is None else str(hf_dir), timeout_s=280)


TINY_LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
              "max_position_embeddings": 64, "tie_word_embeddings": False}


# ---- the tests ------------------------------------------------------------------------------------------
def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_groups_and_lambdalr_match_ddp_and_torch_adamw(run, fused):
    """Two groups (no weight decay and half the lr on embeddings, norms and biases), LambdaLR on the
    engine, engine.clip_grad_norm_ against DDP + torch.optim.AdamW (the same fused/foreach choice) +
    LambdaLR + torch's clip_grad_norm_: every loss, norm, lr, weight, BatchNorm statistic and AdamW
    moment within 1e-5; buckets never mix groups."""
    world, reports = run
    for rank, r in enumerate(reports):
        p = r["parity"][fused]
        assert {g for g, _ in p["buckets"]} == {0, 1} and len(p["buckets"]) > 2
        for s in p["steps"]:
            assert s["loss"] == pytest.approx(s["ref_loss"], rel=1e-5)
            assert s["norm"] == pytest.approx(s["ref_norm"], rel=1e-5) and s["step_norm"] == s["norm"]
            assert s["lrs"] == s["ref_lrs"]
        assert max(s["norm"] for s in p["steps"]) > 0.5  # clipping was active
        lrs = [s["lrs"] for s in p["steps"]]
        assert lrs[0] == pytest.approx([LR / 3, NO_DECAY_LR / 3], rel=1e-12)  # each group its own lr
        assert lrs[5] == pytest.approx([LR * schedule(5), NO_DECAY_LR * schedule(5)], rel=1e-12)
        for name, (ours, theirs) in p["params"].items():
            _close(ours, theirs, f"rank {rank} {name}")
        for name, t in p["buffers"].items():  # the first rank's, as DDP broadcasts them
            _close(t.float(), p["ref_buffers_of_rank0"][name].float(), f"buffer {name}")
        ours, theirs = p["state_dicts"]
        assert [g["params"] for g in ours["param_groups"]] == [g["params"] for g in theirs["param_groups"]]
        for a, b in zip(ours["param_groups"], theirs["param_groups"]):
            assert {k: a[k] for k in ("lr", "betas", "eps", "weight_decay", "initial_lr")} == \
                   {k: b[k] for k in ("lr", "betas", "eps", "weight_decay", "initial_lr")}
        assert ours["state"].keys() == theirs["state"].keys() and len(ours["state"]) == 10
        for i, s in ours["state"].items():
            assert float(s["step"]) == float(theirs["state"][i]["step"]) == PARITY_STEPS
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(s[key], theirs["state"][i][key], rtol=1e-4, atol=1e-9)
        assert p["loaded_flags"] == [True, True]  # torch's AdamW loaded as AdamW, not Adam
        engine, ref, from_torch, from_engine = p["after"]
        for name in engine:
            for other, what in ((ref, "torch"), (from_torch, "engine loaded from torch"),
                                (from_engine, "torch loaded from the engine")):
                _close(engine[name], other[name], f"step {PARITY_STEPS}, {what}: {name}")


def test_torch_clip_grad_norm_on_the_wrapped_model_is_refused(run):
    """Failed before the fix (this test on 468fb54): step() went on without a word, with the
    unclipped reduced gradient, while torch's call had returned each rank's own local norm."""
    for r in run[1]:
        c = r["torch_clip"]
        assert "changed in place after backward" in c["error"] and "engine.clip_grad_norm_" in c["error"]
        assert "arrived after clip_grad_norm_() finished this step's reduction" in c["late"]
        assert c["steps"] == 1 and c["norm"] == c["step"] > 0  # the next step trains normally
    assert len({r["torch_clip"]["local_norm"] for r in run[1]}) == len(run[1])  # local norms differ


def test_loading_weights_after_wrapping_reaches_the_fp32_masters(run):
    """Failed before the fix (this test on 468fb54): the masters kept the old weights and the next
    step undid the load (0.68 away from the loaded fp32 weights after one step at lr 1e-6)."""
    for r in run[1]:
        for dtype, limit in (("torch.float32", 1e-5), ("torch.bfloat16", 4e-3)):  # bf16: the replica's rounding
            loaded = r["load"][dtype]
            assert loaded["masters_exact"] and loaded["replica_is_cast"] and loaded["submodule_exact"], loaded
            assert loaded["err_after_step"] < limit, (dtype, loaded)
            assert "assign=True" in loaded["assign"]


def test_requires_grad_or_storage_changes_after_wrapping_raise_at_the_next_step(run):
    """Failed before the fix (this test on 468fb54): no error; the unfrozen parameter was never
    trained, the frozen one kept being updated, the rebound one kept its old values."""
    for r in run[1]:
        g = r["requires_grad"]
        assert "parameter 0.weight requires grad" in g["unfrozen"] and "before wrapping" in g["unfrozen"]
        assert g["undone"] == ""
        assert "parameter 2.weight was trainable" in g["frozen"] and "frozen now" in g["frozen"]
        assert "2.bias no longer lives in the engine's bucket" in g["rebound"]
        assert g["steps"] == 1  # only the undone attempt stepped; refused steps changed nothing


def test_buffers_are_the_first_ranks_after_every_step_and_covered_by_check_replicas(run):
    """Failed before the fix (this test on 468fb54): the BatchNorm statistics differed between
    ranks by 0.012 (2 ranks) / 0.018 (4 ranks) after the first step, and check_replicas passed. Virtual ranks (one shared model) give every rank the statistics of the
    step's start and keep rank 0's: bit-identical to the gloo ranks."""
    world, reports = run
    with one_thread():
        virtual = norm_run(VirtualWorld(world, max(1, world // 2)), True)
    for rank, r in enumerate(reports):
        b = r["buffers"]
        assert b[True]["drift"] == [0.0] * 4
        assert min(b[False]["drift"]) > 1e-3  # rank-dependent data: the statistics do differ
        assert b["one_rank_changed"] == ""  # broadcast_buffers=False: each rank keeps its own
        assert "buffer bn.running_var differs between ranks" in b["differs"]
        assert b[True]["losses"] == virtual["losses"][rank::world]
        for name, t in virtual["buffers"].items():
            assert torch.equal(b[True]["buffers"][name], t), name
    assert virtual["buffers"]["bn.num_batches_tracked"] == 4  # the first rank's count, not 4 x W


def test_mixed_dtypes_bucket_per_dtype_and_match_virtual_ranks(run):
    """fp32 norms in a bf16 model: each bucket one dtype (kept by the replica and the gradients),
    fp32 masters; uncompressed, the replica is the master cast to each parameter's dtype; with
    sdp4bit the gloo ranks equal the virtual ranks bit for bit (losses, replica, masters, bytes)."""
    world, reports = run
    with one_thread():
        virtual = mixed_run(VirtualWorld(world, max(1, world // 2)), "sdp4bit", MIXED_STEPS)
    for rank, r in enumerate(reports):
        base = r["mixed"]["baseline"]
        dtypes = {n: t.dtype for n, t in base["replica"].items()}
        assert dtypes["ln1.weight"] == torch.float32 and dtypes["inp.weight"] == torch.bfloat16
        assert {d for d, _, _ in base["buckets"]} == {torch.float32, torch.bfloat16}
        assert all({d} == {g} == ps for d, g, ps in base["buckets"])
        for n, t in base["replica"].items():
            assert base["masters"][n].dtype == torch.float32 and torch.equal(t, base["masters"][n].to(t.dtype)), n
        assert base["losses"][-1] < 0.5 * base["losses"][0]
        real = r["mixed"]["sdp4bit"]
        assert real["losses"] == virtual["losses"][rank::world], rank
        for part in ("replica", "masters"):
            assert all(torch.equal(real[part][n], virtual[part][n]) for n in virtual[part]), part
        assert real["losses"][-1] < 0.5 * real["losses"][0]
    together = {op: {k: world * n for k, n in row.items()} for op, row in reports[0]["mixed"]["sdp4bit"]["stats"].items()}
    assert virtual["stats"] == together


@pytest.mark.skipif(not HAS_SAFETENSORS, reason="needs safetensors (the .[export] extra)")
def test_save_safetensors_writes_what_save_model_writes_for_the_masters(run):
    """Fails before the fix (there was no way): safetensors.torch.save_model on a wrapped model
    refuses parameters that are views into one flat bucket ('None is covering the entire storage')."""
    for r in run[1]:
        for name, s in r["safetensors"].items():
            assert s["same_bytes"] and s["masters"] and s["replica_differs"], (name, s)
            assert "None is covering the entire storage" in s["wrapped"]
        assert r["safetensors"]["tied"]["keys"] == ["emb.weight", "mid.bias", "mid.weight"]  # save_model's pick
        assert "bn.running_mean" in r["safetensors"]["norm"]["keys"]


def test_checkpoints_keep_each_parameters_group_and_resume_the_schedule(run):
    for r in run[1]:
        c = r["checkpoint"]
        assert c["loaded_lrs"] == c["saved_lrs"] != [LR, NO_DECAY_LR]
        assert c["resumed"] == c["expected"]
        e = c["entries"]
        assert e["optimizer.param_groups.inp.weight.weight_decay"] == WEIGHT_DECAY
        assert e["optimizer.param_groups.ln.weight.weight_decay"] == e["optimizer.param_groups.emb.weight.weight_decay"] == 0.0
        assert (e["optimizer.param_groups.inp.weight.lr"], e["optimizer.param_groups.ln.weight.lr"]) == tuple(c["saved_lrs"])
        assert "other parameter groups" in c["other_groups"]
        assert "weight_decay 0.1" in c["other_decay"] and "this run has 0.2" in c["other_decay"]


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers (the .[hf] extra)")
def test_hf_model_from_a_config_alone_trains_with_the_gpt_groups(run):
    for r in run[1]:
        h = r["hf"]
        assert h["pretrained"] is False
        assert h["groups"][0] > 0 and h["groups"][1] > 0 and all(n > 0 for n in h["buckets_per_group"])
        assert h["losses"][-1] < 0.8 * h["losses"][0], h["losses"]  # measured 0.58 (2 ranks), 0.66 (4)
    assert len({r["hf"]["losses"][0] for r in run[1]}) == len(run[1])  # each rank its own batch, one model


# ---- one process -----------------------------------------------------------------------------------------
def _virtual_engine(model: nn.Module, **kwargs) -> ShardedDataParallel:
    return ShardedDataParallel(model, VirtualWorld(2), comm=BASELINE, bucket_numel=300, **kwargs)


def _backward(model: nn.Module, engine: ShardedDataParallel, step: int = 0) -> None:
    for r in range(2):
        with engine.as_rank(r):
            x, y = regression_batch(step, r)
            mse(model(x), y).backward()


def test_bad_parameter_groups_and_optimizer_misuse_raise():
    model = make_mlp()
    params = list(model.parameters())
    with pytest.raises(ValueError, match=r"2 trainable parameter\(s\) are in no parameter group \(first: 4.weight"):
        _virtual_engine(model, param_groups=[{"params": params[:-2]}])
    with pytest.raises(ValueError, match=r"param_groups\[1\] holds a tensor of shape \(3,\) that is not a parameter"):
        _virtual_engine(model, param_groups=[{"params": params}, {"params": [nn.Parameter(torch.zeros(3))]}])
    with pytest.raises(ValueError, match="more than one parameter group"):  # torch.optim's own check
        _virtual_engine(model, param_groups=[{"params": params}, {"params": params[:1]}])
    with pytest.raises(ValueError, match=r"param_groups\[1\]: AdamWConfig.weight_decay must be"):
        _virtual_engine(model, param_groups=[{"params": params[:2]}, {"params": params[2:], "weight_decay": -1.0}])

    engine = _virtual_engine(model, param_groups=[{"params": params[:2], "weight_decay": 0.0}, {"params": params[2:]}])
    with pytest.raises(RuntimeError, match="add_param_group after the engine was built"):
        engine.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
    _backward(model, engine)
    with pytest.raises(TypeError, match=r"step\(closure\) is not supported"):
        engine.step(lambda: 0.0)
    engine.param_groups[1]["lr"] = float("nan")
    with pytest.raises(ValueError, match=r"param_groups\[1\]: AdamWConfig.lr must be a finite number"):
        engine.step()
    engine.param_groups[1]["lr"] = 1e-3
    engine.clip_grad_norm_(1.0)
    with pytest.raises(RuntimeError, match="clip_grad_norm_ was already called"):
        engine.clip_grad_norm_(1.0)
    with pytest.raises(ValueError, match="max_norm must be a finite number > 0"):
        engine.clip_grad_norm_(0.0)
    assert not engine.step().skipped and engine.step_count == 1
    engine.zero_grad()
    engine.param_groups[0]["params"].append(nn.Parameter(torch.zeros(2)))
    _backward(model, engine)
    with pytest.raises(RuntimeError, match="param_groups' params changed after the engine was built"):
        engine.step()
    engine.param_groups[0]["params"].pop()

    with pytest.raises(ValueError, match="parameter groups .* differ from the engine's"):
        engine.load_state_dict({"state": {}, "param_groups": [{"params": [0, 1, 2, 3, 4, 5]}]})
    state = engine.state_dict()
    state["param_groups"][0]["amsgrad"] = True
    with pytest.raises(ValueError, match="amsgrad=True: the engine runs AdamW with amsgrad=False only"):
        engine.load_state_dict(state)


def test_step_lr_overrides_every_groups_lr_for_that_step_only():
    model = make_mlp()
    params = list(model.parameters())
    engine = _virtual_engine(model, optim=AdamWConfig(weight_decay=0.0), grad_clip=None,
                             param_groups=[{"params": params[:2], "lr": 0.5}, {"params": params[2:], "lr": 0.25}])
    before = [p.detach().clone() for p in params]
    _backward(model, engine)
    engine.step(1e-3)
    engine.zero_grad()
    # Adam's first step moves every weight by lr (sign of its gradient, up to eps) where it has one.
    moved = [(p.detach() - b).abs().max().item() for p, b in zip(params, before)]
    assert moved == pytest.approx([1e-3] * len(params), rel=1e-3)
    assert [g["lr"] for g in engine.param_groups] == [0.5, 0.25]


def test_fused_adamw_matches_torch_fused_and_foreach_matches_torch_foreach_bit_for_bit():
    """adamw_ on master shards: the foreach path is torch.optim.AdamW(foreach=True), the fused path
    torch.optim.AdamW(fused=True), each to the bit; the two differ by float rounding only."""
    g = torch.Generator().manual_seed(0)
    shapes = [(300,), (64, 5)]
    init = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(4)]
    results = {}
    for fused in (False, True):
        config = AdamWConfig(lr=1e-2, weight_decay=0.1, fused=fused)
        params, m, v = [t.clone().view(-1) for t in init], [torch.zeros(t.numel()) for t in init], \
            [torch.zeros(t.numel()) for t in init]
        ref = [nn.Parameter(t.clone()) for t in init]
        opt = torch.optim.AdamW(ref, lr=1e-2, betas=config.betas, eps=config.eps, weight_decay=0.1,
                                foreach=not fused, fused=fused or None)
        for step, gs in enumerate(grads, start=1):
            adamw_(params, m, v, [x.reshape(-1) for x in gs], lr=1e-2, step=step, config=config)
            for p, x in zip(ref, gs):
                p.grad = x.clone()
            opt.step()
        for ours, theirs in zip(params, ref):
            assert torch.equal(ours, theirs.detach().view(-1)), fused
        results[fused] = torch.cat(params)
    torch.testing.assert_close(results[True], results[False], rtol=1e-6, atol=1e-7)


def test_fused_engine_run_stays_within_float_rounding_of_the_foreach_run():
    runs = {}
    for fused in (False, True):
        model = make_mlp()
        engine = _virtual_engine(model, optim=AdamWConfig(lr=1e-2, fused=fused))
        for step in range(5):
            _backward(model, engine, step)
            engine.step()
            engine.zero_grad()
        runs[fused] = torch.cat([m for row in engine.master for m in row])
    torch.testing.assert_close(runs[True], runs[False], rtol=1e-5, atol=1e-6)
