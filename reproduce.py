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
import math
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
from physim import DataConfig, LLCConfig, ModelConfig, SimConfig, TrainConfig  # noqa: E402

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
    llc: LLCConfig = field(default_factory=LLCConfig)  # Table 1
    llc_checkpoints: int = 32      # LLC at this many checkpoints, log-spaced from 1% of training to its end ...
    llc_heads: int = 8             # ... for up to this many collision heads per run (best first) plus one
                                   #     non-collision head


FULL = Preset()
# Scaled down so that one run trains, is measured, rolled out and LLC-estimated on a 2-core CPU in
# <= 15 minutes. The physics is Table 3 unchanged. The model is smaller (L = 3, E = 64, 8 heads of
# width 8, 160k parameters instead of 830k) and trains with batch 16 for 23 000 steps at lr 2e-3
# instead of batch 64 for 64 000 steps at 1e-3 (an 11x smaller sample budget, partly made up by the
# larger step). The LLC uses Table 1's γ and nβ but ε = 1e-3 and far shorter chains (see README).
SCALED = Preset(
    model=ModelConfig(n_blocks=3, n_heads=8, embed_dim=64),
    train=TrainConfig(steps=23_000, batch_size=16, lr=2e-3, log_checkpoints=32, even_checkpoints=46),
    runs=1, rollout_states=8, rollout_steps=1000,
    llc=LLCConfig(step_size=1e-3, batch_size=8, steps=100, burn_in=60, chains=4),
    llc_checkpoints=5, llc_heads=8,
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
        run_llc(preset, rdir, device, label=f"run {run + 1}/{preset.runs}")
    summary = write_report(preset, out, device)
    summary["wall_seconds_this_call"] = round(time.time() - t0, 1)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def llc_steps(steps, n: int) -> list[int]:
    """n of the checkpoint steps, spread evenly in log(step) from 1% of training to its end (Fig. 1).
    Earlier the model is far from any minimum: SGLD then only descends and the LLC is undefined."""
    positive = [int(s) for s in steps if s >= steps[-1] / 100]
    targets = np.geomspace(positive[0], positive[-1], n)
    return sorted({min(positive, key=lambda s: abs(math.log(s / t))) for t in targets})


def llc_heads(final_score: np.ndarray, n: int) -> list[tuple[int, int]]:
    """The heads whose LLC is estimated: up to n true collision heads (best first; the best head if
    none reached the threshold) and the head whose final score is closest to 0."""
    H = final_score.shape[1]
    flat = final_score.reshape(-1)
    order = np.argsort(-flat)
    chosen = [divmod(int(i), H) for i in order if flat[i] >= TRUE_HEAD][:n] or [divmod(int(order[0]), H)]
    quiet = divmod(int(np.abs(flat).argmin()), H)
    return chosen + [quiet] if quiet not in chosen else chosen


def paired_trace(r: physim.LLCResult, thin: int) -> torch.Tensor:
    """L(w0) + L_m(w_t) − L_m(w0) per chain, averaged over windows of `thin` steps: (C, T // thin)."""
    paired = r.traces - r.w0_traces + torch.tensor(r.init_loss)[:, None]
    return paired[:, :paired.shape[1] // thin * thin].reshape(len(paired), -1, thin).mean(-1)


def run_llc(preset: Preset, rdir: str, device: str, label: str) -> None:
    """The parameter-restricted LLC (Appendix B) of the chosen heads at checkpoints spread over
    training, all heads x chains batched per SGLD step. One JSON per checkpoint under rdir/llc/ (with
    each chain's trace with minibatch noise paired out, L(w0) + L_m(w_t) − L_m(w0), averaged down to
    <= 500 points for plotting), collected in rdir/llc.csv."""
    steps, score, _ = read_metrics(rdir)
    heads = llc_heads(score[-1], preset.llc_heads)
    llc_dir = os.path.join(rdir, "llc")
    os.makedirs(llc_dir, exist_ok=True)
    # Each chain draws fresh pairs from chunks of 8 new trajectories (8192 pairs): enough for short
    # chains without simulating far more than they use.
    data = physim.simulator_batches(preset.sim, DataConfig(chunk_trajectories=8), preset.llc.batch_size, device)
    chosen = llc_steps(steps, preset.llc_checkpoints)
    for i, step in enumerate(chosen):
        path = os.path.join(llc_dir, f"step_{step:07d}.json")
        if os.path.exists(path):
            continue
        model = physim.model_from_checkpoint(physim.load_checkpoint(physim.checkpoint_path(rdir, step)), device)
        results = physim.estimate_llc(model, torch.nn.functional.mse_loss, data,
                                      [physim.head_parameters(model, l, h) for l, h in heads], preset.llc,
                                      label=f"{label} LLC at step {step} ({i + 1}/{len(chosen)})")
        thin = max(1, preset.llc.steps // 500)
        record = {"step": step, "trace_thinning": thin, "heads": [
            {"layer": l, "head": h, "llc": r.llc, "llc_stderr": r.llc_stderr, "chain_llc": r.chain_llc,
             "init_loss": r.init_loss, "health": r.health,
             "trace": paired_trace(r, thin).tolist()}
            for (l, h), r in zip(heads, results)]}
        physim._atomic_write(path, lambda tmp: json.dump(record, open(tmp, "w")))
    rows = []
    for step in chosen:
        with open(os.path.join(llc_dir, f"step_{step:07d}.json")) as f:
            for r in json.load(f)["heads"]:
                rows.append({"step": step, "layer": r["layer"], "head": r["head"], "llc": r["llc"],
                             "llc_stderr": r["llc_stderr"], "healthy_chains": r["health"].count("healthy"),
                             "chains": len(r["health"]),
                             "unhealthy": "; ".join(f"chain {c}: {h}" for c, h in enumerate(r["health"]) if h != "healthy")})
    physim._write_csv(os.path.join(rdir, "llc.csv"), rows)


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
    llc_rows = []
    for run, (steps, _, corr) in enumerate(metrics):
        llc_rows += plot_llc(run_dir(out, run), steps, corr, metrics[run][1][-1], preset, fig_dir, run)
    finals = np.array([r["collision_score"] for r in final_rows])
    sims = [json.load(open(os.path.join(run_dir(out, r), "simulator.json"))) for r in range(preset.runs)]
    return {
        "true_collision_heads": int((finals >= TRUE_HEAD).sum()),
        "heads": int(finals.size),
        "heads_below_0.2": int((finals < 0.2).sum()),
        "best_head": max(final_rows, key=lambda r: r["collision_score"]),
        "one_step_position_error": [s["one_step_position_error"] for s in sims],
        "llc_estimates": len(llc_rows),
        "llc_unhealthy_chains": sum(r["chains"] - r["healthy_chains"] for r in llc_rows),
        "llc_chains": sum(r["chains"] for r in llc_rows),
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
           title=f"Collision detection scores of all {metrics[0][1][0].size} heads of {len(metrics)} run(s) over training")
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


def plot_llc(rdir: str, steps, corr, final_score, preset: Preset, fig_dir: str, run: int) -> list[dict]:
    """Fig. 1 (top) for every head with LLC estimates: |c(t)| on log-log axes and the LLC (mean over
    healthy chains ± standard error) on a second axis against the same step; and its SGLD trace plots
    (loss vs step for every chain, burn-in and L(w0) marked, unhealthy chains in red)."""
    with open(os.path.join(rdir, "llc.csv")) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key in ("step", "layer", "head", "healthy_chains", "chains"):
            r[key] = int(r[key])
    records = {}
    for name in sorted(os.listdir(os.path.join(rdir, "llc"))):
        with open(os.path.join(rdir, "llc", name)) as f:
            record = json.load(f)
        records[record["step"]] = record
    t = steps > 0
    for l, h in sorted({(r["layer"], r["head"]) for r in rows}):
        mine = [r for r in rows if (r["layer"], r["head"]) == (l, h)]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.loglog(steps[t], np.abs(corr[t, l, h]), color="tab:blue", label="|c(t)|")
        ax.set(xlabel="training step t", ylabel="|c(t)|, attention-distance correlation",
               title=f"run {run}, head {l}-{h} (final collision score {final_score[l, h]:.2f})")
        ax2 = ax.twinx()
        ax2.errorbar([r["step"] for r in mine], [float(r["llc"]) for r in mine],
                     yerr=[float(r["llc_stderr"]) for r in mine], color="tab:green", marker="o", ms=3,
                     label="LLC (healthy chains)")
        ax2.set_ylabel("parameter-restricted LLC", color="tab:green")
        fig.legend(loc="upper right", fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(fig_dir, f"llc_run{run}_head{l}-{h}.png"), dpi=120)
        plt.close(fig)

        cols = min(len(mine), 4)
        nrows = math.ceil(len(mine) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.6 * nrows), squeeze=False)
        for ax, r in zip(axes.flat, mine):
            record = records[r["step"]]
            head = next(x for x in record["heads"] if (x["layer"], x["head"]) == (l, h))
            x = (np.arange(len(head["trace"][0])) + 0.5) * record["trace_thinning"]
            for c, (trace, health) in enumerate(zip(head["trace"], head["health"])):
                ax.plot(x, trace, lw=0.6, color="tab:red" if health != "healthy" else None)
            ax.axvline(preset.llc.burn_in, color="black", ls=":", lw=0.8)
            ax.axhline(np.mean(head["init_loss"]), color="black", ls="--", lw=0.8)
            ax.set_title(f"step {r['step']}: LLC {float(r['llc']):.3g}, {r['healthy_chains']}/{r['chains']} healthy",
                         fontsize=7)
            ax.tick_params(labelsize=6)
        for ax in list(axes.flat)[len(mine):]:
            ax.axis("off")
        fig.suptitle(f"SGLD traces, run {run}, head {l}-{h}: L(w0) + L_m(w_t) - L_m(w0) per chain (minibatch noise "
                     "paired out); dotted = burn-in, dashed = L(w0), red = unhealthy", fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(fig_dir, f"llc_traces_run{run}_head{l}-{h}.png"), dpi=110)
        plt.close(fig)
    return rows


def plot_energy(out: str, preset: Preset, path: str) -> None:
    """Fig. 7: mean total energy along a rollout of each trained model and of the ground truth."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in range(preset.runs):
        with open(os.path.join(run_dir(out, run), "simulator.json")) as f:
            result = json.load(f)
        if run == 0:
            ax.plot(result["energy_true"], color="black", lw=2, label="ground truth")
        ax.plot(result["energy_model"], lw=1, label=f"model, run {run}")
    ax.set_yscale("log")                   # a model that gains energy would otherwise flatten the truth
    ax.set(xlabel="simulation step", ylabel="total energy (reduced units, log scale)",
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
# Benchmarks (python reproduce.py bench)
# ----------------------------------------------------------------------------------------------------

def bench(device: str, out: str) -> list[dict]:
    """estimate_llc on the scaled-down physics model restricted to one head: 8 chains batched in one
    vmap against the same 8 chains run one after another in a Python loop, both measured in this
    run, at the scaled-down run's minibatch (m = 8) and at Table 1's (m = 256). Reports chain-steps
    per second and their ratio."""
    torch.manual_seed(0)
    model = physim.ParticleTransformer(SCALED.model, SCALED.sim).to(device)
    head = physim.head_parameters(model, 1, 0)
    mse = torch.nn.functional.mse_loss

    def timed(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    states = physim.simulate_states(SCALED.sim, 4, seed=0, device=device)          # (4, T+1, N, 4)
    x, y = states[:, :-1].flatten(0, 1), states[:, 1:].flatten(0, 1)     # a fixed pool: time SGLD, not data
    rows = []
    for m, steps in ((8, 40), (256, 8)):
        cfg = LLCConfig(batch_size=m, steps=steps, burn_in=steps // 2, chains=8)
        alone = [LLCConfig(**{**asdict(cfg), "chains": 1, "seed": cfg.seed + c}) for c in range(cfg.chains)]
        data = physim.dataset_batches(x, y, m)
        physim.estimate_llc(model, mse, data, head, alone[0])                # warm-up
        t_loop = timed(lambda: [physim.estimate_llc(model, mse, data, head, c) for c in alone])
        t_batch = timed(lambda: physim.estimate_llc(model, mse, data, head, cfg))
        chain_steps = cfg.chains * cfg.steps
        rows.append({"benchmark": f"SGLD on one head, 8 chains, m={m}",
                     "baseline (chains in a Python loop) chain-steps/s": round(chain_steps / t_loop, 1),
                     "ours (chains batched by vmap) chain-steps/s": round(chain_steps / t_batch, 1),
                     "speedup": round(t_loop / t_batch, 2), "device": device, "threads": torch.get_num_threads()})
    os.makedirs(out, exist_ok=True)
    physim._write_csv(os.path.join(out, "bench.csv"), rows)
    return rows


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Reproduce 'Emergence of Computational Structure in a Neural Network Physics Simulator'.")
    parser.add_argument("command", nargs="?", choices=["run", "bench"], default="run",
                        help="run: train, measure and draw everything (default); bench: time the batched "
                             "parts against plain baselines and write bench.csv")
    parser.add_argument("--full", action="store_true",
                        help="the paper's configuration (Tables 2-4, five runs of 64 000 steps); default is "
                             "the scaled-down run that fits a 2-core CPU in 15 minutes")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where to compute: auto picks cuda when available (default: auto)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: runs/full with --full, runs/bench for bench, else "
                             "runs/scaled); re-running into the same folder resumes")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    preset = FULL if args.full else SCALED
    out = args.out or os.path.join("runs", "bench" if args.command == "bench" else "full" if args.full else "scaled")
    try:
        device = resolve_device(args.device)
        t0 = time.time()
        if args.command == "bench":
            rows = bench(device, out)
            print("| " + " | ".join(rows[0]) + " |\n|" + " --- |" * len(rows[0]))
            for r in rows:
                print("| " + " | ".join(str(v) for v in r.values()) + " |")
            return 0
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
