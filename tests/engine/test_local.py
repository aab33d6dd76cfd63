"""Local updates across islands (halfbyte/engine/local.py): multi-process tests on gloo (CPU, fp32).

Worker bodies are module-level functions of this file; spawned ranks import it by module name
(conftest.py puts its folder on sys.path, which travels to them). Assertions that need every rank's data run
in the parent; per-rank invariants run inside the ranks and surface as WorkerError.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from halfbyte.comm import build_topology, spawn
from halfbyte.engine import AdamWConfig, CommConfig, ShardedDataParallel
from halfbyte.engine.outer import (
    LocalUpdates,
    OuterConfig,
    ProcessExchange,
    build_islands,
    check_islands,
    make_outer_optimizer,
    virtual_islands,
)
from halfbyte.quant import QuantSpec

import test_local as workers  # this file, importable by name in the spawned ranks
from toys import flat_params, make_mlp, regression_batch

INT4 = QuantSpec(bits=4, group_size=128, rounding="stochastic", hadamard=32)
INT4_NEAREST = QuantSpec(bits=4, group_size=128, rounding="nearest")
INT2_NEAREST = QuantSpec(bits=2, group_size=128, rounding="nearest")  # levels -s, 0, +s


# ---- model, data, loop --------------------------------------------------------------------------
def train_step(engine, local, model: nn.Module, step: int, lr: float) -> bool:
    x, y = regression_batch(step, dist.get_rank())
    ((model(x) - y) ** 2).mean().backward()
    engine.step(lr=lr)
    synced = local.step(lr) if local is not None else False
    engine.zero_grad()
    engine.check_replicas()  # waits for the weight all-gathers step() started: params are readable
    return synced


def islands_agree(model: nn.Module) -> bool:
    """All ranks of the world hold bit-identical parameters."""
    mine = flat_params(model)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return all(torch.equal(mine, other) for other in every)


# Adam divides by sqrt(v) + eps; with eps >> |grad| it is SGD with (bias-corrected) momentum, which
# is linear in the gradients: then averaging the islands' weights after every step (tau = 1) is the
# same as averaging their gradients (data parallel). Without it, Adam's normalization makes local
# averaging a different algorithm, so no equality is expected.
LINEAR_ADAM = AdamWConfig(lr=1e5, betas=(0.9, 0.95), eps=1e6, weight_decay=0.0)


# ---- workers ------------------------------------------------------------------------------------
def dp_equivalence_worker() -> dict:
    """4 ranks: tau=1 `average` uncompressed == the engine on the whole world, for 2 islands x 2
    ranks and 4 islands x 1 rank; then sign-momentum over int4 pseudo-gradients with the sdp4bit
    preset inside islands of 2 emulated nodes: islands restart identical after every outer step."""
    steps = 5
    model = make_mlp(width=24)
    dp = ShardedDataParallel(model, build_topology(), optim=LINEAR_ADAM, comm=CommConfig.preset("baseline"),
                             grad_clip=None, bucket_numel=300)
    for step in range(steps):
        train_step(dp, None, model, step, LINEAR_ADAM.lr)
    reference = flat_params(model)

    report: dict = {}
    for K in (2, 4):
        model = make_mlp(width=24)
        islands = build_islands(K)
        engine = ShardedDataParallel(model, islands.worlds[0], optim=LINEAR_ADAM, comm=CommConfig.preset("baseline"),
                                     grad_clip=None, bucket_numel=300)
        local = LocalUpdates([engine], islands, OuterConfig("average", local_steps=1))
        for step in range(steps):
            assert train_step(engine, local, model, step, LINEAR_ADAM.lr)
            assert islands_agree(model), f"islands differ after outer step {step} (K={K})"
        err = (flat_params(model) - reference).abs().max().item()
        report[K] = {"err": err, "moved": (reference - flat_params(make_mlp(width=24))).abs().max().item(),
                     "outer_steps": local.outer_steps, "inter_bytes": local.stats.totals()["inter"]}

    # sdp4bit inside islands of 2 emulated nodes x 1 rank, int4 + Hadamard pseudo-gradients + EF.
    model = make_mlp(width=24)
    islands = build_islands(2, gpus_per_node=1)
    assert (islands.worlds[0].nodes, islands.worlds[0].gpus_per_node) == (2, 1)
    engine = ShardedDataParallel(model, islands.worlds[0], optim=AdamWConfig(lr=1e-2), comm=CommConfig.preset("sdp4bit"),
                                 bucket_numel=300)
    local = LocalUpdates([engine], islands, OuterConfig("sign-momentum", local_steps=3, spec=INT4))
    losses = []
    for step in range(12):
        x, y = regression_batch(1000, dist.get_rank(), n=64)  # a fixed evaluation batch
        with torch.no_grad():
            losses.append(((model(x) - y) ** 2).mean().item())
        if train_step(engine, local, model, step, 1e-2):
            assert islands_agree(model), f"islands differ after the compressed outer step at {step}"
    engine.check_replicas()
    report["sdp4bit"] = {"losses": losses, "outer_steps": local.outer_steps,
                         "inter": local.stats.totals()["inter"], "calls": local.stats.summary()["calls"]}
    return report


def sign_momentum_worker(tau: int, lrs: list[float]) -> dict:
    """2 islands of 1 rank, sign-momentum: record start, end-of-round and post-outer weights."""
    model = make_mlp(width=24)
    islands = build_islands(2)
    engine = ShardedDataParallel(model, islands.worlds[0], optim=AdamWConfig(lr=1e-2), comm=CommConfig.preset("baseline"),
                                 grad_clip=None, bucket_numel=300)
    local = LocalUpdates([engine], islands, OuterConfig("sign-momentum", local_steps=tau))
    rounds = []
    start = flat_params(model)
    for step, lr in enumerate(lrs):
        x, y = regression_batch(step, dist.get_rank())
        ((model(x) - y) ** 2).mean().backward()
        engine.step(lr=lr)
        engine.zero_grad()
        engine.check_replicas()  # waits for the weight all-gathers
        end = flat_params(model)
        if local.step(lr):
            after = flat_params(model)  # the outer step leaves the replicas complete
            rounds.append({"start": start, "end": end, "after": after, "lr": lr})
            start = after
    return {"rounds": rounds, "momentum_numel": local.optimizers[0][0].state["momentum"].numel()}


def outer_snapshot(local: LocalUpdates) -> dict:
    """Everything the outer loop carries from one round to the next, copied."""
    return {
        "start": [t.clone() for t in local.start],
        "outer_params": [[t.clone() for t in row] for row in local.outer_params],
        "optimizer": [[{k: v.clone() for k, v in o.state.items()} for o in row] for row in local.optimizers],
        "residual": [None if e.residual is None else [t.clone() for t in e.residual] for e in local.exchanges],
        "outer_steps": local.outer_steps, "steps_since_sync": local.steps_since_sync,
    }


def checkpoint_worker(path: str) -> dict:
    """Save mid-round (after step 3 of tau=2 rounds), keep going; a fresh engine + LocalUpdates
    that loads the checkpoint and runs the same steps must end bit-identical."""
    steps, save_at = 7, 3
    lr = 1e-2
    config = OuterConfig("sign-momentum", local_steps=2, spec=INT4)

    def build():
        model = make_mlp(width=24)
        islands = build_islands(2)
        engine = ShardedDataParallel(model, islands.worlds[0], optim=AdamWConfig(lr=lr), comm=CommConfig.preset("qwd"),
                                     bucket_numel=300, seed=5)
        return model, engine, LocalUpdates([engine], islands, config)

    model, engine, local = build()
    for step in range(steps):
        train_step(engine, local, model, step, lr)
        if step + 1 == save_at:
            local.save_checkpoint(path, {"step": step + 1})
            saved_state = outer_snapshot(local)
    final, final_state = flat_params(model), outer_snapshot(local)

    model, engine, local = build()
    extra = local.load_checkpoint(path)
    resumed_state = outer_snapshot(local)
    for step in range(extra["step"], steps):
        train_step(engine, local, model, step, lr)
    return {
        "final_equal": torch.equal(final, flat_params(model)),
        "state_restored": _states_equal(saved_state, resumed_state),
        "final_state_equal": _states_equal(final_state, outer_snapshot(local)),
        "saved_mid_round": saved_state["steps_since_sync"],
        "outer_steps": local.outer_steps,
        "has_residual": saved_state["residual"][0] is not None and saved_state["residual"][0][0].abs().sum().item() > 0,
    }


def _states_equal(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_states_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_states_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def bad_layout_worker() -> dict:
    """Errors raised before any communication, on every rank alike; the group still works after."""
    errors = {}
    for name, call in {
        "islands_3": lambda: build_islands(3),
        "islands_0": lambda: build_islands(0),
        "foreign_engine": lambda: LocalUpdates(
            [ShardedDataParallel(make_mlp(width=24), build_topology(), comm=CommConfig.preset("baseline"))],
            build_islands(2), OuterConfig()),
    }.items():
        try:
            call()
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    t = torch.ones(1)
    dist.all_reduce(t)
    errors["alive"] = t.item()
    return errors


def error_feedback_worker(rounds: int, numel: int, spec: QuantSpec = INT4_NEAREST) -> dict:
    """Biased random pseudo-gradients over `rounds` outer steps: running sums of the decoded
    averages with and without error feedback vs the exact one."""
    islands = build_islands(2)
    exact = ProcessExchange(islands.outer, numel, None, False)
    with_ef = ProcessExchange(islands.outer, numel, spec, True)
    without = ProcessExchange(islands.outer, numel, spec, False)
    sums = {"exact": 0.0, "ef": 0.0, "no_ef": 0.0}
    err_ef, err_no, step_err, p_max, residual_max = [], [], [], 0.0, 0.0
    for t in range(rounds):
        g = torch.Generator().manual_seed(1000 * t + dist.get_rank())
        p = 0.01 * (1.0 + torch.randn(numel, generator=g))  # a bias makes rounding errors add up
        p_max = max(p_max, p.abs().max().item())
        (e,), (q_ef,), (q_no,) = exact.average([p], t), with_ef.average([p], t), without.average([p], t)
        residual_max = max(residual_max, with_ef.residual[0].abs().max().item())
        step_err.append((q_no - e).abs().max().item())
        sums = {"exact": sums["exact"] + e, "ef": sums["ef"] + q_ef, "no_ef": sums["no_ef"] + q_no}
        err_ef.append((sums["ef"] - sums["exact"]).abs().max().item())
        err_no.append((sums["no_ef"] - sums["exact"]).abs().max().item())
    # Telescoping: sum of what was sent = sum of the inputs - the last residual, so the running sum
    # of averages differs from the exact one by the average residual of the own chunk.
    (mean_residual,) = exact.average(with_ef.residual, 0)
    identity_err = (sums["ef"] - (sums["exact"] - mean_residual)).abs().max().item()
    return {"err_ef": err_ef, "err_no": err_no, "step_err": step_err, "identity_err": identity_err,
            "residual_max": residual_max, "p_max": p_max}


# ---- tests --------------------------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_tau1_average_equals_data_parallel_and_compressed_islands_stay_identical():
    reports = spawn(workers.dp_equivalence_worker, 4, timeout_s=170)
    for K in (2, 4):
        r = reports[0][K]
        assert r["outer_steps"] == 5
        assert r["moved"] > 1e-2  # training moved the weights, so equality is not vacuous
        assert r["err"] < 1e-5 * r["moved"] + 1e-7, (K, r)
        assert r["inter_bytes"] > 0
    s = reports[0]["sdp4bit"]
    assert s["outer_steps"] == 4 and s["inter"] > 0
    assert s["losses"][-1] < 0.8 * s["losses"][0], s["losses"]


@pytest.mark.timeout(120)
def test_sign_momentum_matches_hand_computed_reference_for_two_outer_steps():
    """x_{t+1} = x_t (1 - wd*lr*eta) - lr*eta*sign(b1 m + (1-b1) d), m <- b2 m + (1-b2) d, with
    d = mean_i(x_t - x_end_i) / eta and eta the inner lr of the round's last step (defaults:
    lr 1.0, betas (0.95, 0.98), wd 0.2); m carries over from the first outer step to the second."""
    lrs = [1e-2, 2e-2, 1.5e-2, 3e-2]
    reports = spawn(workers.sign_momentum_worker, 2, 2, lrs, timeout_s=110)
    cfg = OuterConfig("sign-momentum", local_steps=2)
    assert (cfg.lr, cfg.betas, cfg.weight_decay) == (1.0, (0.95, 0.98), 0.2)
    beta1, beta2 = cfg.betas
    rounds0, rounds1 = reports[0]["rounds"], reports[1]["rounds"]
    assert len(rounds0) == len(rounds1) == 2
    m = torch.zeros_like(rounds0[0]["start"])
    for r0, r1 in zip(rounds0, rounds1):
        assert torch.equal(r0["start"], r1["start"]) and torch.equal(r0["after"], r1["after"])
        assert not torch.equal(r0["end"], r1["end"])  # the islands really trained apart
        eta = r0["lr"]
        gamma = cfg.lr * eta
        x = r0["start"]
        d = ((x - r0["end"]) + (x - r1["end"])) / 2 / eta
        c = beta1 * m + (1 - beta1) * d
        expected = x * (1 - cfg.weight_decay * gamma) - gamma * torch.sign(c)
        m = beta2 * m + (1 - beta2) * d
        torch.testing.assert_close(r0["after"], expected, rtol=0, atol=1e-6)
        # every coordinate with a nonzero direction moved by exactly gamma beyond the decay
        moved = (r0["after"] - x * (1 - cfg.weight_decay * gamma)).abs()
        assert torch.allclose(moved[c != 0], torch.full_like(moved[c != 0], gamma), atol=1e-6)
    # outer state sharded: each of the 2 ranks keeps half of the (padded) model's momentum
    assert reports[0]["momentum_numel"] * 2 >= rounds0[0]["start"].numel()
    assert reports[0]["momentum_numel"] < rounds0[0]["start"].numel()


@pytest.mark.timeout(120)
def test_outer_state_survives_checkpoint_resume_exactly(tmp_path):
    reports = spawn(workers.checkpoint_worker, 2, str(tmp_path / "ckpt"), timeout_s=110)
    for r in reports:
        assert r["saved_mid_round"] == 1  # saved inside a round: the start snapshot must survive
        assert r["has_residual"]
        assert r["state_restored"] and r["final_state_equal"] and r["final_equal"], r
        assert r["outer_steps"] == 3
    assert (tmp_path / "ckpt" / "COMPLETE").exists()  # one checkpoint holds both islands


def test_bad_configs_raise_value_errors():
    with pytest.raises(ValueError, match="local_steps"):
        OuterConfig(local_steps=0)
    with pytest.raises(ValueError, match="local_steps"):
        OuterConfig(local_steps=2.5)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        OuterConfig(optimizer="adam")
    with pytest.raises(ValueError, match="lr"):
        OuterConfig(lr=0.0)
    with pytest.raises(ValueError, match="weight_decay is only used"):
        OuterConfig("nesterov", weight_decay=0.1)
    with pytest.raises(ValueError, match=r"delay must be an integer in \[0, local_steps = 4\), got 4"):
        OuterConfig(local_steps=4, delay=4)
    with pytest.raises(ValueError, match="delay must be"):
        OuterConfig(delay=-1)
    with pytest.raises(ValueError, match="delay_mix must be none or a number in"):
        OuterConfig(delay=1, delay_mix=1.5)
    with pytest.raises(ValueError, match=r"delay_mix must be none or a number in \[0, 1\)"):
        OuterConfig(delay=1, delay_mix=1.0)  # the islands would never take the outer weights
    with pytest.raises(ValueError, match="delay_mix is only used with a delay"):
        OuterConfig(delay_mix=0.5)
    with pytest.raises(ValueError, match="spec"):
        OuterConfig(spec="int4")
    with pytest.raises(ValueError, match=r"outer.islands, outer.delay apply only to local updates"):
        OuterConfig("none", islands=2, delay=1)
    assert not OuterConfig("none", betas=[0.95, 0.98]).enabled  # the defaults, as a TOML list reads them
    with pytest.raises(ValueError, match=r"must divide the world size \(8\): choose one of \[1, 2, 4, 8\]"):
        check_islands(8, 3)
    assert check_islands(8, 4) == 2
    assert (OuterConfig("nesterov").lr, OuterConfig("nesterov").momentum) == (0.7, 0.9)
    assert OuterConfig("average").lr == 1.0


@pytest.mark.timeout(120)
def test_bad_layouts_raise_before_communicating():
    reports = spawn(workers.bad_layout_worker, 2, timeout_s=110)
    for r in reports:
        assert "must divide the world size (2)" in r["islands_3"]
        assert "positive integer" in r["islands_0"]
        assert "must be built on islands.worlds[i]" in r["foreign_engine"]
        assert r["alive"] == 2.0


@pytest.mark.timeout(120)
def test_error_feedback_keeps_accumulated_update_close_to_uncompressed():
    rounds = 30
    reports = spawn(workers.error_feedback_worker, 2, rounds, 1000, timeout_s=110)
    for r in reports:
        one_step = max(r["step_err"])
        assert one_step > 0  # int4 really loses something
        # bounded: never more than about one step's error, at any point of the run
        assert max(r["err_ef"]) <= 1.5 * one_step, (max(r["err_ef"]), one_step)
        # without error feedback the errors add up
        assert r["err_no"][-1] > 3 * r["err_ef"][-1], (r["err_no"][-1], r["err_ef"][-1])
        assert r["identity_err"] < 1e-6


def test_error_feedback_at_2_bits_keeps_the_residual_below_one_pseudo_gradient():
    """Symmetric int2, nearest rounding: the levels are -s, 0, +s with s = bf16_up(group absmax),
    so each value of x = p + r (pseudo-gradient plus the carried residual) is off by at most s/2.
    With P = max |p| and R_t = max |r_t|: R_t+1 <= (1 + e)(P + R_t) / 2, e = 2^-7 (one bf16 ulp
    on the scale), hence R_t <= P (1 + e) / (1 - e) for every t (R_0 = 0: by induction). The
    accumulated error of what the islands receive is the mean residual (the telescoping identity),
    so it obeys the same bound, at every outer step; without error feedback it grows with t."""
    rounds = 30
    reports = spawn(workers.error_feedback_worker, 2, rounds, 1000, INT2_NEAREST, timeout_s=110)
    eps = 2**-7
    for r in reports:
        bound = r["p_max"] * (1 + eps) / (1 - eps) * (1 + 1e-5)  # 1e-5: fp32 decode and sums
        assert max(r["step_err"]) > 0.1 * r["p_max"]  # 2 bits lose much: ~0.4 P per step here
        assert r["residual_max"] <= bound, (r["residual_max"], bound)
        assert max(r["err_ef"]) <= bound, (max(r["err_ef"]), bound)
        # without error feedback the rounding bias adds up: 3.9x the bound (9x the error with it) by step 30
        assert r["err_no"][-1] > 3 * bound, (r["err_no"][-1], bound)
        assert r["identity_err"] < 1e-6


def test_nesterov_and_average_match_torch_sgd():
    """DiLoCo's outer step is torch.optim.SGD(lr 0.7, momentum 0.9, nesterov=True) fed with the
    pseudo-gradient as the gradient; `average` with lr 1 lands on x - Delta."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(50, generator=g)
    deltas = [torch.randn(50, generator=g) for _ in range(3)]
    ours = x0.clone()
    outer = make_outer_optimizer(OuterConfig("nesterov"), 50, torch.device("cpu"))
    ref = x0.clone().requires_grad_()
    sgd = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=True)
    for delta in deltas:
        outer.step(ours, delta, inner_lr=3e-4)
        ref.grad = delta.clone()
        sgd.step()
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-6, atol=1e-6)
    avg = x0.clone()
    make_outer_optimizer(OuterConfig("average"), 50, torch.device("cpu")).step(avg, deltas[0], inner_lr=3e-4)
    torch.testing.assert_close(avg, x0 - deltas[0])


# ---- virtual islands == real islands ------------------------------------------------------------
ISLAND_STEPS, ISLAND_TAU = 6, 2
ISLAND_CONFIG = OuterConfig("sign-momentum", local_steps=ISLAND_TAU, spec=INT4_NEAREST)
# Delayed: each exchange applied 2 steps after its round's end (the all-gather waits across a step);
# 7 steps end inside the second exchange, which flush() applies.
DELAY_STEPS = 7
DELAY_CONFIG = OuterConfig("sign-momentum", local_steps=3, spec=INT4, delay=2)
ISLAND_RUNS = ((ISLAND_CONFIG, ISLAND_STEPS), (DELAY_CONFIG, DELAY_STEPS))


def _island_engine(model: nn.Module, world, island: int) -> ShardedDataParallel:
    return ShardedDataParallel(model, world, optim=AdamWConfig(lr=1e-2), comm=CommConfig.preset("sdp4bit"),
                               bucket_numel=300, seed=11 + island)


def real_islands_worker() -> list[dict]:
    """4 ranks as 2 islands of 2 emulated nodes x 1 rank: sdp4bit inside, int4 outer exchange; once
    synchronous, once delayed."""
    reports = []
    for config, steps in ISLAND_RUNS:
        islands = build_islands(2, gpus_per_node=1)
        model = make_mlp(width=24)
        engine = _island_engine(model, islands.worlds[0], islands.owned[0])
        local = LocalUpdates([engine], islands, config, seed=3)
        losses, applied = [], []
        for step in range(steps):
            x, y = regression_batch(step, dist.get_rank())
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            engine.step(lr=1e-2)
            applied.append(local.step(1e-2))
            engine.zero_grad()
            losses.append(loss.item())
        flushed = local.flush()
        engine.wait_weights()
        reports.append({"losses": losses, "params": flat_params(model), "island_bytes": local.stats.by_op(),
                        "island_totals": local.stats.totals(),
                        "inner_bytes": engine.stats.by_op(), "applied": applied, "flushed": flushed,
                        "outer_steps": local.outer_steps})
    return reports


def real_islands_resume_worker(path: str) -> dict:
    """real_islands_worker's delayed run, checkpointed right at its first round's end (the
    reduce-scatter in flight on the async process group) and resumed into fresh engines."""
    def build():
        islands = build_islands(2, gpus_per_node=1)
        model = make_mlp(width=24)
        engine = _island_engine(model, islands.worlds[0], islands.owned[0])
        return model, engine, LocalUpdates([engine], islands, DELAY_CONFIG, seed=3)

    def train(model, engine, local, steps: range) -> list[float]:
        losses = []
        for step in steps:
            x, y = regression_batch(step, dist.get_rank())
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            engine.step(lr=1e-2)
            local.step(1e-2)
            engine.zero_grad()
            losses.append(loss.item())
        return losses

    model, engine, local = build()
    losses = train(model, engine, local, range(3))
    stage, sent_before = local.pending, local.stats.totals()
    local.save_checkpoint(path, {"step": 3})
    model, engine, local = build()
    local.load_checkpoint(path)
    losses += train(model, engine, local, range(3, DELAY_STEPS))
    flushed = local.flush()
    engine.wait_weights()
    sent = local.stats.totals()
    return {"stage": stage, "losses": losses, "params": flat_params(model), "flushed": flushed,
            "sent": {k: sent_before[k] + sent[k] for k in sent}}


def virtual_islands_run(config: OuterConfig, steps: int) -> dict:
    """The same as one of real_islands_worker's runs, with K=2 islands of S=2 virtual ranks."""
    islands = virtual_islands(2, 2, gpus_per_node=1)
    models = [make_mlp(width=24) for _ in islands.owned]
    engines = [_island_engine(m, w, k) for k, (m, w) in enumerate(zip(models, islands.worlds))]
    local = LocalUpdates(engines, islands, config, seed=3)
    losses, applied = [[] for _ in range(4)], []
    for step in range(steps):
        for k, (model, engine) in enumerate(zip(models, engines)):
            for l in range(2):
                x, y = regression_batch(step, 2 * k + l)
                with engine.as_rank(l):
                    loss = ((model(x) - y) ** 2).mean()
                    loss.backward()
                losses[2 * k + l].append(loss.item())
        for engine in engines:
            engine.step(lr=1e-2)
        applied.append(local.step(1e-2))
        for engine in engines:
            engine.zero_grad()
    flushed = local.flush()
    inner = {}
    for engine in engines:
        engine.wait_weights()
        for op, row in engine.stats.by_op().items():
            inner[op] = {f: inner.get(op, {}).get(f, 0) + n for f, n in row.items()}
    return {"losses": losses, "params": [flat_params(m) for m in models], "island_bytes": local.stats.by_op(),
            "inner_bytes": inner, "applied": applied, "flushed": flushed, "outer_steps": local.outer_steps}


def test_virtual_islands_of_two_ranks_match_real_islands_bit_for_bit():
    """K=2 islands of S=2 ranks (2 emulated nodes each) with sdp4bit inside and int4 pseudo-gradients
    across, synchronous and delayed by 2 steps (async collectives on the gloo ranks, ending with a
    flush inside an exchange): the virtual islands (one process) give bit-identical losses of every
    rank and final weights of every island, and the same bytes as the 4 gloo ranks together."""
    real = spawn(real_islands_worker, 4, timeout_s=110)
    for run, (config, steps) in enumerate(ISLAND_RUNS):
        virtual = virtual_islands_run(config, steps)
        for rank in range(4):
            assert virtual["losses"][rank] == real[rank][run]["losses"], (run, rank)
            assert virtual["applied"] == real[rank][run]["applied"]
        for k in range(2):
            assert torch.equal(virtual["params"][k], real[2 * k][run]["params"]), (run, k)

        def together(key: str, run: int = run) -> dict:
            return {op: {f: sum(r[run][key][op][f] for r in real) for f in row}
                    for op, row in real[0][run][key].items()}
        assert virtual["island_bytes"] == together("island_bytes")
        assert virtual["inner_bytes"] == together("inner_bytes")
    sync, delayed = (virtual_islands_run(c, n) for c, n in ISLAND_RUNS)
    assert sync["applied"] == [False, True] * 3 and not sync["flushed"] and sync["outer_steps"] == 3
    # rounds end at steps 3 and 6; the first exchange is applied after step 5, the second by flush()
    assert delayed["applied"] == [False, False, False, False, True, False, False]
    assert delayed["flushed"] and delayed["outer_steps"] == 2
    assert not torch.equal(delayed["params"][0], delayed["params"][1])  # flushed 1 step in: progress kept


def test_real_islands_checkpointed_inside_a_delayed_exchange_resume_bit_identically(tmp_path):
    """On 4 gloo ranks (2 islands of 2): a checkpoint while the outer reduce-scatter is in flight
    (ProcessExchange's async wait) resumes to the uninterrupted run's losses, weights and bytes."""
    untouched = spawn(real_islands_worker, 4, timeout_s=110)
    resumed = spawn(real_islands_resume_worker, 4, str(tmp_path / "ckpt"), timeout_s=110)
    for rank in range(4):
        run = untouched[rank][1]  # ISLAND_RUNS[1]: the delayed run
        assert resumed[rank]["stage"] == "reducing" and resumed[rank]["flushed"] == run["flushed"]
        assert resumed[rank]["losses"] == run["losses"], rank
        assert torch.equal(resumed[rank]["params"], run["params"]), rank
        assert resumed[rank]["sent"] == run["island_totals"], rank  # no transfer lost or repeated


# ---- the delayed exchange -----------------------------------------------------------------------
def _virtual_one_rank_islands(config: OuterConfig, K: int = 2):
    islands = virtual_islands(K, 1)
    models = [make_mlp(width=24) for _ in islands.owned]
    engines = [ShardedDataParallel(m, w, optim=AdamWConfig(lr=1e-2), comm=CommConfig.preset("baseline"),
                                   grad_clip=None, bucket_numel=300, seed=k) for k, (m, w) in
               enumerate(zip(models, islands.worlds))]
    return models, engines, LocalUpdates(engines, islands, config)


def _inner_step(models, engines, step: int, S: int = 1) -> None:
    for k, (model, engine) in enumerate(zip(models, engines)):
        for l in range(S):
            x, y = regression_batch(step, S * k + l)
            with engine.as_rank(l):
                ((model(x) - y) ** 2).mean().backward()
    for engine in engines:
        engine.step(lr=1e-2)


@pytest.mark.parametrize("mix", [None, 0.0, 0.5])
def test_delayed_exchange_merges_the_new_outer_weights_into_each_islands_progress(mix):
    """`average` (the new outer weights are the islands' mean at the round's end), tau 2, delay 1:
    mix none adds the new outer weights - the island's round-end weights to its current ones
    (CoCoD-SGD); 0 replaces them (every island identical); 0.5 takes the halfway point. flush() at
    a round's end makes the islands identical, as a synchronous step does."""
    models, engines, local = _virtual_one_rank_islands(OuterConfig("average", local_steps=2, delay=1, delay_mix=mix))
    flat = LocalUpdates._flat_master
    ends, anchor, applied = None, local.start[0][: local.numel].clone(), []
    for step in range(6):
        _inner_step(models, engines, step)
        before = [flat(e, 0).clone() for e in engines]
        applied.append(local.step(1e-2))
        for engine in engines:
            engine.zero_grad()
        after = [flat(e, 0) for e in engines]
        if step % 2 == 1:  # a round's end: nothing applied yet, the exchange started
            assert all(torch.equal(a, b) for a, b in zip(before, after)) and local.pending == "reducing"
            ends = before
        elif ends is not None:
            new = local.start[0][: local.numel]
            torch.testing.assert_close(new, anchor - ((anchor - ends[0]) + (anchor - ends[1])) / 2, rtol=0, atol=1e-6)
            for b, a, e in zip(before, after, ends):
                if mix is None:
                    assert torch.equal(a, b + (new - e))
                elif mix == 0:
                    assert torch.equal(a, new)
                else:
                    torch.testing.assert_close(a, 0.5 * b + 0.5 * new, rtol=0, atol=1e-7)
            assert (mix == 0) == torch.equal(after[0], after[1])
            anchor = new.clone()
    assert applied == [False, False, True, False, True, False] and local.outer_steps == 2
    assert local.flush() and local.pending is None and local.outer_steps == 3
    assert torch.equal(flat(engines[0], 0), flat(engines[1], 0))
    assert torch.equal(flat(engines[0], 0), local.start[0][: local.numel])
    assert not local.flush()


def test_checkpoint_inside_a_delayed_exchange_resumes_bit_identically(tmp_path):
    """2 virtual islands of 2 ranks, int4 + EF, tau 3, delay 2: checkpoints right at a round's end
    (reduce-scatter in flight) and one step later (all-gather in flight); each resumed run ends
    bit-identical to the run that saved it and sends the bytes it had left, and saving changes
    neither the run nor its bytes."""
    config = OuterConfig("sign-momentum", local_steps=3, spec=INT4, delay=2)
    steps = 8

    def build():
        islands = virtual_islands(2, 2, gpus_per_node=1)
        models = [make_mlp(width=24) for _ in islands.owned]
        engines = [_island_engine(m, w, k) for k, (m, w) in enumerate(zip(models, islands.worlds))]
        return models, engines, LocalUpdates(engines, islands, config, seed=3)

    def train(models, engines, local, first: int, save_at: int = 0, stage: str = ""):
        sent_at_save = None
        for step in range(first, steps):
            _inner_step(models, engines, step, S=2)
            local.step(1e-2)
            for engine in engines:
                engine.zero_grad()
            if step + 1 == save_at:
                assert local.pending == stage
                sent_at_save = local.stats.totals()  # what the trainer records with the checkpoint
                local.save_checkpoint(tmp_path / str(save_at), {"step": save_at})
                assert local.stats.totals() == sent_at_save  # the save itself sends nothing
        for engine in engines:
            engine.wait_weights()
        return [flat_params(m) for m in models] + [t.clone() for t in local.start], local.stats.totals(), sent_at_save

    untouched, sent, _ = train(*build(), 0)
    for at, stage, stored in ((3, "reducing", "reduced"), (4, "gathering", "gathered")):
        saved, saved_sent, sent_before = train(*build(), 0, save_at=at, stage=stage)
        assert all(torch.equal(a, b) for a, b in zip(untouched, saved)) and saved_sent == sent, at
        models, engines, local = build()
        extra = local.load_checkpoint(tmp_path / str(at))
        assert extra["step"] == at and local.pending == stored and local.steps_since_sync == at - 3
        resumed, resumed_sent, _ = train(models, engines, local, at)
        assert all(torch.equal(a, b) for a, b in zip(resumed, untouched)), at
        assert {k: sent_before[k] + resumed_sent[k] for k in sent} == sent, at  # no transfer lost or repeated
    other = OuterConfig("sign-momentum", local_steps=3, spec=INT4, delay=1)
    islands = virtual_islands(2, 2, gpus_per_node=1)
    engines = [_island_engine(make_mlp(width=24), w, k) for k, w in enumerate(islands.worlds)]
    with pytest.raises(ValueError, match="resume with --outer.delay 2"):
        LocalUpdates(engines, islands, other, seed=3).load_checkpoint(tmp_path / "4")
