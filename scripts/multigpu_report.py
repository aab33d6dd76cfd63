"""Measured vs simulated step time of a `scripts/multigpu.sh` run on one host of 2 GPUs, both
engines side by side, and issue 21's targets.

    python scripts/multigpu_report.py RUN_DIR

RUN_DIR holds what multigpu.sh wrote: train-2gpu-{nvlink,tcp}.json (rows of halfbyte's engine and
of FSDP2), comm-2gpu-{nvlink,tcp}.json and train-1gpu-350m-1.3b.json (`halfbyte bench train` on one
of the GPUs, the compute input). Every input of `halfbyte simulate` comes from these files:
  - link: the bf16 ring collectives' wire rate at the largest size measured (>= 64M values on the
    GPUs: bandwidth-bound); all-to-all efficiency: the quantized reduce-scatters' rate over that;
    latency: the alpha of `simulate --calibrate`
  - compute: `--compute-from` the one-GPU run (waits removed, optimizer rescaled to 2 ranks)
  - codec rate: the model's codec bytes over the codec time measured in the NVLink run of the
    same model and mode (sdp4bit), so the model charges the codec what the engine spent
The TCP pass is 2 nodes x 1 GPU (every link on sockets), the NVLink pass 1 node x 2 GPUs.
The cost model prices halfbyte's engine. Of the FSDP2 rows it prices sdp4bit only, as the engine's
sdp4bit: the same bytes per step (qWD sends each difference once, the backward re-gather comes from
the replica; TLq-HS alike); FSDP2's plain and direct-weight rows re-gather in backward, which it
does not model (null). Overlap efficiency per row is the bench's (see halfbyte bench train --help).
Writes RUN_DIR/report.json and report.png; prints markdown tables and the targets.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

from halfbyte.bench import costmodel as cm
from halfbyte.bench.simulate import calibrate, load_comm_records, measured_compute

MODES = ["baseline", "zeropp", "sdp4bit"]
FSDP2_MODES = ["plain", "baseline", "zeropp", "sdp4bit"]


def link(path: Path) -> dict:
    """Ring rate (bytes/s), all-to-all efficiency and per-step latency (s) from a bench comm JSON."""
    records = json.loads(path.read_text())["records"]
    large = max(r["numel"] for r in records)  # the most bandwidth-bound size measured
    ring = statistics.median(r["wire_GBps"] for r in records if r["mode"] == "bf16" and r["numel"] == large)
    a2a = statistics.median(r["wire_GBps"] for r in records
                            if r["collective"] == "reduce_scatter" and r["mode"] != "bf16" and r["numel"] == large)
    return {"GBps": ring, "all_to_all_efficiency": min(1.0, a2a / ring),
            "latency_s": calibrate(load_comm_records(path))["alpha_us"] / 1e6}


def rows_of(path: Path, engine: str = "halfbyte") -> dict[tuple[str, str], dict]:
    """{(model, preset): row} of one engine's rows in a bench train JSON (older files: halfbyte's)."""
    return {(r["model"], r["preset"]): r for r in json.loads(path.read_text())["rows"]
            if r.get("engine", "halfbyte") == engine}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    run = p.parse_args(argv).run_dir
    one_gpu = run / "train-1gpu-350m-1.3b.json"
    # the passes that ran (a device call may have been lost): each is reported on its own
    transports = [t for t in ("nvlink", "tcp") if (run / f"train-2gpu-{t}.json").is_file()]
    if not transports:
        p.error(f"{run} holds neither train-2gpu-nvlink.json nor train-2gpu-tcp.json")
    measured = {t: rows_of(run / f"train-2gpu-{t}.json") for t in transports}
    fsdp2 = {t: rows_of(run / f"train-2gpu-{t}.json", "fsdp2") for t in transports}
    links = {t: link(run / f"comm-2gpu-{t}.json") for t in transports}
    params = {m: r["params"] for (m, _), r in measured[transports[-1]].items()}  # the models' own
    models = sorted(params, key=params.get)

    table, fsdp2_table = [], []
    for model in models:
        compute, optimizer, forward, rank_tokens = measured_compute(one_gpu, model, 2)
        for transport, lk in links.items():
            rate = lk["GBps"] * 8  # Gb/s
            cluster = (cm.Cluster(2, 1, inter_gbps=rate, inter_latency_us=lk["latency_s"] * 1e6,
                                  all_to_all_efficiency=lk["all_to_all_efficiency"]) if transport == "tcp" else
                       cm.Cluster(1, 2, intra_gbps=rate, intra_latency_us=lk["latency_s"] * 1e6))
            wl = cm.Workload(compute_s=compute, tokens_per_step=2 * rank_tokens, optimizer_s=optimizer,
                             forward_fraction=forward, codec_tbps=1.0)
            # codec time is bytes / rate: its time at 1 TB/s over the measured time is the rate (the
            # NVLink pass's, where waits for the link disturb it least)
            (at_one_tbps,) = cm.simulate(["sdp4bit"], params[model], cluster, wl)
            codec_from = measured["nvlink" if "nvlink" in measured else transport][(model, "sdp4bit")]
            codec_tbps = at_one_tbps.codec_s / (codec_from["codec_ms"] / 1e3)
            wl = dataclasses.replace(wl, codec_tbps=codec_tbps)
            base_tokens_per_s = measured[transport][(model, "baseline")]["tokens_per_s"]
            simulated = {est.mode: est for est in cm.simulate(MODES, params[model], cluster, wl)}
            for mode, est in simulated.items():
                row = measured[transport][(model, mode)]
                table.append({"model": model, "transport": transport, "mode": mode,
                              "measured_ms": row["step_ms"], "simulated_ms": est.step_s * 1e3,
                              "error": est.step_s * 1e3 / row["step_ms"] - 1,
                              "measured_tokens_per_s": row["tokens_per_s"],
                              "measured_speedup": row["tokens_per_s"] / base_tokens_per_s,
                              "simulated_speedup": est.speedup, "codec_tbps": codec_tbps,
                              "overlap_efficiency": row.get("overlap_efficiency")})
            rows = fsdp2[transport]
            plain = rows.get((model, "plain"))
            for mode in (m for m in FSDP2_MODES if (model, m) in rows):
                row, sim = rows[(model, mode)], simulated.get("sdp4bit") if mode == "sdp4bit" else None
                own = measured[transport].get((model, mode))
                fsdp2_table.append({
                    "model": model, "transport": transport, "mode": mode, "measured_ms": row["step_ms"],
                    "measured_tokens_per_s": row["tokens_per_s"],
                    "vs_fsdp2_plain": row["tokens_per_s"] / plain["tokens_per_s"] if plain else None,
                    "vs_halfbyte_engine": row["tokens_per_s"] / own["tokens_per_s"] if own else None,
                    "wire_MB_per_step": sum(row["wire_bytes_per_step"].values()) / 1e6,
                    "peak_mem_GB": row["peak_mem_bytes"] / 1e9, "replica_GB": row["replica_bytes"] / 1e9,
                    "overlap_efficiency": row["overlap_efficiency"],
                    "simulated_ms": sim.step_s * 1e3 if sim else None,
                    "error": sim.step_s * 1e3 / row["step_ms"] - 1 if sim else None})

    print("halfbyte's engine: measured vs simulated")
    print("| model | link | mode | measured ms | simulated ms | error | measured speedup | simulated | overlap |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['model']} | {r['transport']} | {r['mode']} | {r['measured_ms']:.1f} | {r['simulated_ms']:.1f} | "
              f"{r['error']:+.1%} | {r['measured_speedup']:.2f}x | {r['simulated_speedup']:.2f}x | "
              f"{_num(r['overlap_efficiency'], '.2f')} |")
    print("\nFSDP2 (plain: no halfbyte; the rest through quantize_comms)")
    print("| model | link | mode | step ms | tokens/s | vs FSDP2 plain | vs halfbyte engine | wire MB | "
          "peak GB | replica GB | overlap | simulated ms | error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in fsdp2_table:
        print(f"| {r['model']} | {r['transport']} | {r['mode']} | {r['measured_ms']:.1f} | "
              f"{r['measured_tokens_per_s']:,.0f} | {_num(r['vs_fsdp2_plain'], '.2f', 'x')} | "
              f"{_num(r['vs_halfbyte_engine'], '.2f', 'x')} | {r['wire_MB_per_step']:.0f} | {r['peak_mem_GB']:.1f} | "
              f"{r['replica_GB']:.2f} | {_num(r['overlap_efficiency'], '.2f')} | {_num(r['simulated_ms'], '.1f')} | "
              f"{_num(r['error'], '+.1%')} |")
    targets = issue21_targets(table, fsdp2_table, models[-1])
    print("\ntargets (issue 21, at the largest model):")
    for t in targets:
        verdict = "not measured" if t["met"] is None else "met" if t["met"] else "NOT met"
        print(f"- {t['target']}: {_num(t['value'], '.3f')} -> {verdict}")
    device = json.loads((run / f"train-2gpu-{transports[-1]}.json").read_text())["meta"]["device"]
    command = "python scripts/multigpu_report.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (run / "report.json").write_text(json.dumps({"command": command, "device": f"2x {device}", "links": links,
                                                 "rows": table, "fsdp2_rows": fsdp2_table, "targets": targets},
                                                indent=1) + "\n")
    plot(table, fsdp2_table, models, run / "report.png")
    return 0


def _num(value: float | None, fmt: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{fmt}}{unit}"


def issue21_targets(table: list[dict], fsdp2_table: list[dict], model: str) -> list[dict]:
    """Issue 21's targets, each with its measured value and whether it is met (None: not measured)."""
    def fsdp2_row(transport: str, mode: str) -> dict | None:
        return next((r for r in fsdp2_table if (r["model"], r["transport"], r["mode"]) == (model, transport, mode)),
                    None)

    def value(row: dict | None, key: str) -> float | None:
        return None if row is None else row[key]

    tcp, nvlink = fsdp2_row("tcp", "sdp4bit"), fsdp2_row("nvlink", "sdp4bit")
    errors = [abs(r["error"]) for r in table + fsdp2_table if r["error"] is not None]
    checks = [
        ("TCP: FSDP2 + sdp4bit tokens/s / FSDP2 plain >= 2.5", value(tcp, "vs_fsdp2_plain"), lambda v: v >= 2.5),
        ("TCP: FSDP2 + sdp4bit / halfbyte engine sdp4bit >= 0.95", value(tcp, "vs_halfbyte_engine"),
         lambda v: v >= 0.95),
        ("TCP: FSDP2 + sdp4bit overlap efficiency <= 1.15", value(tcp, "overlap_efficiency"), lambda v: v <= 1.15),
        ("NVLink: FSDP2 + sdp4bit tokens/s / FSDP2 plain >= 0.95", value(nvlink, "vs_fsdp2_plain"),
         lambda v: v >= 0.95),
        ("every simulated row within 15% of measured (largest |error|)", max(errors) if errors else None,
         lambda v: v <= 0.15),
    ]
    return [{"target": name, "value": v, "met": None if v is None else ok(v)} for name, v, ok in checks]


def plot(table: list[dict], fsdp2_table: list[dict], models: list[str], path: Path) -> None:
    """Tokens/s per model: one group of bars per pass, halfbyte's engine then FSDP2, a black tick
    at the simulated rate where the cost model prices the row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [("halfbyte", r) for r in table] + [("fsdp2", r) for r in fsdp2_table]
    labels = list(dict.fromkeys(f"{engine} {r['mode']}" for engine, r in bars))
    transports = list(dict.fromkeys(r["transport"] for _, r in bars))
    names = {"nvlink": "NVLink", "tcp": "NCCL TCP sockets"}
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        for k, transport in enumerate(transports):
            for engine, r in bars:
                if (r["model"], r["transport"]) != (model, transport):
                    continue
                j = labels.index(f"{engine} {r['mode']}")
                x = k * (len(labels) + 1) + j
                ax.bar(x, r["measured_tokens_per_s"] / 1e3, color=f"C{j}", label=labels[j] if k == 0 else None)
                if r["simulated_ms"] is not None:
                    sim = r["measured_tokens_per_s"] * r["measured_ms"] / r["simulated_ms"]
                    ax.plot([x - 0.4, x + 0.4], [sim / 1e3] * 2, color="black", lw=2)
        ax.set_xticks([k * (len(labels) + 1) + (len(labels) - 1) / 2 for k in range(len(transports))],
                      [names[t] for t in transports])
        ax.set_ylabel("tokens/s (thousands)")
        ax.set_title(f"GPT {model}, 2 GPUs (black: simulated)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
