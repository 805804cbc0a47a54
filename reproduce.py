"""Reproduce the paper's figures with physim.

    python reproduce.py                 # scaled-down run: one small model, a 2-core CPU, <= 15 minutes
    python reproduce.py --full          # the paper's scale (Tables 2-4, five runs): wants a GPU
    python reproduce.py --out DIR --device auto|cpu|cuda

Everything goes under one output folder (default runs/scaled or runs/full): per run its checkpoints,
metrics.csv (step x layer x head -> collision score, c), losses.csv and simulator.json; figures/ with
the paper-style figures; final_heads.csv and summary.json. Re-running the same command after an
interruption resumes: finished runs and rollouts are kept, an unfinished run continues from its
latest checkpoint.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import physim  # noqa: E402
from physim import DataConfig, ModelConfig, SimConfig, TrainConfig  # noqa: E402

TRUE_HEAD = 0.8  # a head whose final collision score is >= 0.8 counts as a true collision-detection head


@dataclass
class Preset:
    """One reproduction: the physics, the model, training, data, how many runs, the rollout."""
    sim: SimConfig = field(default_factory=SimConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    runs: int = 5                  # Table 2: five runs, seeds 0..4
    rollout_states: int = 16       # Appendix D.2: initial states averaged over in Fig. 7 ...
    rollout_steps: int = 1000      # ... for a 1000-step simulation


FULL = Preset()
# Scaled down so that one run trains, is measured and rolled out on a 2-core CPU in <= 15 minutes.
# The physics is Table 3 unchanged; the model is smaller (L=3, E=64, 8 heads of width 8) and trains
# with batch 16 for 12 000 steps instead of batch 64 for 64 000; see README for what this changes.
SCALED = Preset(
    model=ModelConfig(n_blocks=3, n_heads=8, embed_dim=64),
    train=TrainConfig(steps=12_000, batch_size=16, log_checkpoints=40, even_checkpoints=60),
    runs=1, rollout_states=8, rollout_steps=1000,
)


# ----------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------

def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but this torch build sees no CUDA device")
    return name


def run_dir(out: str, run: int) -> str:
    return os.path.join(out, f"run{run}")


def reproduce(preset: Preset, out: str, device: str) -> dict:
    """Train every run, roll each model out, then draw the figures and write the tables."""
    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    config_path = os.path.join(out, "config.json")
    config = {"sim": asdict(preset.sim), "model": asdict(preset.model), "train": asdict(preset.train),
              "data": asdict(preset.data), "runs": preset.runs, "rollout_states": preset.rollout_states,
              "rollout_steps": preset.rollout_steps}
    if os.path.exists(config_path):
        with open(config_path) as f:
            physim._require(json.load(f) == config, f"{out} holds results of a different configuration; "
                                                    "choose another --out")
    else:
        with open(config_path, "w") as f:
            json.dump(config, f, indent=1)
    for run in range(preset.runs):
        rdir = run_dir(out, run)
        train_cfg = TrainConfig(**{**asdict(preset.train), "seed": run})
        model = physim.train(rdir, preset.sim, preset.model, train_cfg, preset.data, device,
                             label=f"run {run + 1}/{preset.runs} training")
        sim_path = os.path.join(rdir, "simulator.json")
        if not os.path.exists(sim_path):
            print(f"run {run + 1}/{preset.runs}: rolling the model out for {preset.rollout_steps} steps",
                  file=sys.stderr)
            result = physim.evaluate_simulator(model, preset.rollout_states, preset.rollout_steps)
            physim._atomic_write(sim_path, lambda tmp: json.dump(result, open(tmp, "w")))
    summary = write_report(preset, out, device)
    summary["wall_seconds_this_call"] = round(time.time() - t0, 1)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


# ----------------------------------------------------------------------------------------------------
# Tables and figures
# ----------------------------------------------------------------------------------------------------

def read_metrics(rdir: str):
    """metrics.csv -> steps (T,), collision scores (T, L, H), correlations (T, L, H)."""
    with open(os.path.join(rdir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    steps = sorted({int(r["step"]) for r in rows})
    L = 1 + max(int(r["layer"]) for r in rows)
    H = 1 + max(int(r["head"]) for r in rows)
    score, corr = np.zeros((len(steps), L, H)), np.zeros((len(steps), L, H))
    index = {s: i for i, s in enumerate(steps)}
    for r in rows:
        i, l, h = index[int(r["step"])], int(r["layer"]), int(r["head"])
        score[i, l, h], corr[i, l, h] = float(r["collision_score"]), float(r["correlation"])
    return np.array(steps), score, corr


def write_report(preset: Preset, out: str, device: str) -> dict:
    fig_dir = os.path.join(out, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    metrics = [read_metrics(run_dir(out, r)) for r in range(preset.runs)]
    final_rows = []
    for run, (steps, score, corr) in enumerate(metrics):
        for l in range(score.shape[1]):
            for h in range(score.shape[2]):
                final_rows.append({"run": run, "layer": l, "head": h, "collision_score": round(float(score[-1, l, h]), 4),
                                   "correlation": round(float(corr[-1, l, h]), 4)})
        plot_correlations(steps, score, corr, os.path.join(fig_dir, f"correlation_run{run}.png"), run)
        plot_attention(run_dir(out, run), score[-1], preset, os.path.join(fig_dir, f"attention_run{run}.png"),
                       device)
    physim._write_csv(os.path.join(out, "final_heads.csv"), final_rows)
    plot_score_histogram(metrics, preset.train, os.path.join(fig_dir, "collision_scores.png"))
    plot_energy(out, preset, os.path.join(fig_dir, "energy.png"))
    plot_losses(out, preset, os.path.join(fig_dir, "losses.png"))
    finals = np.array([r["collision_score"] for r in final_rows])
    sims = [json.load(open(os.path.join(run_dir(out, r), "simulator.json"))) for r in range(preset.runs)]
    return {
        "true_collision_heads": int((finals >= TRUE_HEAD).sum()),
        "heads": int(finals.size),
        "heads_below_0.2": int((finals < 0.2).sum()),
        "best_head": max(final_rows, key=lambda r: r["collision_score"]),
        "one_step_position_error": [s["one_step_position_error"] for s in sims],
    }


def plot_score_histogram(metrics, train_cfg: TrainConfig, path: str) -> None:
    """Fig. 2: the distribution of every head's collision score over training, as a 2-D histogram.
    Only the evenly spaced checkpoints enter, so every stretch of training weighs the same; colours
    saturate at the 95th percentile of the density, as in the paper."""
    even = set(np.linspace(0, train_cfg.steps, train_cfg.even_checkpoints + 1).round().astype(int).tolist())
    xs, ys = [], []
    for steps, score, _ in metrics:
        keep = np.isin(steps, list(even))
        n_heads = score.shape[1] * score.shape[2]
        xs.append(np.repeat(steps[keep], n_heads))
        ys.append(score[keep].reshape(-1))
    xs, ys = np.concatenate(xs), np.concatenate(ys)
    hist, xe, ye = np.histogram2d(xs, ys, bins=[train_cfg.even_checkpoints + 1, 40],
                                  range=[[-train_cfg.steps / train_cfg.even_checkpoints / 2,
                                          train_cfg.steps * (1 + 0.5 / train_cfg.even_checkpoints)], [0, 1]])
    vmax = np.percentile(hist[hist > 0], 95) if (hist > 0).any() else 1
    fig, ax = plt.subplots(figsize=(8, 4))
    mesh = ax.pcolormesh(xe, ye, hist.T, cmap="magma", vmax=vmax)
    fig.colorbar(mesh, ax=ax, label="number of heads (clipped at 95th percentile)")
    ax.set(xlabel="training step", ylabel="collision detection score",
           title=f"Collision detection scores of all {len(metrics)}x{metrics[0][1][0].size} heads over training")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_correlations(steps, score, corr, path: str, run: int) -> None:
    """|c(t)| on log-log axes for every head, a panel per block (cf. Fig. 1 top); true
    collision-detection heads (final score >= 0.8) drawn bold."""
    L, H = score.shape[1:]
    fig, axes = plt.subplots(1, L, figsize=(4 * L, 3.6), sharey=True, squeeze=False)
    t = steps > 0
    for l, ax in enumerate(axes[0]):
        for h in range(H):
            final = score[-1, l, h]
            ax.loglog(steps[t], np.abs(corr[t, l, h]), lw=2.2 if final >= TRUE_HEAD else 0.9,
                      label=f"head {l}-{h} ({final:.2f})")
        ax.set(title=f"run {run}, block {l}", xlabel="training step t")
        ax.legend(fontsize=6, title="head (final score)", title_fontsize=6)
    axes[0, 0].set_ylabel("|c(t)|, attention-distance correlation")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_attention(rdir: str, final_score: np.ndarray, preset: Preset, path: str, device: str) -> None:
    """Fig. 3: attention of the best head and of a non-collision head, on a free-fall state and on a
    settled state of a held-out trajectory; a line per pair (i -> j), opacity = attention α_ij."""
    ckpt = physim.load_checkpoint(physim.latest_checkpoint(rdir))
    model = physim.model_from_checkpoint(ckpt, device)
    trajectories, _, _ = physim.heldout_set(preset.sim, preset.data, device)
    states = torch.stack([trajectories[0, 30], trajectories[0, -1]])        # free fall, settled
    with torch.no_grad():
        _, attn = model(states, return_attention=True)                    # (L, 2, H, N, N+1)
    flat = final_score.reshape(-1)
    H = final_score.shape[1]
    heads = [divmod(int(flat.argmax()), H), divmod(int(np.abs(flat).argmin()), H)]
    fig, axes = plt.subplots(2, 2, figsize=(12, 6.5))
    for col, (l, h) in enumerate(heads):
        for row, name in enumerate(["free fall (t = 30)", f"settled (t = {preset.sim.n_steps})"]):
            ax = axes[row, col]
            p = states[row, :, :2].cpu().numpy()
            a = attn[l, row, h, :, :-1].cpu().numpy()                          # (N, N), zero slot dropped
            i, j = np.nonzero(a > 0.02)
            segments = np.stack([p[i], p[j]], 1)
            colors = np.zeros((len(i), 4))
            colors[:, 0], colors[:, 3] = 0.85, a[i, j]
            ax.add_collection(matplotlib.collections.LineCollection(segments, colors=colors, linewidths=1.2))
            for xy in p:
                ax.add_patch(plt.Circle(xy, preset.sim.diameter / 2, fill=False, lw=0.6, color="0.3"))
            ax.set(xlim=(0, preset.sim.box_width), ylim=(0, preset.sim.box_height), aspect="equal",
                   xticks=[], yticks=[])
            ax.set_title(f"head {l}-{h} (score {final_score[l, h]:.2f}), {name}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_energy(out: str, preset: Preset, path: str) -> None:
    """Fig. 7: mean total energy along a rollout of each trained model and of the ground truth."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in range(preset.runs):
        with open(os.path.join(run_dir(out, run), "simulator.json")) as f:
            result = json.load(f)
        if run == 0:
            ax.plot(result["energy_true"], color="black", lw=2, label="ground truth")
        ax.plot(result["energy_model"], lw=1, label=f"model, run {run}")
    ax.set(xlabel="simulation step", ylabel="total energy (reduced units)",
           title=f"Energy along {preset.rollout_steps}-step simulations (mean of {preset.rollout_states} states)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_losses(out: str, preset: Preset, path: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in range(preset.runs):
        with open(os.path.join(run_dir(out, run), "losses.csv")) as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) > 0]
        steps = [int(r["step"]) for r in rows]
        ax.loglog(steps, [float(r["train_loss"]) for r in rows], lw=0.8, label=f"train (mean since last checkpoint), run {run}")
        ax.loglog(steps, [float(r["heldout_loss"]) for r in rows], lw=1.5, label=f"held out, run {run}")
    ax.set(xlabel="training step", ylabel="next-state MSE")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Reproduce 'Emergence of Computational Structure in a Neural Network Physics Simulator'.")
    parser.add_argument("--full", action="store_true",
                        help="the paper's configuration (Tables 2-4, five runs of 64 000 steps); default is "
                             "the scaled-down run that fits a 2-core CPU in 15 minutes")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where to compute: auto picks cuda when available (default: auto)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: runs/full with --full, else runs/scaled); re-running "
                             "into the same folder resumes")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    preset = FULL if args.full else SCALED
    out = args.out or os.path.join("runs", "full" if args.full else "scaled")
    try:
        device = resolve_device(args.device)
        t0 = time.time()
        summary = reproduce(preset, out, device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done in {time.time() - t0:.0f} s on {device}: {summary['true_collision_heads']} of "
          f"{summary['heads']} heads end with collision score >= {TRUE_HEAD}, {summary['heads_below_0.2']} "
          f"below 0.2; best head {summary['best_head']}. Results in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
