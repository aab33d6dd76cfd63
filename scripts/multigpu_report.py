"""Measured vs simulated step time of a `scripts/multigpu.sh` run on one host of 2 GPUs.

    python scripts/multigpu_report.py RUN_DIR

RUN_DIR holds what multigpu.sh and the one-GPU step profile wrote: train-2gpu-{nvlink,tcp}.json,
comm-2gpu-{nvlink,tcp}.json and train-1gpu-350m-1.3b.json (`halfbyte bench train` on one of the
GPUs, the compute input). Every input of `halfbyte simulate` comes from these files:
  - link: the bf16 ring collectives' wire rate at >= 64M values; all-to-all efficiency: the
    quantized reduce-scatters' rate over that; latency: the alpha of `simulate --calibrate`
  - compute: `--compute-from` the one-GPU run (waits removed, optimizer rescaled to 2 ranks)
  - codec rate: the model's codec bytes over the codec time measured in the NVLink run of the
    same model and mode (sdp4bit), so the model charges the codec what the engine spent
The TCP pass is 2 nodes x 1 GPU (every link on sockets), the NVLink pass 1 node x 2 GPUs.
Writes RUN_DIR/report.json and report.png; prints a markdown table.
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
LARGE = 64 * 2**20  # values: bandwidth-bound records only


def link(path: Path) -> dict:
    """Ring rate (bytes/s), all-to-all efficiency and per-step latency (s) from a bench comm JSON."""
    records = json.loads(path.read_text())["records"]
    ring = statistics.median(r["wire_GBps"] for r in records if r["mode"] == "bf16" and r["numel"] >= LARGE)
    a2a = statistics.median(r["wire_GBps"] for r in records
                            if r["collective"] == "reduce_scatter" and r["mode"] != "bf16" and r["numel"] >= LARGE)
    return {"GBps": ring, "all_to_all_efficiency": min(1.0, a2a / ring),
            "latency_s": calibrate(load_comm_records(path))["alpha_us"] / 1e6}


def rows_of(path: Path) -> dict[tuple[str, str], dict]:
    return {(r["model"], r["preset"]): r for r in json.loads(path.read_text())["rows"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    run = p.parse_args(argv).run_dir
    one_gpu = run / "train-1gpu-350m-1.3b.json"
    measured = {t: rows_of(run / f"train-2gpu-{t}.json") for t in ("nvlink", "tcp")}
    links = {t: link(run / f"comm-2gpu-{t}.json") for t in ("nvlink", "tcp")}
    models = sorted({m for m, _ in measured["tcp"]}, key=lambda m: cm.MODELS[m].params)

    table = []
    for model in models:
        compute, optimizer, forward, rank_tokens = measured_compute(one_gpu, model, 2)
        for transport, lk in links.items():
            rate = lk["GBps"] * 8  # Gb/s
            cluster = (cm.Cluster(2, 1, inter_gbps=rate, inter_latency_us=lk["latency_s"] * 1e6,
                                  all_to_all_efficiency=lk["all_to_all_efficiency"]) if transport == "tcp" else
                       cm.Cluster(1, 2, intra_gbps=rate, intra_latency_us=lk["latency_s"] * 1e6))
            wl = cm.Workload(compute_s=compute, tokens_per_step=2 * rank_tokens, optimizer_s=optimizer,
                             forward_fraction=forward, codec_tbps=1.0)
            # codec time is bytes / rate: its time at 1 TB/s over the measured time is the rate
            (at_one_tbps,) = cm.simulate(["sdp4bit"], cm.MODELS[model].params, cluster, wl)
            codec_tbps = at_one_tbps.codec_s / (measured["nvlink"][(model, "sdp4bit")]["codec_ms"] / 1e3)
            wl = dataclasses.replace(wl, codec_tbps=codec_tbps)
            base_tokens_per_s = measured[transport][(model, "baseline")]["tokens_per_s"]
            for est in cm.simulate(MODES, cm.MODELS[model].params, cluster, wl):
                row = measured[transport][(model, est.mode)]
                table.append({"model": model, "transport": transport, "mode": est.mode,
                              "measured_ms": row["step_ms"], "simulated_ms": est.step_s * 1e3,
                              "error": est.step_s * 1e3 / row["step_ms"] - 1,
                              "measured_tokens_per_s": row["tokens_per_s"],
                              "measured_speedup": row["tokens_per_s"] / base_tokens_per_s,
                              "simulated_speedup": est.speedup, "codec_tbps": codec_tbps})

    print("| model | link | mode | measured ms | simulated ms | error | measured speedup | simulated |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['model']} | {r['transport']} | {r['mode']} | {r['measured_ms']:.1f} | {r['simulated_ms']:.1f} | "
              f"{r['error']:+.1%} | {r['measured_speedup']:.2f}x | {r['simulated_speedup']:.2f}x |")
    device = json.loads((run / "train-2gpu-tcp.json").read_text())["meta"]["device"]
    command = "python scripts/multigpu_report.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (run / "report.json").write_text(json.dumps({"command": command, "device": f"2x {device}", "links": links,
                                                 "rows": table}, indent=1) + "\n")
    plot(table, models, run / "report.png")
    return 0


def plot(table: list[dict], models: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        for k, transport in enumerate(("nvlink", "tcp")):
            for j, mode in enumerate(MODES):
                (r,) = [r for r in table if (r["model"], r["transport"], r["mode"]) == (model, transport, mode)]
                x = k * (len(MODES) + 1) + j
                ax.bar(x, r["measured_tokens_per_s"] / 1e3, color=f"C{j}", label=mode if k == 0 else None)
                sim = r["measured_tokens_per_s"] * r["measured_ms"] / r["simulated_ms"]
                ax.plot([x - 0.4, x + 0.4], [sim / 1e3] * 2, color="black", lw=2,
                        label="simulated" if (k, j) == (0, 0) else None)
        ax.set_xticks([1, len(MODES) + 2], ["NVLink", "NCCL TCP sockets"])
        ax.set_ylabel("tokens/s (thousands)")
        ax.set_title(f"GPT {model}, 2 H200s")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
