"""Per-rank bodies of the multi-process engine tests (run through halfbyte.comm.spawn on gloo; the CUDA one on NCCL).

Each worker batches several checks into one spawned job (process start-up dominates on 2 cores);
assertions fail inside the rank and surface in the parent as WorkerError with the traceback.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import shutil
import weakref
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from halfbyte.comm import build_topology
from halfbyte.engine import AdamWConfig, CommConfig, ShardedDataParallel
from halfbyte.quant import QuantSpec, codec
from halfbyte.train.model import build_model
from toys import TinyTransformer, make_mlp, mse, regression_batch, used_forward

RTOL = 1e-5  # baseline engine vs torch DDP + AdamW, relative


# ---- 2 ranks: baseline == DDP, unused params, non-finite skip, memory ------------------------
def baseline_vs_ddp() -> dict:
    topo = build_topology()
    rank = topo.rank
    report: dict = {}
    cases = [("mlp", lambda: make_mlp(width=32), None, 0.5, 40),
             ("transformer", TinyTransformer, 5, 0.3, 300)]
    for name, make, seq, clip, bucket_numel in cases:
        model = make()
        ref = copy.deepcopy(model)
        optim = AdamWConfig(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        engine = ShardedDataParallel(model, topo, optim=optim, comm=CommConfig.preset("baseline"),
                                     bucket_numel=bucket_numel, grad_clip=clip)
        assert len(engine.buckets) > 2, "the test needs several buckets"
        ddp = DistributedDataParallel(ref)
        opt = torch.optim.AdamW(ref.parameters(), lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                weight_decay=optim.weight_decay)
        micro = 2
        norms = []
        for step in range(12):
            lr = optim.lr * (1 - step / 24)  # a schedule: step(lr) must take it
            for m in range(micro):
                x, y = regression_batch(step, rank, m, seq=seq)
                last = m == micro - 1
                with nullcontext() if last else engine.no_sync():
                    loss = mse(model(x), y) / micro
                    loss.backward()
                with nullcontext() if last else ddp.no_sync():
                    ref_loss = mse(ddp(x), y) / micro
                    ref_loss.backward()
                torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=1e-7)
            result = engine.step(lr)
            engine.zero_grad()
            ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            opt.zero_grad()
            assert not result.skipped
            assert abs(result.grad_norm - float(ref_norm)) <= RTOL * float(ref_norm), (result, ref_norm)
            norms.append(result.grad_norm)
        assert max(norms) > clip, f"{name}: clipping never triggered, the test would not cover it"
        engine.wait_weights()  # the last step's all-gathers are still in flight (prefetch)
        for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            if n.endswith("in_proj_bias"):
                # The key bias has an exactly zero true gradient (softmax ignores a shift of the
                # logits): what it gets is summation-order rounding noise, which Adam scales up to
                # +-lr steps. Compare the query and value parts only.
                d = model.block.self_attn.embed_dim
                p, q = torch.cat([p[:d], p[2 * d:]]), torch.cat([q[:d], q[2 * d:]])
            torch.testing.assert_close(p, q, rtol=RTOL, atol=1e-6, msg=f"{name}: {n} differs from DDP")
        engine.check_replicas()
        report[name] = {"norms": norms, "memory": engine.memory_report(),
                        "numel": sum(p.numel() for p in model.parameters()),
                        "buckets": len(engine.buckets)}

    # Unused params: backward never reaches their bucket, step() must still launch it (no hang);
    # with a zero gradient AdamW only decays them.
    model = make_mlp(unused=True)
    engine = ShardedDataParallel(model, topo, optim=AdamWConfig(lr=1e-2, weight_decay=0.1),
                                 comm=CommConfig.preset("baseline"), bucket_numel=64)
    unused_before = model.unused.weight.detach().clone()
    x, y = regression_batch(0, rank)
    mse(used_forward(model)(x), y).backward()
    assert not engine.step().skipped
    engine.zero_grad()
    engine.check_replicas()
    torch.testing.assert_close(model.unused.weight, unused_before * (1 - 1e-2 * 0.1), rtol=0, atol=0)

    # A batch discarded after its backward: zero_grad() completes and drops the reduce-scatters.
    forward = used_forward(model)
    mse(forward(x), y).backward()
    engine.zero_grad()

    # A non-finite gradient on one rank skips the step on every rank and changes no weight.
    before = [p.detach().clone() for p in model.parameters()]
    x, y = regression_batch(1, rank)
    loss = mse(forward(x), y) * (float("inf") if rank == 1 else 1.0)
    loss.backward()
    result = engine.step()
    engine.zero_grad()
    assert result.skipped and engine.skipped_steps == 1 and engine.step_count == 1, result
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b), "a skipped step changed the weights"
    mse(forward(x), y).backward()
    assert not engine.step().skipped and engine.step_count == 2
    report["skip"] = result.grad_norm

    # check_replicas notices a one-ulp difference on one rank, and names the bucket.
    engine.check_replicas()
    if rank == 1:
        with torch.no_grad():
            w = model[2].weight.view(-1)
            w[3] = torch.nextafter(w[3], torch.tensor(1.0))
    try:
        engine.check_replicas()
    except RuntimeError as e:
        report["mismatch"] = str(e)
    return report


# ---- 2 ranks: checkpoint / resume ------------------------------------------------------------
def _train(model, engine, steps: range, seq=None) -> list[float]:
    losses = []
    for step in steps:
        x, y = regression_batch(step, dist.get_rank(), seq=seq)
        loss = mse(model(x), y)
        loss.backward()
        engine.step()
        engine.zero_grad()
        losses.append(loss.item())
    return losses


def checkpoint_resume(root: str) -> dict:
    topo = build_topology()
    ckpt = Path(root) / "ckpt"

    def fresh(preset: str = "baseline", dropout: float = 0.1):
        model = TinyTransformer(dropout=dropout)  # dropout: resuming must restore the RNG too
        return model, ShardedDataParallel(model, topo, optim=AdamWConfig(lr=3e-3),
                                          comm=CommConfig.preset(preset), bucket_numel=400)

    model, engine = fresh()
    _train(model, engine, range(3), seq=5)
    engine.save_checkpoint(ckpt, {"data_position": 3})
    expected = _train(model, engine, range(3, 6), seq=5)
    engine.save_checkpoint(ckpt, {"data_position": 6})  # overwrites atomically
    again = _train(model, engine, range(6, 8), seq=5)

    # Resume from the step-6 checkpoint into a differently initialised engine: same loss curve.
    model2, engine2 = fresh()
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)
    extra = engine2.load_checkpoint(ckpt)
    assert extra == {"data_position": 6}, extra
    assert engine2.step_count == 6
    after6 = _train(model2, engine2, range(6, 8), seq=5)
    assert after6 == again, (after6, again)
    engine2.check_replicas()

    # Bit-identical next losses from a mid-run checkpoint (re-saved at step 3 by a third engine).
    model3, engine3 = fresh()
    _train(model3, engine3, range(3), seq=5)
    engine3.save_checkpoint(ckpt, {"data_position": 3})
    _train(model3, engine3, range(3, 5), seq=5)  # move on, then rewind
    assert engine3.load_checkpoint(ckpt)["data_position"] == 3
    resumed = _train(model3, engine3, range(3, 6), seq=5)
    assert resumed == expected, (resumed, expected)

    # Refusals: another model, another comm config, a partial checkpoint, a damaged one.
    errors = {}
    bad_model = nn.Sequential(nn.Linear(8, 3))
    other = ShardedDataParallel(bad_model, topo, comm=CommConfig.preset("baseline"))
    _, other_comm = fresh(preset="qwd")
    for name, eng in [("model", other), ("comm", other_comm)]:
        try:
            eng.load_checkpoint(ckpt)
        except ValueError as e:
            errors[name] = str(e)
    dist.barrier()
    if topo.rank == 0:
        shutil.copytree(ckpt, Path(root) / "partial")
        (Path(root) / "partial" / "COMPLETE").unlink()
    dist.barrier()
    try:
        engine3.load_checkpoint(Path(root) / "partial")
    except ValueError as e:
        errors["partial"] = str(e)
    return {"errors": errors, "losses": expected}


# ---- 4 ranks as 2 nodes x 2: every preset trains; replicas stay identical --------------------
def presets_converge(presets: list[str], steps: int) -> dict:
    topo = build_topology(gpus_per_node=2)
    out = {}
    for preset in presets:
        model = make_mlp(seed=1, width=48)
        engine = ShardedDataParallel(model, topo, optim=AdamWConfig(lr=1e-2, weight_decay=0.0),
                                     comm=CommConfig.preset(preset), bucket_numel=1500,
                                     grad_clip=1.0, seed=7)
        topo.stats.reset()
        losses = _train(model, engine, range(steps))
        engine.check_replicas()
        tail = torch.tensor(sum(losses[-10:]) / 10)
        dist.all_reduce(tail)
        out[preset] = {"loss": tail.item() / topo.world_size, "first": losses[0],
                       "bytes": engine.stats.summary()}
    return out


# ---- 2 ranks: qWD keeps replica ~ master; direct int4 does not --------------------------------
def weight_error(steps: int) -> dict:
    topo = build_topology()
    out = {}
    for preset in ("qwd", "qw4"):
        model = make_mlp(seed=2, width=64)
        engine = ShardedDataParallel(model, topo, optim=AdamWConfig(lr=3e-3, weight_decay=0.0),
                                     comm=CommConfig.preset(preset), bucket_numel=10_000, seed=3)
        spec: QuantSpec = engine.comm.weight_spec
        _train(model, engine, range(steps - 1))
        engine.wait_weights()
        before = [b.shard(b.replica, topo.rank).clone() for b in engine.buckets]
        _train(model, engine, range(steps - 1, steps))
        engine.wait_weights()
        errs, bound_ok = [], True
        for b, master, old in zip(engine.buckets, engine.master[0], before):  # [owned rank][bucket]
            mine = b.shard(b.replica, topo.rank)
            err = (mine - master).abs().view(-1, spec.group_size)
            delta = (master - old).abs().view(-1, spec.group_size)
            # One quantization level of the last delta per group (stochastic rounding moves a
            # value by less than one level; bf16 scales add < 1%).
            bound = delta.amax(dim=1, keepdim=True) / spec.qmax * 1.01 + 1e-7
            bound_ok &= bool((err <= bound).all())
            errs.append(err.reshape(-1)[: b.valid_in_shard(topo.rank)])
        err = torch.cat(errs)
        engine.check_replicas()
        out[preset] = {"max": err.max().item(), "mean": err.mean().item(), "within_one_step": bound_ok}
    return out


def misuse_and_mismatch() -> dict:
    """Frozen params are broadcast like DDP's; a no_sync backward after the communicating one raises
    instead of dropping its gradient; ranks with different models raise ValueError (no hang)."""
    topo = build_topology(gpus_per_node=1)
    rank = topo.rank
    model = make_mlp(seed=rank)  # different initial weights on each rank
    model[0].bias.requires_grad_(False)
    engine = ShardedDataParallel(model, topo, comm=CommConfig.preset("baseline"), bucket_numel=64)
    frozen = [torch.zeros_like(model[0].bias) for _ in range(topo.world_size)]
    dist.all_gather(frozen, model[0].bias.detach())
    assert torch.equal(frozen[0], frozen[1]), "the frozen bias was not broadcast from rank 0"

    x, y = regression_batch(0, rank)
    mse(model(x), y).backward()
    late_error = ""
    try:
        with engine.no_sync():
            mse(model(x), y).backward()
    except RuntimeError as e:
        late_error = str(e)
    engine.zero_grad()

    # Deleted engines are freed (replica, master, optimizer state), weight all-gathers in flight
    # or not: hooks on the parameters must not keep their engine alive.
    sdp4bit = dataclasses.replace(CommConfig.preset("sdp4bit"), grads="one-level", grad_intra_spec=None)
    model = make_mlp()
    engine = ShardedDataParallel(model, topo, comm=sdp4bit, bucket_numel=64)
    mse(model(x), y).backward()
    engine.step()  # leaves the weight all-gathers in flight
    refs = [weakref.ref(engine), weakref.ref(model)]
    del engine, model
    gc.collect()
    freed = [r() is None for r in refs]

    width = 32 if rank == 0 else 33
    mismatch_error = ""
    try:
        ShardedDataParallel(make_mlp(width=width), topo, comm=CommConfig.preset("baseline"))
    except ValueError as e:
        mismatch_error = str(e)
    return {"late": late_error, "mismatch": mismatch_error, "freed": freed}


# ---- 1 CUDA rank (NCCL world of one): bf16 replica, Triton codec ------------------------------
def gpu_presets_memorize(presets: list[str], steps: int) -> dict:
    """Each preset fits one fixed batch of token ids with a bf16 tiny GPT; the codec runs on Triton."""
    topo = build_topology()
    assert topo.device.type == "cuda", topo.device
    out: dict = {"backend": codec.backend_for(torch.zeros(1, device=topo.device)).__name__}
    tokens = torch.randint(0, 512, (8, 65), generator=torch.Generator().manual_seed(1)).to(topo.device)
    for preset in presets:
        comm, _ = CommConfig.preset(preset).for_nodes(topo.nodes)  # one node: one level
        torch.manual_seed(0)
        model = build_model("tiny", vocab_size=512).to(topo.device, torch.bfloat16)
        engine = ShardedDataParallel(model, topo, optim=AdamWConfig(lr=3e-3), comm=comm, bucket_numel=200_000)
        losses = []
        for _ in range(steps):
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            assert not engine.step().skipped
            engine.zero_grad()
            losses.append(loss.item())
        engine.wait_weights()
        engine.check_replicas()
        replica_dtypes = {p.dtype for p in model.parameters()}
        out[preset] = {"losses": losses, "dtypes": sorted(map(str, replica_dtypes)),
                       "buckets": len(engine.buckets)}
    return out


# ---- checkpoints across world sizes, real and virtual -------------------------------------------
RESHARD_BATCH = 16  # global batch: rank r of W takes samples [r * 16 / W, (r + 1) * 16 / W)


def reshard_engine(model: nn.Module, world, preset: str) -> ShardedDataParallel:
    return ShardedDataParallel(model, world, optim=AdamWConfig(lr=3e-3), comm=CommConfig.preset(preset),
                               bucket_numel=700, grad_clip=0.5, seed=4)


def reshard_steps(model: nn.Module, engine: ShardedDataParallel, steps: range) -> list[float]:
    """Train on the global batch of each step split over the ranks this process plays; return the
    global mean loss of every step (the same on every rank)."""
    W = engine.world.world_size
    share = RESHARD_BATCH // W
    losses = []
    for step in steps:
        x, y = regression_batch(step, 0, n=RESHARD_BATCH, seq=5)
        total = torch.zeros(())
        for r in engine.world.owned:
            with engine.as_rank(r):
                loss = mse(model(x[r * share:(r + 1) * share]), y[r * share:(r + 1) * share])
                loss.backward()
            total += loss.detach()
        engine.step()
        engine.zero_grad()
        if dist.is_initialized() and not engine.world.defers_gradients:
            dist.all_reduce(total)
        losses.append(total.item() / W)
    return losses


def reshard_worker(preset: str, load: str | None, save: str | None, gpus_per_node: int, steps: int,
                   save_at: int | None = None) -> dict:
    """Optionally load a checkpoint and record the state it gave; train `steps` steps, saving to
    `save` after `save_at` of them (then "saved" is the state saved) or at the end."""
    topo = build_topology(gpus_per_node)
    model = TinyTransformer(seed=9)
    engine = reshard_engine(model, topo, preset)
    if load:
        engine.load_checkpoint(load)
    out = {"loaded": state_of(model, engine)}
    first = engine.step_count
    save_at = steps if save_at is None else save_at
    out["losses"] = reshard_steps(model, engine, range(first, first + save_at))
    if save:
        engine.save_checkpoint(save, {"from": topo.world_size})
        out["saved"] = state_of(model, engine)
    out["losses"] += reshard_steps(model, engine, range(first + save_at, first + steps))
    engine.check_replicas()
    return out


def state_of(model: nn.Module, engine: ShardedDataParallel) -> dict:
    """The whole fp32 masters and the replica, by name (collective on real ranks)."""
    engine.wait_weights()
    return {"master": engine.full_state_dict(), "step_count": engine.step_count,
            "replica": {n: p.detach().clone() for n, p in model.named_parameters()}}
