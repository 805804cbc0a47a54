"""reproduce.py with a tiny preset in place of the scaled one, for trying the Slurm recipe in minutes on a CPU
(slurm/test-recipe.sh). Same command line as reproduce.py:

    PHYSIM_CMD="python slurm/tiny.py" sbatch ... slurm/physim.sbatch --seeds 2 --no-llc --runs
    python slurm/tiny.py --seeds 2 --out runs/tiny-one-call

The preset is the tests' smoke preset (16 particles, 64-step trajectories, a 2-block E = 16 model) with training
and LLC chains long enough to be stopped midway: 25 000 steps (about 75 s on one core, longer than the 20-50 s
after which a 1-minute Slurm job gets its SIGUSR1) and 3000-step chains (about 20 s an estimate, time to
scancel one). Two runs x 2 LLC checkpoints make 4 (run, checkpoint) pairs. One torch thread, so that
every call computes the same numbers whatever else shares the CPU. Each time a run's latest checkpoint is
loaded (first when its training starts) it logs "tiny.py: <run folder> resumes from step N" to stderr: the
test reads it to tell a resume from a restart at step 0.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository root

import torch  # noqa: E402

import physim as P  # noqa: E402
import reproduce  # noqa: E402

torch.set_num_threads(1)

reproduce.SCALED = reproduce.Preset(
    sim=P.SimConfig(n_particles=16, n_steps=64, box_width=10.0, box_height=6.0),
    model=P.ModelConfig(n_blocks=2, n_heads=2, embed_dim=16, scaled_io=True),
    data=P.DataConfig(chunk_trajectories=4, heldout_states=32, bootstrap=8),
    train=P.TrainConfig(steps=25_000, batch_size=8, log_checkpoints=8, even_checkpoints=20),   # ~75 s a run
    llc=P.LLCConfig(batch_size=4, steps=3000, burn_in=6, chains=2),                          # ~20 s an estimate
    llc_checkpoints=2, runs=1, rollout_states=2, rollout_steps=10, llc_loss="mean",
)

_load_latest = reproduce.load_latest_checkpoint


def _logged_load_latest(rdir):
    ckpt = _load_latest(rdir)
    step = ckpt["step"] if isinstance(ckpt, dict) and "step" in ckpt else 0
    print(f"tiny.py: {rdir} resumes from step {step}", file=sys.stderr, flush=True)
    return ckpt


reproduce.load_latest_checkpoint = _logged_load_latest


if __name__ == "__main__":
    sys.exit(reproduce.main(sys.argv[1:]))
