"""Reproduce the paper's figures with physim.

    python reproduce.py                 # scaled-down run: one small model, a 2-core CPU, 12-15 minutes
    python reproduce.py --full          # the paper's scale (Tables 1-4, five runs): wants a GPU
    python reproduce.py --medium        # the paper's training recipe on a smaller model: about 3 hours on a 2-core CPU
    python reproduce.py --full --runs 0,3   # only these runs (shards of one results folder)
    python reproduce.py --full --llc-shard 3/16 --time-limit 3h50m   # a job's share of the LLC stage
    python reproduce.py --report DIR    # rebuild every figure and table and DIR/REPORT.md, no training
    python reproduce.py bench           # batched paths vs plain baselines; projected hours here

Everything goes under one output folder (default runs/scaled, runs/medium or runs/full; README: "What a run
writes"). Re-running the same command after an interruption resumes (from the latest checkpoint or saved chains).
"""

from __future__ import annotations

import argparse, contextlib, csv, glob, io, itertools, json, math, os, re, signal, sys, tempfile, textwrap, time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from typing import NamedTuple

import matplotlib
matplotlib.use("Agg")
import matplotlib.collections  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import physim  # noqa: E402
from physim import DataConfig, LLCConfig, ModelConfig, SimConfig, TrainConfig  # noqa: E402

TRUE_HEAD = physim.TRUE_HEAD_SCORE
# On the CPU, vmap runs the fused attention once per chain (no batching rule yet): still the faster path.
warnings.filterwarnings("ignore", message=".*batching rule for aten::_scaled_dot_product")

def check(ok: bool, message: str) -> None:
    """Raise the one clear error (a line of `error: ...`) that a bad argument or file gets."""
    if not ok:
        raise ValueError(message)

# --- Presets: the paper's scale (--full), the medium run and the default scaled-down run ------------------------------

# The paper's Table 5 (D.1): run, block, head, exponent of |c| ~ t, its 95% half-width, log A, R², start, end step
PAPER_TABLE5 = """
0 1 4 -0.784 0.131 5.134 0.934 4864 5734    0 1 6 -0.788 0.128 5.145 0.831 4596 6695
0 2 1 -0.321 0.014 1.491 0.954 4352 12032   0 2 1 -0.082 0.002 -0.771 0.961 14976 64000
0 2 5 -0.179 0.003 0.263 0.964 16000 64000  0 2 6 -0.256 0.004 1.317 0.975 18944 64000
0 3 1 -0.262 0.005 1.363 0.971 22616 64000  0 3 2 -0.087 0.004 -0.711 0.839 24320 64000
0 3 3 -0.313 0.008 1.827 0.950 27392 64000  0 3 4 -0.179 0.006 0.422 0.925 26624 64000
1 1 0 -0.127 0.005 -0.259 0.895 22784 64000 1 1 2 -0.831 0.252 5.107 0.703 2702 3683
1 1 6 -0.503 0.081 2.584 0.884 4804 6272    1 1 7 -0.638 0.076 3.653 0.874 2118 3936
1 2 1 -0.087 0.003 -0.730 0.904 22121 64000 1 2 3 -0.231 0.019 0.879 0.801 32226 47998
1 2 6 -0.185 0.008 0.255 0.907 4992 21636   1 3 0 -0.527 0.016 4.288 0.958 41216 64000
1 3 4 -0.293 0.005 1.777 0.975 20096 64000  1 3 6 -0.210 0.006 0.856 0.932 26368 64000
1 3 7 -0.171 0.003 0.212 0.976 16227 64000  2 1 0 -0.797 0.184 5.535 0.813 6144 7552
2 1 1 -0.846 0.145 5.671 0.893 4397 5609    2 2 0 -0.182 0.006 0.438 0.923 24960 64000
2 2 1 -0.295 0.049 1.096 0.760 8540 12416   2 2 5 -0.336 0.006 2.262 0.971 25856 64000
2 2 7 -0.309 0.023 1.204 0.897 5504 11904   2 3 0 -0.193 0.005 0.574 0.954 28800 64000
2 3 1 -0.175 0.004 0.448 0.947 23168 64000  2 3 6 -0.168 0.003 0.364 0.964 19328 64000
3 1 0 -0.089 0.005 -0.015 0.752 19584 64000 3 1 2 -0.049 0.002 -0.952 0.788 13696 64000
3 2 2 -0.516 0.112 3.240 0.715 8320 11138   3 2 4 -0.389 0.118 1.611 0.525 3584 5994
3 3 2 -0.367 0.005 2.559 0.982 22121 64000  3 3 3 -0.135 0.003 0.405 0.936 15744 64000
3 3 6 -0.101 0.003 -0.505 0.904 22616 64000 4 2 1 -0.452 0.078 2.444 0.833 4397 6265
4 2 3 -0.577 0.111 3.522 0.727 4911 7808    4 2 5 -0.669 0.105 3.983 0.832 2585 4224
4 2 7 -0.282 0.036 1.156 0.731 10752 18944  4 3 1 -0.201 0.005 0.545 0.953 22912 64000
4 3 2 -0.110 0.007 -0.394 0.775 29495 64000 4 3 5 -0.082 0.003 -0.760 0.911 20608 64000
4 3 7 -0.132 0.004 -0.094 0.930 21760 64000
"""

PAPER_ANOMALOUS_HEADS = 6   # §3.2: collision heads without a decaying power law (3 rising, 3 with none)

def paper_table5() -> list[dict]:
    values = PAPER_TABLE5.split()
    keys = ("run", "layer", "head", "exponent", "exponent_ci", "log_constant", "r2", "start", "end")
    return [{k: (int if k in ("run", "layer", "head", "start", "end") else float)(v)
             for k, v in zip(keys, values[i:i + 9])} for i in range(0, len(values), 9)]

# L_m of the LLC: the sum over a state's 4N outputs (Appendix B.1's ℓ) or their mean (F.mse_loss)
LLC_LOSSES = {"sum": physim.squared_error, "mean": torch.nn.functional.mse_loss}

LLC_SCOPES = {"all": "every LLC head at every LLC checkpoint",
              "formed": "each true collision head from the first LLC checkpoint at which its score reaches the partial "
                        "threshold, the controls (the partial and the quiet head) at every LLC checkpoint"}

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
    llc_heads: int = 8             # ... for up to this many collision heads per run (best first) + a quiet one
    llc_loss: str = "sum"          # L_m: "sum" over a state's 4N outputs (B.1's ℓ) or "mean" (README: traces)
    llc_scope: str = "all"         # free choice: "all" those heads at every LLC checkpoint; "formed": see LLC_SCOPES

    def __post_init__(self):
        check(self.llc_loss in LLC_LOSSES, f"Preset.llc_loss must be one of {sorted(LLC_LOSSES)}, got {self.llc_loss!r}")
        check(self.llc_scope in LLC_SCOPES, f"the LLC scope must be one of {', '.join(LLC_SCOPES)}, got {self.llc_scope!r}")

FULL = Preset()
# Scaled down so that one run forms its collision heads and is measured on a 2-core CPU in 12-15 minutes (README):
# Table 3's physics, a 90k-parameter model with scaled I/O, batch 16 at lr 2e-3 for 35 000 steps; short LLC chains
# at ε = 4e-3 (the earlier calibration's; 2 of 20 estimates pass the verdicts: docs/results.md), for the 3 best true
# heads, the best partial head and a quiet one, 4 checkpoints.
SCALED = Preset(model=ModelConfig(n_blocks=3, n_heads=8, embed_dim=48, scaled_io=True),
                train=TrainConfig(steps=35_000, batch_size=16, lr=2e-3, log_checkpoints=24, even_checkpoints=50),
                llc=LLCConfig(step_size=4e-3, batch_size=8, steps=100, burn_in=60, chains=4),
                runs=1, rollout_states=8, rollout_steps=1000, llc_checkpoints=4, llc_heads=3, llc_loss="mean")
# The paper's late dynamics on a CPU (README: "The medium run"): Table 2's recipe and Table 3's physics on a slightly
# wider scaled model (heads form by ~15 000 steps); LLC chains at ε = 8e-3 of T = 1 600 (the cell `calibrate` selects
# on the finished run: docs/results.md), 12 checkpoints, each true head from its emergence on (--llc-scope formed:
# 44-58 min measured; all: about 71 min estimated, docs/results.md).
MEDIUM = Preset(model=ModelConfig(n_blocks=3, n_heads=8, embed_dim=64, scaled_io=True),
                train=TrainConfig(log_checkpoints=32, even_checkpoints=80),
                llc=LLCConfig(step_size=8e-3, batch_size=8, steps=1600, burn_in=800, chains=4),
                runs=1, rollout_states=8, rollout_steps=1000, llc_checkpoints=12, llc_heads=8, llc_loss="mean",
                llc_scope="formed")

# --- Plumbing: the files of a results folder (written via a temporary name; a damaged one read back: one error) -------

@contextlib.contextmanager
def reading(path: str):
    """Any failure to read or parse `path` inside becomes one ValueError that names the file."""
    try:
        yield
    except Exception as e:                       # truncated JSON, a bad CSV field, a damaged zip, ...
        raise ValueError(f"{path} is damaged or unreadable ({type(e).__name__}: {e}); restore or delete "
                         "it and re-run") from None

def _write(path: str, write) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"          # one name per process: array tasks may write one file at once
    write(tmp)
    os.replace(tmp, path)

def write_json(path: str, obj, indent=1) -> None:
    _write(path, lambda tmp: json.dump(obj, open(tmp, "w"), indent=indent))

def write_text(path: str, text: str) -> None:
    _write(path, lambda tmp: open(tmp, "w").write(text))

def write_csv(path: str, rows: list[dict], columns: list[str] | None = None) -> None:
    def write(tmp):                              # `columns`: the header where there may be no rows
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else columns)
            w.writeheader()
            w.writerows(rows)
    _write(path, write)

def save_torch(path: str, obj) -> None:
    _write(path, lambda tmp: torch.save(obj, tmp))

def load_torch(path: str, map_location="cpu"):
    """A checkpoint, weights or chain-state file (weights_only=True: no code is unpickled)."""
    with reading(path):
        return torch.load(path, map_location=map_location, weights_only=True)

def read_json(path: str, default=None):
    """A JSON file physim wrote (`default` where it does not exist)."""
    if default is not None and not os.path.exists(path):
        return default
    with reading(path), open(path) as f:
        return json.load(f)

def read_csv_rows(path: str) -> list[dict]:
    """The rows of a CSV physim wrote; one cut short (ending mid-row) or with missing fields is damage."""
    with reading(path), open(path, newline="") as f:
        text = f.read()
        if not text.endswith("\n"):
            raise ValueError("it ends mid-row: the file was cut short")
        rows = list(csv.DictReader(io.StringIO(text)))
        if any(None in r or None in r.values() for r in rows):
            raise ValueError("a row has missing or extra fields")
    return rows

def checkpoint_path(rdir: str, step: int) -> str:
    return os.path.join(rdir, "checkpoints", f"step_{step:07d}.pt")

def weights_path(rdir: str, step: int) -> str:
    return os.path.join(rdir, "weights", f"step_{step:07d}.pt")

def saved_checkpoints(rdir: str) -> list[str]:
    """The full checkpoints of a run, newest first (training keeps the latest two)."""
    folder = os.path.join(rdir, "checkpoints")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".pt")) if os.path.isdir(folder) else []
    return [os.path.join(folder, n) for n in reversed(names)]

def load_latest_checkpoint(rdir: str) -> dict | None:
    """The newest readable checkpoint of a run (None if none); a damaged one is named in a warning and skipped."""
    paths, damaged = saved_checkpoints(rdir), []
    for path in paths:
        try:
            ckpt = load_torch(path)
        except ValueError as e:
            damaged.append(str(e))
            continue
        for message in damaged:
            print(f"warning: {message}; resuming from {path}", file=sys.stderr)
        return ckpt
    check(not paths, f"no checkpoint of {rdir} can be read ({', '.join(paths)}): delete the folder's "
                     "checkpoints to retrain the run from the start")
    return None

def model_from_checkpoint(ckpt: dict, device=None) -> physim.ParticleTransformer:
    """The model a checkpoint or weights file (load_torch) describes, in float32."""
    model = physim.ParticleTransformer(ModelConfig(**ckpt["configs"]["model"]), SimConfig(**ckpt["configs"]["sim"]))
    model.load_state_dict({k: v.float() for k, v in ckpt["model"].items()})
    return model.to(device).eval()

def run_dir(out: str, run: int) -> str:
    return os.path.join(out, f"run{run}")

def llc_path(rdir: str, step: int) -> str:
    return os.path.join(rdir, "llc", f"step_{step:07d}.json")

def preset_from_config(out: str) -> Preset:
    """The preset a results folder was made with (its config.json, which is asdict(preset))."""
    path = os.path.join(out, "config.json")
    check(os.path.exists(path), f"{out} holds no config.json: not a physim results folder")
    c = stored_config(path)
    types = {"sim": SimConfig, "model": ModelConfig, "train": TrainConfig, "data": DataConfig, "llc": LLCConfig}
    with reading(path):
        return Preset(**{f.name: types[f.name](**c[f.name]) if f.name in types else c[f.name] for f in fields(Preset)})

def stored_config(path: str) -> dict:
    """config.json as written ({} if absent), a setting added to Preset since then at its default (its old behaviour)."""
    stored = read_json(path, default={})
    return {**{f.name: f.default for f in fields(Preset) if isinstance(f.default, (str, int))}, **stored} if stored else {}

LLC_SETTINGS = ("llc", "llc_heads", "llc_loss", "llc_scope")   # what the LLC stage alone reads: changeable until it has estimates

def check_config(preset: Preset, out: str, runs: list[int] = ()) -> Preset:
    """Write or check out/config.json; only the number of runs may differ (--seeds): the larger is returned. The LLC
    settings may also differ while no run in out has an LLC estimate (e.g. after `calibrate`): config.json takes them."""
    config_path, config = os.path.join(out, "config.json"), asdict(preset)
    stored = stored_config(config_path)
    same = lambda keys: all(stored.get(k) == config[k] for k in keys)
    check(not stored or same(k for k in config if k not in ("runs",) + LLC_SETTINGS),
          f"{out} holds results of a different configuration; choose another --out")
    estimated = glob.glob(os.path.join(glob.escape(out), "run*", "llc", "step_*.json"))
    check(not stored or same(LLC_SETTINGS) or not estimated, f"{out} holds LLC estimates made with other LLC settings "
          f"({', '.join(k for k in LLC_SETTINGS if stored.get(k) != config[k])}); delete {out}/run*/llc to re-estimate")
    n_runs = max(stored.get("runs", 0), preset.runs)
    for run in runs:
        check(0 <= run < n_runs, f"run {run} does not exist: {out} has runs 0-{n_runs - 1}")
    if stored.get("runs", 0) < n_runs or not same(LLC_SETTINGS):
        os.makedirs(out, exist_ok=True)
        write_json(config_path, {**config, "runs": n_runs})
    return replace(preset, runs=n_runs)

def add_time(out: str, stage: str, seconds: float, accumulate: bool = True) -> None:
    """Add a stage's wall time to out/timings.json (summed over resumed calls, or replaced: the report)."""
    path = os.path.join(out, "timings.json")
    timings = read_json(path, default={})
    timings[stage] = round(timings.get(stage, 0.0) * accumulate + seconds, 1)
    write_json(path, timings)

# One run's metrics.csv: checkpoint steps (T,); each head's collision score, c and their errors, each (T, L, H); c on the
# two halves of the held-out set, (T, 2, L, H)
Metrics = NamedTuple("Metrics", [(name, np.ndarray) for name in ("steps", "score", "score_se", "corr", "corr_se", "halves")])
HALVES = ("correlation_first_half", "correlation_second_half")

def read_metrics(rdir: str) -> Metrics:
    path = os.path.join(rdir, "metrics.csv")
    rows = read_csv_rows(path)
    with reading(path):
        steps = sorted({int(r["step"]) for r in rows})
        L, H = (1 + max(int(r[key]) for r in rows) for key in ("layer", "head"))
        columns = ("collision_score", "collision_score_se", "correlation", "correlation_se") + HALVES
        values = {c: np.zeros((len(steps), L, H)) for c in columns}
        index = {s: i for i, s in enumerate(steps)}
        for r in rows:
            for c in columns:
                values[c][index[int(r["step"])], int(r["layer"]), int(r["head"])] = float(r[c])
        return Metrics(np.array(steps), *(values[c] for c in columns[:4]), np.stack([values[c] for c in HALVES], 1))

def finished_runs(out: str, preset: Preset) -> list[int]:
    """The runs in `out` whose training, rollout and LLC are all done (a report covers those)."""
    return [r for r in range(preset.runs) if all(os.path.exists(os.path.join(run_dir(out, r), name))
                                                 for name in ("simulator.json", "llc.csv"))]

# --- Plumbing: progress, interruptions and time limits ----------------------------------------------------------------

def fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"

class Progress:
    """One status line on stderr with an ETA, redrawn at most every `every` seconds (none without a label)."""
    def __init__(self, label: str | None, total: int, start: int = 0, every: float = 2.0, stream=sys.stderr):
        self.label, self.total, self.start, self.every = label, total, start, every
        self.stream = stream if label is not None else None
        self.t0 = self.last = time.time()

    def update(self, done: int, note: str = "", force: bool = False, eta: float | None = None) -> None:
        """Redraw; the ETA is `eta` if given (WorkClock), else from the mean rate so far."""
        now = time.time()
        if self.stream is None or (not force and now - self.last < self.every):
            return
        self.last = now
        if eta is None:
            rate = (done - self.start) / max(now - self.t0, 1e-9)
            eta = (self.total - done) / rate if rate > 0 else float("nan")
        self.stream.write(f"\r{self.label}: {done}/{self.total} ({100 * done / self.total:.0f}%) "
                          f"{fmt_time(now - self.t0)} elapsed, ETA {fmt_time(eta)} {note}   ")
        if done >= self.total:
            self.stream.write("\n")
        self.stream.flush()

class WorkClock:
    """Wall time per kind of work (step, data chunk, checkpoint): an ETA weighs what is left by each one's cost."""
    def __init__(self):
        self.seconds, self.count = {}, {}

    def add(self, kind: str, seconds: float) -> None:
        self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds
        self.count[kind] = self.count.get(kind, 0) + 1

    def eta(self, left: dict) -> float:
        """Seconds for `left` = {kind: units to do} at the mean cost so far (nan if a kind to do is untimed)."""
        if any(n > 0 and kind not in self.count for kind, n in left.items()):
            return float("nan")
        return sum(n * self.seconds[kind] / self.count[kind] for kind, n in left.items() if n > 0)

class Interrupted(KeyboardInterrupt):
    """Ctrl-C, a signal or --time-limit during a run; `where` says at which step or stage."""
    def __init__(self, where: str, step: int | None = None):
        super().__init__(where)
        self.where, self.step = where, step

EXIT_INTERRUPTED = 130   # Ctrl-C or SIGTERM (a scheduler cancelling the job): re-run to resume
EXIT_TIME_UP = 75        # --time-limit or SIGUSR1 (Slurm's --signal): stopped to be requeued (EX_TEMPFAIL)
STOPPED_BY = {}          # the signal that stopped this call, if one did (set by _stop)

def _stop(signum, frame):
    """SIGTERM, SIGUSR1 or --time-limit's SIGALRM: stop as Ctrl-C does (a re-run resumes from what was saved)."""
    STOPPED_BY["signal"] = signum
    raise KeyboardInterrupt

def compile_works() -> bool:
    """Whether torch.compile runs here; where it does not, one warning line (and eager training)."""
    try:
        torch.compile(lambda x: x + 1)(torch.zeros(2))
        return True
    except Exception as e:                       # no compiler, unsupported platform, ...
        print(f"warning: torch.compile is unavailable here ({type(e).__name__}); running eagerly", file=sys.stderr)
        return False

def parse_duration(text: str) -> int:
    """--time-limit: '3h50m', '90m', '45s' (or a sum of those) or Slurm's 'H:MM:SS' -> seconds."""
    hms = re.fullmatch(r"(\d+):(\d\d):(\d\d)", text)
    units = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    if hms:
        seconds = int(hms[1]) * 3600 + int(hms[2]) * 60 + int(hms[3])
    elif units and text:
        seconds = sum(int(v or 0) * f for v, f in zip(units.groups(), (3600, 60, 1)))
    else:
        raise ValueError(f"--time-limit wants a duration such as 3h50m, 90m, 45s or 3:50:00, got {text!r}")
    check(seconds > 0, f"--time-limit {text}: must be longer than 0 s")
    return seconds

def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but this torch build sees no CUDA device")
    return name

# --- The run's stages: training, the rollout, the LLC -----------------------------------------------------------------

class _StopAt(Exception):          # stop_at reached
    pass

def train_run(rdir: str, sim: SimConfig, model_cfg: ModelConfig, train_cfg: TrainConfig, data_cfg: DataConfig,
              device="cpu", stop_at: int | None = None, label: str | None = "train", keep_weights=None,
              compile_model: bool = False) -> physim.ParticleTransformer:
    """physim.train into rdir (resuming): each checkpoint rewrites metrics.csv and losses.csv, saves a checkpoint
    (keeping the previous) and half-precision weights at `keep_weights` (default: all); stop_at ends the call."""
    configs = {"sim": asdict(sim), "model": asdict(model_cfg), "train": asdict(train_cfg), "data": asdict(data_cfg)}
    for folder in ("checkpoints", "weights"):
        os.makedirs(os.path.join(rdir, folder), exist_ok=True)
    schedule = physim.checkpoint_steps(train_cfg)
    check(stop_at is None or stop_at in schedule, f"stop_at={stop_at} must be one of the checkpoint steps")
    keep = set(schedule if keep_weights is None else keep_weights)
    ckpt = load_latest_checkpoint(rdir)
    check(ckpt is None or ckpt["configs"] == configs,
          f"{rdir} holds a run with a different configuration; choose another output folder")
    history, start = (ckpt["history"], ckpt["step"]) if ckpt else ({"metrics": [], "losses": []}, 0)
    for row in history["metrics"]:                           # a run begun before c was measured on the two halves
        row.update({k: row.get(k, math.nan) for k in HALVES})
    heldout_x, heldout_y = physim.heldout_set(sim, data_cfg, device)
    resamples = physim.bootstrap_weights(data_cfg.heldout_states, data_cfg.bootstrap)   # the same every checkpoint
    per_chunk = data_cfg.chunk_trajectories * sim.n_steps // train_cfg.batch_size
    progress, clock, spent = Progress(label, train_cfg.steps, start), WorkClock(), dict(history.get("work_seconds", {}))
    left = {"checkpoint": sum(s > start for s in schedule)}
    mark, done = [time.perf_counter()], {"step": start, "model": None}

    def eta(step: int) -> float:
        chunks = -(-(train_cfg.steps - step) // per_chunk)
        return clock.eta({"step": train_cfg.steps - step - chunks, "data chunk": chunks, **left})

    def on_step(step: int) -> None:
        now = time.perf_counter()
        clock.add("data chunk" if (step - 1) % per_chunk == 0 else "step", now - mark[0])
        mark[0], done["step"] = now, step
        progress.update(step, eta=eta(step))

    def on_checkpoint(step: int, model, optimizer, train_loss: float) -> None:
        t0 = time.perf_counter()
        metrics = physim.head_metrics(model, heldout_x, heldout_y, resamples)
        table = {k: v.tolist() for k, v in metrics.items() if k != "heldout_loss"}        # one copy to the host
        history["metrics"] += [{"step": step, "layer": l, "head": h, **{k: v[l][h] for k, v in table.items()}}
                               for l in range(model_cfg.n_blocks) for h in range(model_cfg.n_heads)]
        history["losses"].append({"step": step, "train_loss": train_loss, "heldout_loss": metrics["heldout_loss"]})
        history["work_seconds"] = {k: spent.get(k, 0.0) + clock.seconds.get(k, 0.0) for k in {*spent, *clock.seconds}}
        save_torch(checkpoint_path(rdir, step), {"configs": configs, "step": step, "model": model.state_dict(),
                                                 "optimizer": optimizer.state_dict(), "history": history})
        for path in saved_checkpoints(rdir)[2:]:                 # keep the latest two: one may be damaged
            os.remove(path)
        if step in keep:
            save_torch(weights_path(rdir, step), {"configs": configs, "step": step,
                                                  "model": {k: v.half() for k, v in model.state_dict().items()}})
        for name in ("metrics", "losses"):
            write_csv(os.path.join(rdir, f"{name}.csv"), history[name])
        left["checkpoint"] -= step > start
        clock.add("checkpoint", time.perf_counter() - t0)
        mark[0], done["step"], done["model"] = time.perf_counter(), step, model
        progress.update(step, f"held-out loss {metrics['heldout_loss']:.3g}, best collision score "
                              f"{max(max(row) for row in table['collision_score']):.2f}",
                        force=step == train_cfg.steps, eta=eta(step))
        if step == stop_at:
            raise _StopAt
    try:
        return physim.train(sim, model_cfg, train_cfg, data_cfg, device, ckpt, on_checkpoint, on_step,
                            compile_model=compile_model and compile_works())
    except _StopAt:
        return done["model"].eval()
    except KeyboardInterrupt:                    # Ctrl-C (or a signal made one): the checkpoints are intact
        raise Interrupted(f"at step {done['step']}", done["step"]) from None

LLC_SAVE_SECONDS = 300   # free choice: an LLC estimate saves its chains once this long has passed since the last save

def _same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    return a == b

def estimate_llc_resumable(model, criterion, data, subsets, cfg: LLCConfig, state_path: str | None = None,
                           label: str | None = None, **kwargs):
    """physim.estimate_llc whose chains' state is saved to (and continued from) state_path."""
    params, subsets_list = dict(model.named_parameters()), [subsets] if isinstance(subsets, dict) else list(subsets)
    identity = {"config": asdict(cfg), "device": str(next(iter(params.values())).device.type),
                "subsets": [{n: None if m is None else m.cpu() for n, m in s.items()} for s in subsets_list],
                "w0": {n: params[n].detach().cpu() for s in subsets_list for n in s}}
    state = None
    if state_path is not None and os.path.exists(state_path):
        state = load_torch(state_path)
        check(_same(state["identity"], identity), f"{state_path} holds the state of another estimate (other "
              "settings, model, parameters or device): remove it")
    progress, last, saved_at = Progress(label, cfg.steps, state["step"] if state else 0), {}, [time.monotonic()]

    def save():
        s = last["state"]
        save_torch(state_path, {"identity": identity, "step": s["step"], "delta": s["delta"], "previous": s["previous"],
                                **{k: s[k][:, :s["step"]].clone() for k in ("traces", "w0_traces", "acceptance")}})
        saved_at[0] = time.monotonic()

    def on_step(s):
        last["state"] = s
        progress.update(s["step"])
        if state_path is not None and time.monotonic() - saved_at[0] > LLC_SAVE_SECONDS:
            save()
    try:
        results = physim.estimate_llc(model, criterion, data, subsets, cfg, state=state, on_step=on_step, **kwargs)
    except KeyboardInterrupt:
        if state_path is not None and last:
            save()
        raise
    if state_path is not None and last:
        save()                                   # finished: a later call with this state_path returns at once
    return results

def reproduce(preset: Preset, out: str, device: str, runs: list[int] | None = None,
              compile_model: bool = False, llc: bool = True) -> dict | None:
    """Train the runs (default: all), roll out, estimate LLCs, report (llc=False: only train and roll out)."""
    t0 = time.time()
    preset = check_config(preset, out, runs or [])           # with all of the folder's runs (--seeds)
    runs = list(range(preset.runs)) if runs is None else runs
    if PROJECT_FIRST and not any(os.path.isdir(os.path.join(run_dir(out, r), "checkpoints")) for r in runs):
        print(projection_line(preset, device, len(runs), llc), file=sys.stderr)   # a fresh start: what to expect
    for run in runs:
        rdir, train_cfg = run_dir(out, run), TrainConfig(**{**asdict(preset.train), "seed": run})
        # Disk: weights are kept (in half precision) only where the LLC reads them, and at the end.
        keep = llc_steps(physim.checkpoint_steps(train_cfg), preset.llc_checkpoints) + [train_cfg.steps]
        t = time.time()
        try:
            model = train_run(rdir, preset.sim, preset.model, train_cfg, preset.data, device,
                              label=f"run {run + 1}/{preset.runs} training", keep_weights=keep, compile_model=compile_model)
        except Interrupted as e:
            add_time(out, f"run{run} training", time.time() - t)
            raise Interrupted(f"{e.where} of run {run}") from None
        add_time(out, f"run{run} training", time.time() - t)
        sim_path = os.path.join(rdir, "simulator.json")
        if not os.path.exists(sim_path):
            print(f"run {run + 1}/{preset.runs}: rolling the model out for {preset.rollout_steps} steps", file=sys.stderr)
            t = time.time()
            write_json(sim_path, physim.evaluate_simulator(model, preset.rollout_states, preset.rollout_steps), indent=None)
            add_time(out, f"run{run} rollout", time.time() - t)
        if llc:
            t = time.time()
            try:
                run_llc(preset, rdir, device, label=f"run {run + 1}/{preset.runs}")   # each estimate saved as it ends
            except KeyboardInterrupt:
                add_time(out, f"run{run} LLC", time.time() - t)
                raise Interrupted(f"in the LLC stage of run {run}") from None
            add_time(out, f"run{run} LLC", time.time() - t)
    if not llc:
        return None
    summary = write_report(out, device)
    summary["wall_seconds_this_call"] = round(time.time() - t0, 1)
    write_json(os.path.join(out, "summary.json"), summary)
    return summary

PROJECT_FIRST = True   # a fresh start first times a few steps of each stage and prints the projected wall time

def projection_line(preset: Preset, device: str, runs: int, llc: bool) -> str:
    """One line: this call's wall time on this machine, projected from a few steps of each stage (projected_time)."""
    t0, stages = time.time(), {}
    for row in projected_time(preset, device, "", repeat=1)[:-1]:
        if llc or row["stage"] != "LLC":
            stages[row["stage"]] = stages.get(row["stage"], 0.0) + row["seconds"] * runs / preset.runs
    return (f"projected on this {device}: {fmt_time(sum(stages.values()))} for {runs} run(s) ("
            + ", ".join(f"{k} {fmt_time(v)}" for k, v in stages.items()) + f"; measured in {time.time() - t0:.0f} s, "
            "from a few steps of each: `python reproduce.py bench` itemises it)")

def llc_steps(steps, n: int) -> list[int]:
    """n checkpoint steps, even in log(step) from 1% of training (before, no minimum: LLC undefined) to its end."""
    positive = [int(s) for s in steps if s >= steps[-1] / 100]
    targets = np.geomspace(positive[0], positive[-1], n)
    return sorted({min(positive, key=lambda s: abs(math.log(s / t))) for t in targets})

def llc_heads(final_score: np.ndarray, n: int) -> list[tuple[int, int]]:
    """Up to n true collision heads (best first; else the best head), then the controls: the best partial head and the
    head of the best head's block whose final score is nearest 0 (a quiet head at the same depth), each once."""
    flat, H = final_score.reshape(-1), final_score.shape[1]
    order = np.argsort(-flat)
    chosen = [divmod(int(i), H) for i in order if flat[i] >= TRUE_HEAD][:n] or [divmod(int(order[0]), H)]
    partial = [divmod(int(i), H) for i in order if physim.PARTIAL_HEAD_SCORE <= flat[i] < TRUE_HEAD][:1]
    block = chosen[0][0]   # free choice: the quiet control shares the best head's block (and so what lies downstream)
    for head in partial + [(block, int(np.abs(final_score[block]).argmin()))]:
        chosen += [head] if head not in chosen else []
    return chosen

def paired_trace(r: physim.LLCResult, thin: int) -> torch.Tensor:
    """L(w0) + L_m(w_t) − L_m(w0) per chain, averaged over windows of `thin` steps: (C, T // thin)."""
    paired = r.traces - r.w0_traces + torch.tensor(r.init_loss)[:, None]
    return paired[:, :paired.shape[1] // thin * thin].reshape(len(paired), -1, thin).mean(-1)

def llc_chunk_trajectories(preset: Preset) -> int:
    """Trajectories per data chunk of an SGLD chain: enough for steps x m pairs, at least 8, at most 128 (~130 MB)."""
    return min(128, max(8, math.ceil(preset.llc.steps * preset.llc.batch_size / preset.sim.n_steps)))

def llc_of_heads(model, criterion, data, heads: list, cfg: LLCConfig, group: int, label: str | None = None,
                 state: str | None = None):
    """estimate_llc of each (layer, head), `group` heads batched (halved while out of device memory), from their first
    block on; `state`: a path prefix for the groups' chain states. Returns the LLCResults and the group that fitted."""
    while True:
        try:
            results = []
            for i in range(0, len(heads), group):
                part = heads[i:i + group]
                part_label = f"{label}, heads {i + 1}-{i + len(part)}" if label and group < len(heads) else label
                split = physim.FromBlock(model, min(l for l, _ in part))     # blocks before: once per minibatch
                state_path = None if state is None else f"{state}.heads_{'_'.join(f'{l}-{h}' for l, h in part)}.pt"
                subsets = [physim.head_parameters(model, l, h) for l, h in part]
                results += estimate_llc_resumable(split, criterion, data, subsets, cfg, state_path, part_label,
                                                  prefix=split.prefix)
            return results, group
        except torch.OutOfMemoryError:     # a GPU's allocator says so; a CPU out of memory is killed instead
            check(group > 1, "out of device memory estimating the LLC of a single head: lower "
                  "LLCConfig.chains or LLCConfig.batch_size")
            group = (group + 1) // 2
        if torch.cuda.is_available():
            torch.cuda.empty_cache()       # out here, where the failed attempt's tensors are released
        print(f"\n{label or 'LLC'}: out of device memory; retrying with {group} heads batched", file=sys.stderr)

def scoped_heads(preset: Preset, m: Metrics, step: int) -> list[tuple[int, int]]:
    """The LLC heads (llc_heads) estimated at checkpoint `step` under preset.llc_scope (LLC_SCOPES)."""
    heads, k = llc_heads(m.score[-1], preset.llc_heads), int(np.searchsorted(m.steps, step))
    return [(l, h) for l, h in heads if preset.llc_scope == "all" or m.score[-1, l, h] < TRUE_HEAD
            or m.score[k, l, h] >= physim.PARTIAL_HEAD_SCORE]

def run_llc(preset: Preset, rdir: str, device: str, label: str, steps: list[int] | None = None) -> None:
    """The LLC (Appendix B) of the chosen heads: a JSON per LLC checkpoint (`steps`: only these) under rdir/llc/,
    skipped where it exists; rdir/llc.csv once all exist."""
    m = read_metrics(rdir)
    os.makedirs(os.path.join(rdir, "llc"), exist_ok=True)
    data = physim.simulator_batches(preset.sim, DataConfig(chunk_trajectories=llc_chunk_trajectories(preset)),
                                    preset.llc.batch_size, device)
    chosen, group = llc_steps(m.steps, preset.llc_checkpoints), len(llc_heads(m.score[-1], preset.llc_heads))
    for i, step in enumerate(chosen):
        path = llc_path(rdir, step)
        if os.path.exists(path) or (steps is not None and step not in steps):
            continue
        heads = scoped_heads(preset, m, step)
        model, t0 = model_from_checkpoint(load_torch(weights_path(rdir, step)), device), time.time()
        results, fitted = llc_of_heads(model, LLC_LOSSES[preset.llc_loss], data, heads, preset.llc, min(group, len(heads)),
                                       label=f"{label} LLC at step {step} ({i + 1}/{len(chosen)})",
                                       state=path.removesuffix(".json"))
        group = min(group, fitted) if fitted < len(heads) else group   # smaller only where memory ran out
        thin = max(1, preset.llc.steps // 500)
        record = {"step": step, "seconds": round(time.time() - t0, 2), "trace_thinning": thin, "heads": [
            {"layer": l, "head": h, "llc": r.llc, "llc_stderr": r.llc_stderr, "chain_llc": r.chain_llc,
             "init_loss": r.init_loss, "health": physim.llc_health(r), "convergence": physim.convergence(r),
             "trace": paired_trace(r, thin).tolist()}
            for (l, h), r in zip(heads, results)]}
        write_json(path, record, indent=None)
        for state in glob.glob(glob.escape(path.removesuffix(".json")) + ".heads_*.pt*"):   # and any .tmp
            os.remove(state)
    if all(os.path.exists(llc_path(rdir, step)) for step in chosen):
        collect_llc(rdir, chosen, preset)

CONVERGENCE = ("rhat", "ess", "drift_z", "acceptance")     # physim.convergence's numbers in llc.csv

def collect_llc(rdir: str, chosen: list[int], preset: Preset) -> None:
    """rdir/llc.csv from the JSON of every LLC checkpoint: one row per (checkpoint, head); nbeta_sum: the nβ of the
    estimates in the sum convention (B.1's ℓ), where the mean over a state's 4N outputs divides it by 4N."""
    nbeta_sum = preset.llc.nbeta / (4 * preset.sim.n_particles if preset.llc_loss == "mean" else 1)
    rows = []
    for step in chosen:
        with reading(path := llc_path(rdir, step)):
            for r in read_json(path)["heads"]:
                v = r["convergence"]
                rows.append({"step": step, **{k: r[k] for k in ("layer", "head", "llc", "llc_stderr")},
                             "nbeta_sum": nbeta_sum, "equilibrated": v["verdict"] == "equilibrated",
                             **{k: round(v[k], 4) for k in CONVERGENCE},
                             "healthy_chains": r["health"].count("healthy"), "chains": len(r["health"]),
                             "verdict": v["verdict"], "unhealthy": "; ".join(f"chain {c}: {h}" for c, h in enumerate(r["health"]) if h != "healthy")})
    write_csv(os.path.join(rdir, "llc.csv"), rows)

def llc_shard(preset: Preset, out: str, device: str, shard: int, shards: int) -> int:
    """`--llc-shard`: the (run, checkpoint) LLC estimates numbered shard, shard + shards, ...; returns their number."""
    preset = check_config(preset, out)                       # with all of the folder's runs (--seeds)
    trained = [r for r in range(preset.runs) if os.path.exists(os.path.join(run_dir(out, r), "simulator.json"))]
    pairs = [(r, step) for r in trained for step in llc_steps(read_metrics(run_dir(out, r)).steps, preset.llc_checkpoints)]
    mine = pairs[shard - 1::shards]
    for r in sorted({r for r, _ in mine}):
        try:
            run_llc(preset, run_dir(out, r), device, label=f"shard {shard}/{shards}, run {r}",
                    steps=[step for q, step in mine if q == r])
        except KeyboardInterrupt:                                  # say where, as the training calls do
            raise Interrupted(f"in the LLC stage of run {r}") from None
    return len(mine)

CALIBRATION_FACTORS, CALIBRATION_MAX_STEPS = (0.25, 0.5, 1.0, 2.0, 4.0), 1000   # ε = the preset's ε x these; chain length cap

def calibrate(out: str, device: str, step_sizes: list[float] | None = None, steps: int | None = None,
              probe: list[int] | None = None) -> physim.Calibration:
    """`reproduce.py calibrate`: physim.calibrate_llc (B.2.1) on the first trained run: calibration.csv/.json/.png.
    step_sizes (default: the preset's ε x CALIBRATION_FACTORS), steps T (default: the preset's, at most
    CALIBRATION_MAX_STEPS; B in the preset's proportion) and the probed checkpoints (default: the first, middle and
    last LLC checkpoint) can be set."""
    preset = preset_from_config(out)
    runs = [r for r in range(preset.runs) if os.path.exists(os.path.join(run_dir(out, r), "metrics.csv"))]
    check(len(runs) > 0, f"{out} holds no trained run yet: nothing to calibrate")
    m = read_metrics(rdir := run_dir(out, runs[0]))
    heads, chosen = llc_heads(m.score[-1], preset.llc_heads), llc_steps(m.steps, preset.llc_checkpoints)
    probed = sorted(set(probe or {chosen[0], chosen[len(chosen) // 2], chosen[-1]}))
    for step in probed:
        check(step in chosen, f"--checkpoints: {step} is not an LLC checkpoint of {rdir} ({', '.join(map(str, chosen))})")
        check(os.path.exists(weights_path(rdir, step)), f"{rdir} has no weights at step {step} yet: finish its training "
                                                        "first")
    models = {step: model_from_checkpoint(load_torch(weights_path(rdir, step)), device) for step in probed}
    steps = steps or min(preset.llc.steps, CALIBRATION_MAX_STEPS)
    cfg = LLCConfig(**{**asdict(preset.llc), "steps": steps, "burn_in": preset.llc.burn_in * steps // preset.llc.steps})
    data = physim.simulator_batches(preset.sim, DataConfig(chunk_trajectories=llc_chunk_trajectories(preset)),
                                    cfg.batch_size, device)
    cal = physim.calibrate_llc(models, LLC_LOSSES[preset.llc_loss], data,
                               [physim.head_parameters(models[probed[0]], l, h) for l, h in heads], cfg,
                               step_sizes or [preset.llc.step_size * f for f in CALIBRATION_FACTORS], on_cell=lambda done, total: print(
                                   f"\rrun {runs[0]} calibration: cell {done}/{total}", end="", file=sys.stderr))
    print(file=sys.stderr)
    rows = [{"run": runs[0], "step": r["model"], "head": "{}-{}".format(*heads[r["subset"]]),
             **{k: v for k, v in r.items() if k not in ("model", "subset")}} for r in cal.rows]
    write_calibration(out, preset, cfg, rows, cal)
    return cal

def write_calibration(out: str, preset: Preset, cfg: LLCConfig, rows: list[dict], cal: physim.Calibration) -> None:
    write_csv(os.path.join(out, "calibration.csv"), rows)
    write_json(os.path.join(out, "calibration.json"), {"step_size": cal.step_size, "nbeta": cal.nbeta,
               "statement": cal.statement, "preset_step_size": preset.llc.step_size, "chain_steps": cfg.steps,
               "burn_in": cfg.burn_in})
    os.makedirs(os.path.join(out, "figures"), exist_ok=True)
    calibration_figure(rows, cal, preset.llc.step_size, os.path.join(out, "figures", "calibration.png"))

def rejudge_calibration(out: str, preset: Preset) -> physim.Calibration:
    """`--report`: physim.select_sampler (this code's rule) on the chains saved in out/calibration.csv."""
    path, record = os.path.join(out, "calibration.csv"), read_json(os.path.join(out, "calibration.json"))
    text, rows = {"run", "head", "verdict", "failed", "passes"}, read_csv_rows(path)
    with reading(path):                                   # its T and B are in calibration.json
        rows = [{k: v if k in text else int(v) if k == "step" else float(v) for k, v in r.items()} for r in rows]
        cfg = LLCConfig(**{**asdict(preset.llc), "steps": record["chain_steps"], "burn_in": record["burn_in"]})
    cal = physim.select_sampler([{**r, "model": r["step"], "subset": r["head"]} for r in rows], cfg)
    write_calibration(out, preset, cfg, [{k: v for k, v in r.items() if k not in ("model", "subset")} for r in cal.rows], cal)
    return cal

# --- The analysis: power laws, head classes and the paper's claims (§3, Appendix D.1) ---------------------------------

def power_law_analysis(metrics: dict, out: str) -> list[dict]:
    """Every head's class, pieces of log|c| vs log t (from 1% of training) and end-of-development verdict; regimes.csv."""
    heads, rows = [], []
    for run, m in metrics.items():
        window = m.steps >= m.steps[-1] / 100
        t, (L, H) = m.steps[window], m.score.shape[1:]
        rho = physim.error_correlation(t, [m.halves[window, :, l, h].T for l in range(L) for h in range(H)])
        for l in range(L):
            for h in range(H):
                c = m.corr[window, l, h]
                pieces = physim.find_power_law_regimes(t, c, rho)
                end = physim.end_of_development(t, c, pieces, rho)
                heads.append({"run": run, "layer": l, "head": h, "score": float(m.score[-1, l, h]),
                              "class": physim.head_class(m.score[-1, l, h]), "pieces": pieces, "end": end,
                              "rho": rho, "t": t, "c": np.abs(c), "c_se": m.corr_se[window, l, h],
                              "score_t": m.score[window, l, h]})
                rows += [{"run": run, "layer": l, "head": h, "class": heads[-1]["class"], "rho": round(rho, 3),
                          **asdict(p), "end_of_development": p is end["piece"],
                          "head_follows_power_law": end["follows"] if p is end["piece"] else ""} for p in pieces]
    write_csv(os.path.join(out, "regimes.csv"), rows, ["run", "layer", "head", "class", "rho"]
              + [f.name for f in fields(physim.Regime)] + ["end_of_development", "head_follows_power_law"])
    return heads

def trusted_llc(llc_rows: list[dict], h: dict, start: float = 0, end: float = math.inf) -> list[tuple[int, float]]:
    """(step, λ̂) of head h's equilibrated LLC estimates at steps start ... end, in step order: all a claim may use."""
    return sorted((r["step"], float(r["llc"])) for r in llc_rows if r["equilibrated"] and start <= r["step"] <= end
                  and (r["run"], r["layer"], r["head"]) == (h["run"], h["layer"], h["head"]))

SIMULTANEOUS = 2.0  # free choice: §3's three events are "simultaneous" if their steps lie within this factor (Fig. 1's log axis)

def timeline(h: dict, llc_rows: list[dict]) -> dict:
    """When a head's development happens: the first steps its score reaches the partial and the true threshold, the
    start of its end-of-development power law and of its last piece, and the LLC plateau's onset: the earliest
    equilibrated estimate from which all later ones (>= 2) stay within PLATEAU of their mean (None: not seen)."""
    first = lambda threshold: next((float(t) for t, s in zip(h.get("t", []), h.get("score_t", [])) if s >= threshold), None)
    mine = trusted_llc(llc_rows, h)
    onset = next((s for i, (s, _) in enumerate(mine) if len(mine) - i >= 2 and max(v for _, v in mine[i:])
                  - min(v for _, v in mine[i:]) <= PLATEAU * abs(np.mean([v for _, v in mine[i:]]))), None)
    return {"run": h["run"], "head": f"{h['layer']}-{h['head']}", "class": h["class"], "partial_from": first(physim.PARTIAL_HEAD_SCORE),
            "true_from": first(TRUE_HEAD), "power_law_from": h["end"]["piece"].start if h["end"]["follows"] else None,
            "last_breakpoint": h["pieces"][-1].start if len(h["pieces"]) > 1 else None, "llc_plateau_from": onset}

ENERGY_TOLERANCE = 0.25  # free choice: D.2's "unrealistic" gain and "similar" evolution, as a share of the energy released
PLATEAU = 0.25  # free choice: the LLC "plateaus" over a regime if its estimates there stay within 25% of their mean
STRICT_R2 = 0.8  # free choice: the stricter diagnostic beside the power-law claim (most of Table 5's R² are >= 0.8)

def check_claims(heads: list[dict], llc_rows: list[dict], sims: dict, runs: list[int]) -> list[dict]:
    """The paper's claims, each checked on our runs: {claim, verdict, ours, paper}, by the rules stated in `ours`."""
    collision = [h for h in heads if h["class"] != "none"]
    others, claims = [h for h in heads if h["class"] == "none"], []

    def claim(text, checkable, supported, partly, ours, paper):
        verdict = ("not checkable" if not checkable else "supported" if supported else
                   "partly supported" if partly else "not supported")
        claims.append({"claim": text, "verdict": verdict, "ours": ours, "paper": paper})
    paper_heads = len({(r["run"], r["layer"], r["head"]) for r in paper_table5()})
    follows = [h for h in collision if h["end"]["follows"]]
    rising = [h for h in collision if h["end"]["piece"] is not None and h["end"]["piece"].exponent >= 0]
    stricter = [h for h in follows if h["end"]["piece"].r2 >= STRICT_R2 and h["end"]["piece"].curvature_p >= 0.01]
    frac = len(follows) / len(collision) if collision else float("nan")
    paper_frac = paper_heads / (paper_heads + PAPER_ANOMALOUS_HEADS)
    claim("Collision-detection heads follow power laws (§3.2)", collision, frac >= 0.8, frac >= 0.5,
          f"{len(follows)} of {len(collision)} collision heads (true or partial) decay as a power law at the end of "
          f"their development (its last changing piece: R² >= {physim.RegimeConfig.min_r2}, |exponent| from "
          f"{physim.RegimeConfig.min_exponent} to {physim.RegimeConfig.max_exponent}, |c| changing >= "
          f"{physim.RegimeConfig.min_change:.0%} beyond its error; no exponential fits its decaying stretch better); "
          f"{len(rising)} rise there instead. Supported at >= 80%, partly at >= 50%. "
          f"Stricter, as a diagnostic: {len(stricter)} with R² >= {STRICT_R2} and no significant curvature",
          f"{paper_heads} of {paper_heads + PAPER_ANOMALOUS_HEADS} ({paper_frac:.0%}); 3 more rising, 3 with none")
    n_other = sum(h["end"]["follows"] for h in others)
    claim("No other head follows a power law (§3.2)", others, n_other == 0, n_other <= 0.1 * len(others),
          f"{n_other} of {len(others)} heads without collision detection decay as a power law at the end of their "
          f"development (the same rule); supported at 0, partly at <= 10%", "0 heads")
    first = [h for h in collision if h["layer"] == 0]
    claim("No collision-detection head in the first block (§3.1, Fig. 5)", True, not first, False,
          f"{len(first)} collision heads in block 0" + "".join(f"; run {h['run']} head 0-{h['head']}" for h in first),
          "0 of 5 runs x 8 heads")
    mixed = [r for r in runs if {"true", "partial"} <= {h["class"] for h in heads if h["run"] == r}]
    claim("Every run develops both true and partial collision-detection heads (§3.1)", True, len(mixed) == len(runs), mixed,
          f"{len(mixed)} of {len(runs)} runs", "5 of 5 runs")
    # §3: "in most cases ... the parameter-restricted local learning coefficient plateaus" while c is in a power law;
    # §3.3: "such plateaus in the LLC do not occur in heads without two power laws": the quiet heads are the control,
    # judged over the same windows of steps. Only equilibrated estimates count.
    estimates = lambda h, start, end: [v for _, v in trusted_llc(llc_rows, h, start, end)]
    is_flat = lambda values: max(values) - min(values) <= PLATEAU * abs(np.mean(values))
    checked, flat, control = [], [], []
    for h in collision:
        for p in (p for p in h["pieces"] if p.is_power_law and len(estimates(h, p.start, p.end)) >= 2):
            inside = estimates(h, p.start, p.end)
            checked.append(f"run {h['run']} {h['layer']}-{h['head']} steps {p.start:.0f}-{p.end:.0f}: "
                           f"LLC {', '.join(f'{v:.2f}' for v in inside)}")
            flat.append(is_flat(inside))
            control += [is_flat(v) for q in others if q["run"] == h["run"] and len(v := estimates(q, p.start, p.end)) >= 2]
    most = sum(flat) > len(flat) / 2
    contrast = bool(control) and np.mean(control) < np.mean(flat)
    claim("The LLC plateaus while c(t) is in a power-law regime, in most cases, and not in heads without one (§3, §3.2-3.3, "
          "Fig. 1)", checked, most and contrast, any(flat),
          (f"{sum(flat)} of {len(checked)} regimes with >= 2 equilibrated LLC estimates inside stay within {PLATEAU:.0%} "
           f"of their mean (most: more than half); the quiet heads' equilibrated LLC over the same steps is flat in "
           f"{sum(control)} of {len(control)} windows (the control: supported needs fewer than the collision heads'); "
           + "; ".join(checked)) if checked else
          "no power-law regime of a collision head holds 2 or more equilibrated LLC estimates",
          "plateaus in the heads of Figs. 1 and 16-19; none in heads without power laws (§3.3)")
    # D.2: "stable (accumulated errors do not cause the simulation to gain unrealistic amounts of energy) and ...
    # on-average the energy evolves in a manner similar to the ground truth system". In energy differences, each
    # over the energy the truth releases over the rollout (so where potential energy is zero cannot matter).
    energy = {r: (np.array(s["energy_model"]), np.array(s["energy_true"])) for r, s in sims.items()}
    scale = {r: t[0] - t.min() for r, (m, t) in energy.items()}
    gain = {r: (m.max() - m[0]) / scale[r] for r, (m, t) in energy.items()}
    gap = {r: np.abs(m - t).mean() / scale[r] for r, (m, t) in energy.items()}
    both = [r for r in energy if gain[r] <= ENERGY_TOLERANCE and gap[r] <= ENERGY_TOLERANCE]
    claim("The trained model is a stable simulator whose energy evolves as the truth's (Appendix D.2, Fig. 7)", True,
          len(both) == len(energy), both,
          "per run, the largest energy gain over the start, and the mean distance from the truth's mean energy curve, "
          "each over the energy the truth releases: " + ", ".join(f"run {r} gain {gain[r]:.0%}, distance {gap[r]:.0%} "
          f"(of {scale[r]:.4g})" for r in energy) + f"; both <= {ENERGY_TOLERANCE:.0%} in every run: supported; in some: partly",
          "stable and similar to the truth in all 5 runs (Fig. 7)")
    # §3: "in most cases the following occur simultaneously: (a) collision detection behaviour emerges, (b) the
    # attention-distance correlation enters a power law regime, (c) the parameter-restricted [LLC] plateaus".
    lines = [timeline(h, llc_rows) for h in collision]
    three = [d for d in lines if None not in (d["partial_from"], d["power_law_from"], d["llc_plateau_from"])]
    together = [d for d in three if max(d["partial_from"], d["power_law_from"], d["llc_plateau_from"])
                <= SIMULTANEOUS * min(d["partial_from"], d["power_law_from"], d["llc_plateau_from"])]
    show = lambda ds, *keys: "; ".join(f"run {d['run']} {d['head']}: " + ", ".join(f"{k} {d[k]:.0f}" for k in keys) for d in ds)
    claim("Collision detection emerges, c enters a power law and the LLC plateaus simultaneously, in most cases (§3, Fig. 1)",
          three, len(together) > len(three) / 2, together,
          f"{len(together)} of {len(three)} collision heads with all three events seen have them within a factor "
          f"{SIMULTANEOUS:g} in t (emergence: the score first >= {physim.PARTIAL_HEAD_SCORE}; the end-of-development power "
          f"law's start; the LLC plateau's onset); most: more than half. " + show(three, "partial_from", "power_law_from",
          "llc_plateau_from") if three else "no collision head has all three events: an LLC plateau needs >= 2 "
          "equilibrated estimates", "in most cases (Fig. 1)")
    # §4.3: "the power law dynamics of a computational component become clear well before the [LLC] plateaus".
    both = [d for d in lines if None not in (d["power_law_from"], d["llc_plateau_from"])]
    before = [d for d in both if d["power_law_from"] < d["llc_plateau_from"]]
    claim("The power law becomes clear before the LLC plateaus (§4.3)", both, len(before) > len(both) / 2, before,
          f"{len(before)} of {len(both)} collision heads with both events seen enter their power law at an earlier step than "
          "their LLC plateaus; most: more than half. " + show(both, "power_law_from", "llc_plateau_from") if both else
          "no collision head has both a power law and an LLC plateau (>= 2 equilibrated estimates)", "well before")
    # §3.3, Fig. 1 (bottom): a partial head becomes a true head, its exponent changing sharply at a breakpoint and
    # its LLC moving to a higher plateau. Found as consecutive power-law pieces over which the class changes. The
    # control: the quiet heads' LLC at the same checkpoints must rise less (else the rise is not the head's own).
    found = []
    for h in collision:
        laws = [p for p in h["pieces"] if p.is_power_law]
        score_at = lambda step: float(np.interp(step, h.get("t", [0.0]), h.get("score_t", [h["score"]])))
        for a, b in zip(laws, laws[1:]):
            if physim.PARTIAL_HEAD_SCORE <= score_at(a.end) < TRUE_HEAD <= score_at(b.end):
                llc_a, llc_b = (dict(trusted_llc(llc_rows, h, p.start, p.end)) for p in (a, b))
                rise = np.mean(list(llc_b.values())) - np.mean(list(llc_a.values())) if llc_a and llc_b else None
                quiet = [(dict(trusted_llc(llc_rows, q, a.start, a.end)), dict(trusted_llc(llc_rows, q, b.start, b.end)))
                         for q in others if q["run"] == h["run"]]
                control = [np.mean([qb[s] for s in llc_b if s in qb]) - np.mean([qa[s] for s in llc_a if s in qa])
                           for qa, qb in quiet if set(llc_a) & set(qa) and set(llc_b) & set(qb)]
                found.append({"head": f"run {h['run']} {h['layer']}-{h['head']}", "at": b.start, "from": a.exponent, "to": b.exponent,
                              "sharp": abs(b.exponent - a.exponent) > a.exponent_ci + b.exponent_ci, "rise": rise,
                              "control": max(control) if control else None,
                              "higher": None if rise is None else rise > 0 and (not control or rise > max(control))})
    claim("A partial head becomes a true head at a breakpoint: the exponent changes sharply and the LLC rises to a higher "
          "plateau (§3.3, Fig. 1)", True, any(f["sharp"] and f["higher"] for f in found), any(f["sharp"] for f in found),
          (f"{len(found)} transitions found (a head partial at the end of one power-law piece and true at the end of the "
           "next): " + "; ".join(f"{f['head']} at step {f['at']:.0f}: t^{f['from']:+.2f} -> t^{f['to']:+.2f}"
                                 + ("" if f["sharp"] else " (not beyond the two 95 % intervals)")
                                 + (", LLC not measured on both sides (equilibrated)" if f["rise"] is None else
                                    f", LLC {f['rise']:+.2f} after" + ("" if f["control"] is None else
                                    f" against the quiet control's {f['control']:+.2f} at the same checkpoints")
                                    + ("" if f["higher"] else ": not the head's own rise")) for f in found)) if found else
          "no head changes from partial to true between two power-law pieces", "shown in Fig. 1 (bottom)")
    return claims

# --- Figures (the paper's Figs. 1-7 and 13-15 from a results folder) --------------------------------------------------

def save_figure(fig, path: str, dpi: int = 120, **layout) -> None:
    fig.tight_layout(**layout)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)

def plot_score_histogram(metrics, train_cfg: TrainConfig, path: str, runs_label: str) -> None:
    """Figs. 2 and 8-12: a 2-D histogram of all heads' collision scores at the evenly spaced checkpoints."""
    even = set(np.linspace(0, train_cfg.steps, train_cfg.even_checkpoints + 1).round().astype(int).tolist())
    keep = [np.isin(m.steps, list(even)) for m in metrics]
    xs = np.concatenate([np.repeat(m.steps[k], m.score.shape[1] * m.score.shape[2]) for m, k in zip(metrics, keep)])
    ys = np.concatenate([m.score[k].reshape(-1) for m, k in zip(metrics, keep)])
    hist, xe, ye = np.histogram2d(xs, ys, bins=[train_cfg.even_checkpoints + 1, 40],
                                  range=[[-train_cfg.steps / train_cfg.even_checkpoints / 2,
                                          train_cfg.steps * (1 + 0.5 / train_cfg.even_checkpoints)], [0, 1]])
    vmax = np.percentile(hist[hist > 0], 95) if (hist > 0).any() else 1
    fig, ax = plt.subplots(figsize=(8, 4))
    fig.colorbar(ax.pcolormesh(xe, ye, hist.T, cmap="magma", vmax=vmax), ax=ax,
                 label="number of heads (clipped at 95th percentile)")
    ax.set(xlabel="training step", ylabel="collision detection score",
           title=f"Collision detection scores of all {metrics[0].score[0].size * len(metrics)} heads of {runs_label} over training")
    save_figure(fig, path)

def band(ax, t, c, se, colour) -> None:
    """|c(t)| ± its bootstrap standard error as a shaded band on log axes (clipped where it reaches 0)."""
    low = np.clip(np.abs(c) - se, np.abs(c) / 10, None)
    ax.fill_between(t, low, np.abs(c) + se, color=colour, alpha=0.25, lw=0)

def plot_correlations(m: Metrics, path: str, run: int) -> None:
    """|c(t)| ± its standard error on log-log axes for every head, a panel per block; true collision heads bold."""
    (L, H), t = m.score.shape[1:], m.steps > 0
    fig, axes = plt.subplots(1, L, figsize=(4 * L, 3.6), sharey=True, squeeze=False)
    for l, ax in enumerate(axes[0]):
        for h in range(H):
            final = m.score[-1, l, h]
            line, = ax.loglog(m.steps[t], np.abs(m.corr[t, l, h]), lw=2.2 if final >= TRUE_HEAD else 0.9,
                              label=f"head {l}-{h} ({final:.2f})")
            band(ax, m.steps[t], m.corr[t, l, h], m.corr_se[t, l, h], line.get_color())
        ax.set(title=f"run {run}, block {l}", xlabel="training step t")
        ax.legend(fontsize=6, title="head (final score)", title_fontsize=6)
    axes[0, 0].set_ylabel("|c(t)| ± standard error")
    save_figure(fig, path)

def plot_attention(model: physim.ParticleTransformer, final_score: np.ndarray, preset: Preset,
                   trajectory: torch.Tensor, path: str, heads: list | None = None) -> None:
    """Fig. 3: the attention (a line i -> j, opacity α_ij) of `heads` (default: the best head, the best partial head,
    if any, and a non-collision head), in free fall and settled."""
    states = torch.stack([trajectory[30], trajectory[-1]])                  # free fall, settled
    with torch.no_grad():
        _, attn = model(states, return_attention=True)                    # (L, 2, H, N, N+1)
    flat, H = final_score.reshape(-1), final_score.shape[1]
    partial = [i for i in np.argsort(-flat) if physim.PARTIAL_HEAD_SCORE <= flat[i] < TRUE_HEAD][:1]
    heads = heads or [divmod(int(i), H) for i in [flat.argmax(), *partial, np.abs(flat).argmin()]]
    fig, axes = plt.subplots(2, len(heads), figsize=(6 * len(heads), 6.5), squeeze=False)
    for col, (l, h) in enumerate(heads):
        for row, name in enumerate(["free fall (t = 30)", f"settled (t = {preset.sim.n_steps})"]):
            ax = axes[row, col]
            p = states[row, :, :2].cpu().numpy()
            a = attn[l, row, h, :, :-1].cpu().numpy()                          # (N, N), zero slot dropped
            i, j = np.nonzero(a > 0.02)
            segments, colors = np.stack([p[i], p[j]], 1), np.zeros((len(i), 4))
            colors[:, 0], colors[:, 3] = 0.85, a[i, j]
            ax.add_collection(matplotlib.collections.LineCollection(segments, colors=colors, linewidths=1.2))
            for xy in p:
                ax.add_patch(plt.Circle(xy, preset.sim.diameter / 2, fill=False, lw=0.6, color="0.3"))
            ax.set(xlim=(0, preset.sim.box_width), ylim=(0, preset.sim.box_height), aspect="equal", xticks=[], yticks=[])
            ax.set_title(f"head {l}-{h} (score {final_score[l, h]:.2f}), {name}", fontsize=9)
    save_figure(fig, path)

LLC_SMOOTHING = 3  # free choice: B.2's "small, fixed-width sliding window", in LLC checkpoints (centred)

def smoothed(values: np.ndarray, width: int = LLC_SMOOTHING) -> np.ndarray:
    """Mean over a centred window of `width` points (narrower at the ends), non-finite ones left out (B.2)."""
    windows = [values[max(0, i - width // 2):i + width // 2 + 1] for i in range(len(values))]
    return np.array([w[np.isfinite(w)].mean() if np.isfinite(w).any() else np.nan for w in windows])

def plot_llc(rdir: str, m: Metrics, preset: Preset, fig_dir: str, run: int) -> list[dict]:
    """Fig. 1 (top) for every head with LLC estimates: |c(t)| ± se and the LLC; and its SGLD traces; then the LLC of
    every head on one axis."""
    rows = read_csv_rows(os.path.join(rdir, "llc.csv"))
    with reading(os.path.join(rdir, "llc.csv")):
        for r in rows:
            r.update({key: int(r[key]) for key in ("step", "layer", "head", "healthy_chains", "chains")},
                     equilibrated=r["equilibrated"] == "True")
    records = {}
    for step in sorted({r["step"] for r in rows}):
        with reading(path := llc_path(rdir, step)):
            records[step] = read_json(path)
    t = m.steps > 0
    for l, h in sorted({(r["layer"], r["head"]) for r in rows}):
        mine = [r for r in rows if (r["layer"], r["head"]) == (l, h)]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.loglog(m.steps[t], np.abs(m.corr[t, l, h]), color="tab:blue", label="|c(t)| ± standard error")
        band(ax, m.steps[t], m.corr[t, l, h], m.corr_se[t, l, h], "tab:blue")
        ax.set(xlabel="training step t", ylabel="|c(t)|, attention-distance correlation",
               title=f"run {run}, head {l}-{h} (final collision score {m.score[-1, l, h]:.2f})")
        ax2 = ax.twinx()
        steps, llc = np.array([r["step"] for r in mine]), np.array([float(r["llc"]) for r in mine])
        flagged = np.array([not r["equilibrated"] for r in mine])
        for hollow, name in ((False, "LLC, equilibrated"), (True, "LLC, not equilibrated (no claim uses it)")):
            pick = flagged == hollow
            if pick.any():
                ax2.errorbar(steps[pick], llc[pick], [float(r["llc_stderr"]) for r, p in zip(mine, pick) if p], label=name,
                             color="tab:green", marker="o", ms=4, ls="none", mfc="white" if hollow else "tab:green")
        ax2.plot(steps, smoothed(llc), color="tab:green", lw=1.5, label=f"LLC smoothed ({LLC_SMOOTHING}-point window)")
        ax2.set_ylabel("parameter-restricted LLC", color="tab:green")
        fig.legend(loc="lower center", ncol=2, fontsize=7)            # below the axes: it hides no point
        save_figure(fig, os.path.join(fig_dir, f"llc_run{run}_head{l}-{h}.png"), rect=(0, 0.12, 1, 1))
        cols, nrows = min(len(mine), 4), math.ceil(len(mine) / min(len(mine), 4))
        fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.6 * nrows), squeeze=False)
        for ax, r in zip(axes.flat, mine):
            record = records[r["step"]]
            head = next(x for x in record["heads"] if (x["layer"], x["head"]) == (l, h))
            x = (np.arange(len(head["trace"][0])) + 0.5) * record["trace_thinning"]
            for trace, health in zip(head["trace"], head["health"]):
                ax.plot(x, trace, lw=0.6, color="tab:red" if health != "healthy" else None)
            ax.axvline(preset.llc.burn_in, color="black", ls=":", lw=0.8)
            ax.axhline(np.mean(head["init_loss"]), color="black", ls="--", lw=0.8)
            ax.set_title(f"step {r['step']}: LLC {float(r['llc']):.3g}, " + ("equilibrated" if r["equilibrated"] else
                         "not equilibrated"), fontsize=7)
            ax.tick_params(labelsize=6)
        for ax in list(axes.flat)[len(mine):]:
            ax.axis("off")
        fig.suptitle(f"SGLD traces, run {run}, head {l}-{h}: L(w0) + L_m(w_t) - L_m(w0) per chain (minibatch noise "
                     "paired out); dotted = burn-in, dashed = L(w0), red = unhealthy", fontsize=8)
        save_figure(fig, os.path.join(fig_dir, f"llc_traces_run{run}_head{l}-{h}.png"), dpi=110)
    fig, ax = plt.subplots(figsize=(7, 4))                        # every LLC head on one axis: the controls' contrast
    style = {"true": ("-", 1.2), "partial": ("--", 1.5), "none": (":", 2.0)}
    for i, (l, h) in enumerate(sorted({(r["layer"], r["head"]) for r in rows}, key=lambda lh: -m.score[-1][lh])):
        mine, kind = [r for r in rows if (r["layer"], r["head"]) == (l, h)], physim.head_class(m.score[-1, l, h])
        color = "black" if kind == "none" else f"C{i}"
        ax.plot([r["step"] for r in mine], [float(r["llc"]) for r in mine], color=color, ls=style[kind][0], lw=style[kind][1],
                label=f"{l}-{h} ({kind if kind != 'none' else 'quiet'}, {m.score[-1, l, h]:.2f})")
        for r in mine:
            ax.errorbar(r["step"], float(r["llc"]), float(r["llc_stderr"]), color=color, marker="o", ms=3.5,
                        mfc=color if r["equilibrated"] else "white")
    ax.set(xscale="log", xlabel="training step t", ylabel="parameter-restricted LLC",
           title=f"run {run}: the LLC of every LLC head (hollow: not equilibrated)")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, os.path.join(fig_dir, f"llc_heads_run{run}.png"))
    return rows

def plot_energy(out: str, runs: list[int], preset: Preset, path: str) -> None:
    """Fig. 7: mean total energy along a rollout of each trained model and of the ground truth."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        result = read_json(os.path.join(run_dir(out, run), "simulator.json"))
        if run == runs[0]:
            ax.plot(result["energy_true"], color="black", lw=2, label="ground truth")
        ax.plot(result["energy_model"], lw=1, label=f"model, run {run}")
    ax.set_yscale("log")                   # a model that gains energy would otherwise flatten the truth
    ax.set(xlabel="simulation step", ylabel="total energy (reduced units, log scale)",
           title=f"Energy along {preset.rollout_steps}-step simulations (mean of {preset.rollout_states} states)")
    ax.legend()
    save_figure(fig, path)

def plot_losses(out: str, runs: list[int], path: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        losses = os.path.join(run_dir(out, run), "losses.csv")
        with reading(losses):
            rows = [r for r in read_csv_rows(losses) if int(r["step"]) > 0]
            steps = [int(r["step"]) for r in rows]
            for key, lw, name in (("train_loss", 0.8, "train (mean since last checkpoint)"),
                                  ("heldout_loss", 1.5, "held out")):
                ax.loglog(steps, [float(r[key]) for r in rows], lw=lw, label=f"{name}, run {run}")
    ax.set(xlabel="training step", ylabel="next-state MSE")
    ax.legend(fontsize=7)
    save_figure(fig, path)

def plot_head_classes(final_rows: list[dict], runs: list[int], model: ModelConfig, path: str) -> None:
    """Fig. 5: true (dark) and partial (light, stacked) collision heads per block at the end, a bar per run."""
    fig, ax = plt.subplots(figsize=(1.2 + 1.6 * model.n_blocks, 3.6))
    width, colours = 0.8 / len(runs), plt.cm.tab10.colors
    for i, run in enumerate(runs):
        x = np.arange(model.n_blocks) - 0.4 + (i + 0.5) * width
        count = {c: np.array([sum(r["class"] == c for r in final_rows if r["run"] == run and r["layer"] == l)
                              for l in range(model.n_blocks)]) for c in ("true", "partial")}
        ax.bar(x, count["true"], width, color=colours[i % 10], label=f"run {run}: true")
        ax.bar(x, count["partial"], width, bottom=count["true"], color=colours[i % 10], alpha=0.35,
               label=f"run {run}: partial")
    ax.set(xticks=range(model.n_blocks), xticklabels=[f"block {l}" for l in range(model.n_blocks)],
           ylabel="collision detection heads", ylim=(0, model.n_heads),
           title=f"True (score >= {TRUE_HEAD}) and partial (>= {physim.PARTIAL_HEAD_SCORE}) heads per block")
    ax.legend(fontsize=6, ncol=2)
    save_figure(fig, path)

def plot_power_laws(heads: list[dict], path: str) -> None:
    """|c(t)| ± se of every collision head of a run with its pieces (power laws red, the end of development thick)."""
    heads = [h for h in heads if h["class"] != "none"] or sorted(heads, key=lambda h: -h["score"])[:1]
    cols, nrows = min(len(heads), 4), math.ceil(len(heads) / min(len(heads), 4))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.8 * cols, 3 * nrows), squeeze=False)
    for ax, h in zip(axes.flat, heads):
        verdict = "power law at the end" if h["end"]["follows"] else "no power law at the end"
        ax.set_title(f"run {h['run']}, head {h['layer']}-{h['head']} ({h['class']}, {h['score']:.2f}): {verdict}",
                     fontsize=7)
        ax.loglog(h["t"], h["c"], color="tab:blue", lw=0.9)
        band(ax, h["t"], h["c"], h["c_se"], "tab:blue")
        for p in h["pieces"]:
            t = np.geomspace(p.start, p.end, 20)
            ax.loglog(t, np.exp(p.log_constant) * t ** p.exponent, color="tab:red" if p.is_power_law else "0.5",
                      lw=(3 if p is h["end"]["piece"] else 1.5) if p.is_power_law else 1, ls="-" if p.is_power_law else ":",
                      label=f"{p.exponent:+.2f} ± {p.exponent_ci:.2f}" if p.is_power_law else None)
        ax.set_xlabel("training step t", fontsize=7)
        ax.tick_params(labelsize=6)
        if any(p.is_power_law for p in h["pieces"]):
            ax.legend(fontsize=6, title="power law exponent", title_fontsize=6)
    for ax in list(axes.flat)[len(heads):]:
        ax.axis("off")
    fig.suptitle("|c(t)| ± standard error and the pieces of find_power_law_regimes (red: power-law regimes, thick: "
                 "the end of development; dotted: not a power law)", fontsize=8)
    save_figure(fig, path, dpi=110)

def plot_heads_side_by_side(heads: list[dict], path: str) -> None:
    """|c(t)| of every head of a run, the collision heads beside the others, by one rule: a head whose c follows a
    power law at the end of its development is drawn red, with that section thick; the rest grey."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, (title, group) in zip(axes, (("collision heads (true or partial)", [h for h in heads if h["class"] != "none"]),
                                         ("the other heads", [h for h in heads if h["class"] == "none"]))):
        for h in group:
            follows, p = h["end"]["follows"], h["end"]["piece"]
            ax.loglog(h["t"], h["c"], color="tab:red" if follows else "0.6", lw=0.8, alpha=0.9)
            if follows:
                inside = (h["t"] >= p.start) & (h["t"] <= p.end)
                ax.loglog(h["t"][inside], h["c"][inside], color="tab:red", lw=2.5)
                ax.annotate(f"{h['layer']}-{h['head']}", (h["t"][inside][-1], h["c"][inside][-1]), fontsize=6)
        n = sum(h["end"]["follows"] for h in group)
        ax.set(title=f"{title}: {n} of {len(group)} follow a power law", xlabel="training step t")
        ax.title.set_fontsize(9)
    axes[0].set_ylabel("|c(t)|")
    fig.suptitle(f"run {heads[0]['run']}: red, a power law at the end of development (thick: that section); grey, not",
                 fontsize=8)
    save_figure(fig, path, dpi=110)

def plot_exponents(table5: list[dict], path: str) -> None:
    """Fig. 6: every collision head's power-law exponents, ours beside Table 5's (95% bars only where <= ±0.05)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, rows, name in ((axes[0], paper_table5(), "paper, Table 5"), (axes[1], table5, "ours")):
        for i, r in enumerate(rows):
            ax.errorbar(i, r["exponent"], yerr=r["exponent_ci"] if r["exponent_ci"] <= 0.05 else None,
                        fmt="o", ms=4, color=plt.cm.tab10.colors[r["run"] % 10], capsize=2)
        ax.set_xticks(range(len(rows)), [f"{r['run']}:{r['layer']}-{r['head']}" for r in rows], rotation=90, fontsize=5)
        ax.axhline(0, color="0.6", lw=0.6)
        ax.set_title(f"{name}: {len(rows)} regimes", fontsize=9)
    axes[0].set_ylabel("exponent of |c| = A t^exponent")
    save_figure(fig, path)

@torch.no_grad()
def moved_particle_attention(model: physim.ParticleTransformer, state: torch.Tensor, particle: int,
                             positions: torch.Tensor) -> torch.Tensor:
    """Figs. 13-15: the attention (L, G, H, N+1) from `particle` of a state (N, 4) moved to each of `positions` (G, 2)."""
    states = state.expand(len(positions), -1, -1).clone()                       # (G, N, 4)
    states[:, particle, :2] = positions
    return model(states, return_attention=True)[1][:, :, :, particle]

def animate_rollout(model: physim.ParticleTransformer, final_score: np.ndarray, preset: Preset, path: str,
                    every: int = 5, queries: int = 4) -> None:
    """The collision head in motion (a GIF, and its middle frame as a PNG): the truth and the model's own rollout
    from an unseen state, with the attention of `queries` particles (line width = weight) in the best head and in
    the quietest head drawn on the model's states, a frame every `every` steps."""
    from matplotlib.animation import FuncAnimation, PillowWriter
    sim, T, N = preset.sim, preset.rollout_steps, preset.sim.n_particles
    truth = physim.simulate_states(sim, 1, physim.HELDOUT_SEED + 1, next(model.parameters()).device, T)[0]  # (T+1, N, 4)
    pred, frames = physim.rollout(model, truth[:1], T)[0], list(range(0, T + 1, every))
    flat, H = final_score.reshape(-1), final_score.shape[1]
    heads = [divmod(int(flat.argmax()), H), divmod(int(np.abs(flat).argmin()), H)]
    with torch.no_grad():                                                          # (L, F, H, N, N+1)
        attn = torch.cat([model(pred[frames[i:i + 64]], return_attention=True)[1] for i in range(0, len(frames), 64)], 1)
    who = np.linspace(0, N - 1, queries).round().astype(int)                       # the query particles
    fig, axes = plt.subplots(1, 3, figsize=(12, 2.6))
    discs, lines = [], []
    for k, ax in enumerate(axes):
        ax.set(xlim=(0, sim.box_width), ylim=(0, sim.box_height), aspect="equal", xticks=[], yticks=[])
        ax.set_title("ground truth" if k == 0 else "model, head {}-{} (score {:.2f})".format(
            *heads[k - 1], final_score[heads[k - 1]]), fontsize=8)
        colours = ["tab:green" if i in who and k else "0.6" for i in range(N)]
        discs.append(ax.add_collection(matplotlib.collections.EllipseCollection(
            sim.diameter, sim.diameter, 0, units="xy", offsets=np.zeros((N, 2)), offset_transform=ax.transData,
            facecolors=colours, edgecolors="0.3", linewidths=0.3)))
        lines.append(ax.add_collection(matplotlib.collections.LineCollection([], colors="tab:red")))

    def draw(f):
        for disc, states in zip(discs, (truth, pred, pred)):
            disc.set_offsets(states[frames[f], :, :2].cpu().numpy())
        p = pred[frames[f], :, :2].cpu().numpy()
        for line, (l, h) in zip(lines[1:], heads):
            a = attn[l, f, h, who, :N].cpu().numpy()                               # (queries, N)
            q, j = np.nonzero(a > 0.02)
            line.set_segments(np.stack([p[who[q]], p[j]], 1))
            line.set_linewidths(4 * a[q, j])
        fig.suptitle(f"step {frames[f]} of a {T}-step rollout: red lines, the attention of the green particles", fontsize=8)
    fig.tight_layout()
    draw(len(frames) // 2)
    fig.savefig(path.removesuffix(".gif") + ".png", dpi=90)
    FuncAnimation(fig, draw, frames=len(frames)).save(path, writer=PillowWriter(fps=25), dpi=60)
    plt.close(fig)

def plot_fig1(h: dict, m: Metrics, llc_rows: list[dict], path: str) -> None:
    """Fig. 1 at a glance for one head: collision score, |c(t)| with its regimes, and LLC on shared log axes."""
    fig, axes = plt.subplots(3, 1, figsize=(6.5, 7), sharex=True)
    t, lh = m.steps > 0, (h["layer"], h["head"])
    axes[0].semilogx(m.steps[t], m.score[t, lh[0], lh[1]], color="k")
    axes[0].set(ylabel="collision score", ylim=(0, 1), title=f"run {h['run']}, head {lh[0]}-{lh[1]} ({h['class']})")
    axes[1].loglog(h["t"], h["c"], color="tab:blue")
    band(axes[1], h["t"], h["c"], h["c_se"], "tab:blue")
    for p in h["pieces"]:
        x = np.geomspace(p.start, p.end, 20)
        axes[1].loglog(x, np.exp(p.log_constant) * x ** p.exponent, color="tab:red" if p.is_power_law else "0.5",
                       ls="-" if p.is_power_law else ":", label=f"t^{p.exponent:+.2f}" if p.is_power_law else None)
    axes[1].set_ylabel("|c(t)|")
    if any(p.is_power_law for p in h["pieces"]):
        axes[1].legend(fontsize=7)
    mine = [r for r in llc_rows if (r["run"], r["layer"], r["head"]) == (h["run"], *lh)]
    for trusted in (True, False):
        pick = [r for r in mine if r["equilibrated"] == trusted]
        axes[2].errorbar([r["step"] for r in pick], [float(r["llc"]) for r in pick], [float(r["llc_stderr"]) for r in pick],
                         color="tab:green", marker="o", ms=4, ls="none", mfc="tab:green" if trusted else "white",
                         label="equilibrated" if trusted else "not equilibrated")
    if mine:
        axes[2].legend(fontsize=7)
    axes[2].set(ylabel="LLC", xlabel="training step t", xscale="log")
    save_figure(fig, path)

def plot_moving_particle(model: physim.ParticleTransformer, final_score: np.ndarray, preset: Preset,
                         trajectory: torch.Tensor, fig_dir: str, run: int) -> None:
    """Figs. 13-15: the attention of one particle moved to 12 places (6 touching, 6 free) in three kinds of head."""
    state = trajectory[preset.sim.n_steps // 4]                                 # (N, 4), mid-way to settling
    particle = int(state[:, 1].argmax())                                         # the highest particle
    others, d = torch.cat([state[:particle, :2], state[particle + 1:, :2]]), preset.sim.diameter
    grid = torch.stack(torch.meshgrid(torch.arange(d, preset.sim.box_width - d / 2, d / 4),
                                      torch.arange(d / 2, preset.sim.box_height - d / 2, d / 4), indexing="xy"), -1
                       ).reshape(-1, 2).to(state)
    nearest = torch.cdist(grid, others).min(1).values
    places = []
    for lo, hi in ((0.98 * d, 1.05 * d), (2 * d, float("inf"))):                 # touching, free
        ok = grid[(nearest >= lo) & (nearest < hi)]
        if len(ok):
            places.append(ok[torch.linspace(0, len(ok) - 1, 6).round().long()])  # spread along the grid
    positions = torch.cat(places)
    attn = moved_particle_attention(model, state, particle, positions)    # (L, G, H, N+1)
    flat, H = final_score.reshape(-1), final_score.shape[1]
    partial = [i for i in np.argsort(-flat) if physim.head_class(flat[i]) == "partial"][:1]
    chosen = {"best head": divmod(int(flat.argmax()), H), **{"partial head": divmod(int(i), H) for i in partial}}
    chosen["no collision detection"] = divmod(int(np.abs(flat).argmin()), H)
    for kind, (l, h) in chosen.items():
        fig, axes = plt.subplots(3, 4, figsize=(14, 5.2))
        for g, ax in enumerate(axes.flat):
            if g >= len(positions):
                ax.axis("off")
                continue
            p = state[:, :2].clone()
            p[particle] = positions[g]
            a = attn[l, g, h].cpu()
            for j, xy in enumerate(p.cpu().numpy()):
                if j == particle:
                    ax.add_patch(plt.Circle(xy, d / 2, color="tab:green"))
                else:
                    ax.add_patch(plt.Circle(xy, d / 2, color="tab:red", alpha=float(a[j]), lw=0))
                    ax.add_patch(plt.Circle(xy, d / 2, fill=False, lw=0.4, color="0.4"))
            ax.set(xlim=(0, preset.sim.box_width), ylim=(0, preset.sim.box_height), aspect="equal", xticks=[], yticks=[])
            ax.set_title(f"to the zero key: {float(a[-1]):.2f}", fontsize=7)
        fig.suptitle(f"run {run}, head {l}-{h} ({kind}, score {final_score[l, h]:.2f}): attention of the green "
                     "particle moved over a fixed state (red opacity = attention)", fontsize=9)
        save_figure(fig, os.path.join(fig_dir, f"moving_particle_run{run}_head{l}-{h}.png"), dpi=100)

def calibration_figure(rows: list[dict], cal: physim.Calibration, preset_eps: float, path: str) -> None:
    """λ̂ ± se against ε at T (solid) and 2T (dotted), a panel per probed checkpoint, a line per head; hollow where a
    test fails; the selected ε (or the closest, where none passes) dashed."""
    steps = sorted({r["step"] for r in rows})
    fig, axes = plt.subplots(1, len(steps), figsize=(4 * len(steps), 3.4), squeeze=False)
    for ax, step in zip(axes[0], steps):
        for i, head in enumerate(sorted({r["head"] for r in rows})):
            mine = sorted((r for r in rows if r["step"] == step and r["head"] == head), key=lambda r: r["step_size"])
            ax.plot([r["step_size"] for r in mine], [r["llc"] for r in mine], color=f"C{i}", lw=1, label=f"head {head}")
            ax.plot([r["step_size"] for r in mine], [r["llc_2T"] for r in mine], color=f"C{i}", lw=1, ls=":")
            for r in mine:
                ax.errorbar(r["step_size"], r["llc"], yerr=r["llc_stderr"], color=f"C{i}", marker="o", ms=5,
                            mfc=f"C{i}" if r["passes"] else "white")
        ax.axvline(cal.closest[0], color="k", ls="--", lw=1, label="selected ε" if cal.step_size else "closest ε (none passes)")
        ax.axvline(preset_eps, color="grey", ls=":", lw=1, label="the preset's ε")
        ax.set(xscale="log", xlabel="SGLD step size ε", ylabel="λ̂ (mean of chains)", title=f"step {step}")
        grid = sorted({r["step_size"] for r in rows})
        ax.set_xticks(grid, [f"{e:g}" for e in grid], fontsize=7)
        ax.minorticks_off()
    axes[0][0].legend(fontsize=7)
    fig.suptitle(textwrap.fill("LLC calibration (dotted: chains of 2T; hollow: a test fails). " + cal.statement, 40 * len(steps)),
                 fontsize=8)
    save_figure(fig, path, dpi=110)

# --- The report: tables and REPORT.md ---------------------------------------------------------------------------------

def write_report(out: str, device: str) -> dict:
    """Every figure and table from the saved results in `out` (no training), then REPORT.md."""
    t0 = time.time()
    preset = preset_from_config(out)
    runs = finished_runs(out, preset)
    check(len(runs) > 0, f"{out} holds no finished run yet: nothing to report")
    if os.path.exists(os.path.join(out, "calibration.csv")):       # `calibrate`'s chains, judged by this code's rule
        rejudge_calibration(out, preset)
    os.makedirs(fig_dir := os.path.join(out, "figures"), exist_ok=True)
    metrics = {r: read_metrics(run_dir(out, r)) for r in runs}
    # One unseen trajectory for the attention figures (the held-out set's seed; 16x cheaper than it): (T+1, N, 4)
    trajectory = physim.simulate_states(preset.sim, 1, seed=987_654_321, device=device)[0]
    heads = power_law_analysis(metrics, out)
    final_rows, work = [], {}
    for run, m in metrics.items():
        final_rows += [{"run": run, "layer": l, "head": h, **{k: round(float(a[-1, l, h]), 4) for k, a in zip(
            ("collision_score", "collision_score_se", "correlation", "correlation_se"), m[1:5])},
            "class": physim.head_class(m.score[-1, l, h])} for l in range(m.score.shape[1]) for h in range(m.score.shape[2])]
        plot_correlations(m, os.path.join(fig_dir, f"correlation_run{run}.png"), run)
        latest = load_latest_checkpoint(run_dir(out, run))
        work[run] = {k: round(v, 1) for k, v in latest["history"].get("work_seconds", {}).items()}
        model = model_from_checkpoint(latest, device)
        plot_attention(model, m.score[-1], preset, trajectory, os.path.join(fig_dir, f"attention_run{run}.png"))
        decaying = [(h["layer"], h["head"]) for h in heads if h["run"] == run and h["class"] == "none" and h["end"]["follows"]]
        if decaying:   # the other heads whose c follows a power law, beside the best head (§3.2's contrast)
            best = divmod(int(m.score[-1].argmax()), m.score.shape[2])
            plot_attention(model, m.score[-1], preset, trajectory, os.path.join(fig_dir, f"attention_others_run{run}.png"),
                           [best] + decaying[:3])
        plot_score_histogram([m], preset.train, os.path.join(fig_dir, f"collision_scores_run{run}.png"), f"run {run}")
        plot_moving_particle(model, m.score[-1], preset, trajectory, fig_dir, run)
        animate_rollout(model, m.score[-1], preset, os.path.join(fig_dir, f"rollout_run{run}.gif"))
    write_csv(os.path.join(out, "final_heads.csv"), final_rows)
    plot_score_histogram(list(metrics.values()), preset.train, os.path.join(fig_dir, "collision_scores.png"),
                         f"{len(runs)} run(s)")
    plot_head_classes(final_rows, runs, preset.model, os.path.join(fig_dir, "head_classes.png"))
    plot_energy(out, runs, preset, os.path.join(fig_dir, "energy.png"))
    plot_losses(out, runs, os.path.join(fig_dir, "losses.png"))
    llc_rows = []
    for run, m in metrics.items():
        llc_rows += [{"run": run, **r} for r in plot_llc(run_dir(out, run), m, preset, fig_dir, run)]
    dropped = ("changes", "is_power_law", "verdict")
    table5 = [{**{k: h[k] for k in ("run", "layer", "head", "class")},
               **{k: v for k, v in asdict(p).items() if k not in dropped}}
              for h in heads if h["class"] != "none" for p in h["pieces"] if p.is_power_law]
    write_csv(os.path.join(out, "table5.csv"), table5,
              ["run", "layer", "head", "class"] + [f.name for f in fields(physim.Regime) if f.name not in dropped])
    for run in runs:
        plot_power_laws([h for h in heads if h["run"] == run], os.path.join(fig_dir, f"power_laws_run{run}.png"))
        plot_heads_side_by_side([h for h in heads if h["run"] == run], os.path.join(fig_dir, f"heads_by_class_run{run}.png"))
        best = max((h for h in heads if h["run"] == run), key=lambda h: h["score"])
        plot_fig1(best, metrics[run], llc_rows, os.path.join(fig_dir, f"fig1_run{run}_head{best['layer']}-{best['head']}.png"))
    plot_exponents(table5, os.path.join(fig_dir, "exponents.png"))
    sims = {r: read_json(os.path.join(run_dir(out, r), "simulator.json")) for r in runs}
    claims = check_claims(heads, llc_rows, sims, runs)
    write_json(os.path.join(out, "claims.json"), claims)
    finals = np.array([r["collision_score"] for r in final_rows])
    summary = {
        "runs": runs, "training_seconds_by_work": work, "true_collision_heads": int((finals >= TRUE_HEAD).sum()),
        "partial_collision_heads": int(((finals >= physim.PARTIAL_HEAD_SCORE) & (finals < TRUE_HEAD)).sum()),
        "heads": int(finals.size), "heads_below_0.2": int((finals < 0.2).sum()),
        "best_head": max(final_rows, key=lambda r: r["collision_score"]),
        "one_step_position_error": [s["one_step_position_error"] for s in sims.values()],
        "power_law_regimes_of_collision_heads": len(table5), "llc_estimates": len(llc_rows),
        "llc_unhealthy_chains": sum(r["chains"] - r["healthy_chains"] for r in llc_rows),
        "llc_chains": sum(r["chains"] for r in llc_rows), "llc_equilibrated": sum(r["equilibrated"] for r in llc_rows),
        "claims": {c["claim"]: c["verdict"] for c in claims}}
    add_time(out, "report", time.time() - t0, accumulate=False)
    write_markdown(out, preset, runs, final_rows, table5, heads, llc_rows, sims, claims, summary)
    return summary

def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(none)\n"
    cells = [[(f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}") if isinstance(v, float) else str(v) for v in r.values()]
             for r in rows]
    return "\n".join(["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])]
                     + ["| " + " | ".join(c) + " |" for c in cells]) + "\n"

def write_markdown(out: str, preset: Preset, runs: list[int], final_rows, table5, heads, llc_rows, sims, claims,
                   summary) -> None:
    """REPORT.md: every table and figure, with the paper's numbers beside ours."""
    timings = read_json(os.path.join(out, "timings.json"), default={})
    full, ours = asdict(FULL), asdict(preset)
    config_rows = [{"setting": f"{group}.{k}", "ours": v, "paper": full[group][k]} for group in
                   ("sim", "model", "train", "data", "llc") for k, v in ours[group].items() if v != full[group][k]]
    config_rows += [{"setting": k, "ours": ours[k], "paper": full[k]}
                    for k in ("runs", "rollout_states", "llc_checkpoints", "llc_heads", "llc_scope") if ours[k] != full[k]]

    def count(c, r, l):
        return sum(x["class"] == c for x in final_rows if x["run"] == r and x["layer"] == l)
    classes = [{"run": r, **{f"block {l}": f"{count('true', r, l)} true, {count('partial', r, l)} partial"
                             for l in range(preset.model.n_blocks)}} for r in runs]
    paper = paper_table5()
    t5 = [{"run": r["run"], "head": f"({r['layer']}, {r['head']})", "class": r["class"],
           "exponent": f"{r['exponent']:+.3f} ± {r['exponent_ci']:.3f}", "log A": round(r["log_constant"], 3),
           "R²": round(r["r2"], 3), "start step": int(r["start"]), "end step": int(r["end"]),
           "AR(1) exponent": f"{r['exponent_ar1']:+.3f} ± {r['exponent_ar1_ci']:.3f}",
           "curvature p": f"{r['curvature_p']:.2g}", "exponential p": f"{r['exponential_p']:.2g}"} for r in table5]
    ends = []
    for h in sorted(heads, key=lambda h: (h["class"] == "none", h["run"], h["layer"], h["head"])):   # collision heads first
        p = h["end"]["piece"]
        ends.append({"run": h["run"], "head": f"{h['layer']}-{h['head']}", "class": h["class"],
                     "verdict": "**power law**" if h["end"]["follows"] else "no", "why": h["end"]["why"],
                     "steps": f"{p.start:.0f}-{p.end:.0f}" if p else "", "span in t": f"{p.end / p.start:.3g}x" if p else "",
                     "exponent": f"{p.exponent:+.3f}" if p else "", "R²": f"{p.r2:.2f}" if p else "",
                     "change of abs(c) (95% bound)": f"{p.change:+.0%} ({p.change_bound:+.0%})" if p else "",
                     "abs(c) at the end": f"{h['c'][-1]:.3f} ± {h['c_se'][-1]:.3f}"})
    rhos = {h["run"]: h["rho"] for h in heads}
    decay = [r["exponent"] for r in table5 if r["exponent"] < 0]
    figures = sorted(os.listdir(os.path.join(out, "figures")))

    def images(*prefixes):
        return "\n".join("\n".join(f"![{f}](figures/{f})" for f in figures if f.startswith(p)) + "\n" for p in prefixes)
    work = "; ".join(f"run {run}: " + ", ".join(f"{k} {v:.0f} s" for k, v in sorted(w.items()))
                     + (f" (checkpoints: {w['checkpoint'] / (w.get('step', 0) + w.get('data chunk', 0)):.0%} of the "
                        "training work)" if w.get("step") else "") for run, w in summary["training_seconds_by_work"].items())
    l_m = (f"sum over each state’s 4N outputs (Appendix B.1), at nβ = {preset.llc.nbeta:g}" if preset.llc_loss == "sum" else
           f"mean over each state’s 4N outputs (F.mse_loss): nβ = {preset.llc.nbeta:g} on it is nβ = "
           f"{preset.llc.nbeta / (4 * preset.sim.n_particles):.3g} on B.1's sum, the `nbeta_sum` of llc.csv")
    true_mean = np.mean([r['collision_score'] for r in final_rows if r['class'] == 'true'] or [float('nan')])
    lines = [
        "# physim reproduction report\n",
        f"Results in `{out}`, runs {runs} of {preset.runs}; written {time.strftime('%Y-%m-%d %H:%M')} by `python "
        f"reproduce.py --report {out}` (also the last step of every run). Every number below is measured on these "
        "runs; the paper's numbers stand beside them where the paper gives any.\n",
        "The collision head in motion: the ground truth, and the model's own rollout with the attention of the best "
        "head and of a quiet head (the GIF; its middle frame below).\n",
        "".join(f"[![rollout](figures/rollout_run{r}.png)](figures/rollout_run{r}.gif)\n" for r in runs),
        "Fig. 1 at a glance (the best head): collision score, |c(t)| with its regimes, and the LLC.\n",
        images("fig1_run"),
        "## Configuration\n",
        "Settings that differ from the paper's (Tables 1-4; everything else is the paper's):\n",
        markdown_table(config_rows),
        "## Wall times\n",
        markdown_table([{"stage": k, "seconds": v} for k, v in timings.items()])
        + f"\nTotal: {sum(timings.values()) / 60:.1f} min, torch {torch.__version__}, {torch.get_num_threads()} threads. "
        + f"Training time by kind of work (to the last checkpoint): {work}.\n",
        "## The paper's claims, checked\n",
        markdown_table([{**c, "verdict": f"**{c['verdict']}**"} for c in claims]),
        "\nThe development of each collision head, the steps behind the last three claims (empty: not seen; the "
        "LLC plateau counts equilibrated estimates only):\n",
        markdown_table([{k: ("" if v is None else f"{v:.0f}" if isinstance(v, float) else v) for k, v in timeline(h, llc_rows).items()}
                        for h in heads if h["class"] != "none"]),
        "## Head classes (§3.1, Fig. 5)\n",
        f"Rule: a head is a true collision-detection head if its final collision score is >= {TRUE_HEAD}, partial if "
        f">= {physim.PARTIAL_HEAD_SCORE}, else none (the paper: a true cluster near 0.95 and partial clusters between "
        "about 0.3 and 0.8).\n",
        markdown_table(classes),
        f"\nOurs: {summary['true_collision_heads']} true and {summary['partial_collision_heads']} partial of "
        f"{summary['heads']} heads; the mean final score of our true heads is {true_mean:.2f} (paper: a cluster near "
        "0.95).\n",
        images("head_classes", "collision_scores"),
        "## Power laws of c(t) (Table 5, Fig. 6)\n",
        "The paper's rule (§3.2): at the end of its development (at the end of training, or before c stops changing) "
        "the correlation of a collision head evolves as a power law, a section of log|c| vs log t with a good linear "
        "fit. `physim.find_power_law_regimes` cuts each head's log|c| vs log t into straight pieces (checkpoints from "
        "1% of training on); a piece is a power-law regime if R² >= "
        f"{physim.RegimeConfig.min_r2} (Table 5 keeps 0.525 and up), |exponent| is from {physim.RegimeConfig.min_exponent} "
        f"to {physim.RegimeConfig.max_exponent} (Table 5's: 0.049 to 0.846; steeper is a jump) and |c| changes over it by >= "
        f"{physim.RegimeConfig.min_change:.0%} at the near end of its 95% interval (Table 5's least: 7%). c(t) drifts from checkpoint to checkpoint, so "
        "intervals and tests allow for AR(1) errors, with the coefficient ρ measured per run from c on the two halves of "
        "the held-out set (`physim.error_correlation`: their difference holds only the errors; "
        + ", ".join(f"run {r}: ρ = {v:.2f}" for r, v in rhos.items()) + "). `physim.end_of_development` takes the last "
        "such regime as the end of a head's development, and counts the head as following a power law if it decays "
        "there and an exponential decay does not fit its decaying stretch significantly better. Every piece, with its "
        "diagnostics, is in `regimes.csv`.\n",
        "**Each head at the end of its development** (collision heads first, then the others, by the same rule), "
        "beside that piece's steps, span in t, exponent, R² and the change of |c| over it (on its AR(1) line, and at "
        "the near end of its 95% interval), and |c| ± its bootstrap standard error at the end of training:\n",
        markdown_table(ends),
        images("heads_by_class"),
        ("The attention of the heads without collision detection whose c follows a power law (up to 3 a run), "
         "beside the best head:\n" + images("attention_others")) if any(f.startswith("attention_others") for f in figures)
        else "",
        "\n**Table 5, ours**: every power-law regime of a collision head (the exponent's ± is the paper's iid 95% "
        "interval; the AR(1) columns and the p values of a curvature and an exponential term are diagnostics):\n",
        markdown_table(t5),
        f"\nOurs: {len(table5)} regimes of collision heads, {len(decay)} with a negative exponent"
        + (f" (from {min(decay):+.3f} to {max(decay):+.3f}, median {np.median(decay):+.3f})" if decay else "")
        + f". Paper: {len(paper)} regimes, all negative, from {min(r['exponent'] for r in paper):+.3f} to "
        f"{max(r['exponent'] for r in paper):+.3f}, median {np.median([r['exponent'] for r in paper]):+.3f}, "
        f"R² {min(r['r2'] for r in paper):.2f}-{max(r['r2'] for r in paper):.2f}.\n",
        images("exponents", "power_laws"),
        "## Attention-distance correlation and the LLC (Fig. 1)\n",
        f"Each LLC is the mean over all {preset.llc.chains} chains ± its standard error, as the paper reports it, with "
        f"L_m the {l_m} (README: the loss convention). **Can it be trusted?** Each estimate's convergence verdict "
        f"(`physim.convergence`; README: the thresholds) says: {summary['llc_equilibrated']} of {len(llc_rows)} "
        "estimates are equilibrated. The others are drawn hollow and no claim uses them; their value measures how far "
        f"the chains got as much as the model. The figures draw every estimate and a {LLC_SMOOTHING}-point sliding "
        "mean (B.2's smoothing).\n",
        markdown_table([{"run": r["run"], "step": r["step"], "head": f"{r['layer']}-{r['head']}",
                         "LLC": f"{float(r['llc']):.3g} ± {float(r['llc_stderr']):.2g}",
                         "R̂": f"{float(r['rhat']):.3f}", "ESS": f"{float(r['ess']):.0f}", "drift (se)": f"{float(r['drift_z']):+.1f}",
                         "MALA": f"{np.floor(float(r['acceptance']) * 1000) / 1000:.3f}", "verdict": r["verdict"], "unhealthy chains": r["unhealthy"] or ""}
                        for r in llc_rows]),
        images("correlation_run", "llc_heads", "llc_run", "llc_traces"),
        "## Attention patterns (Fig. 3, Figs. 13-15)\n",
        images("attention_run", "moving_particle"),
        "## The model as a simulator (Appendix D.2, Fig. 7)\n",
        markdown_table([{"run": r, "one-step position error": f"{s['one_step_position_error']:.3g}",
                         "energy after rollout / true": f"{s['energy_model'][-1] / s['energy_true'][-1]:.3g}"}
                        for r, s in sims.items()]),
        "\nPaper: the fully trained models are stable simulators whose energy follows the ground truth.\n",
        images("energy", "losses"),
    ]
    write_text(os.path.join(out, "REPORT.md"), "\n".join(lines))

# --- Benchmarks (python reproduce.py bench) ---------------------------------------------------------------------------

def timed(fn, device: str) -> float:
    """Wall time of one call of fn, the work it queues on a CUDA device included."""
    synchronize = torch.cuda.synchronize if device == "cuda" else lambda: None
    synchronize()
    t0 = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - t0

def wall_time(fn, device: str, repeat: int = 3) -> float:
    """Median wall time of `repeat` calls of fn (after a warm-up call)."""
    fn()
    return float(np.median([timed(fn, device) for _ in range(repeat)]))

def with_fused(fused: bool, fn):
    """fn() with ParticleAttention.fused set to `fused` (restored to True after)."""
    physim.ParticleAttention.fused = fused
    try:
        return fn()
    finally:
        physim.ParticleAttention.fused = True

class MHABaseline(torch.nn.Module):
    """The training benchmark's baseline: ParticleAttention's function by eager nn.MultiheadAttention."""
    def __init__(self, embed_dim: int, n_heads: int):
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(embed_dim, n_heads, add_zero_attn=True, batch_first=True)

    def forward(self, x, need_weights: bool = False):
        self_mask = torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
        return self.mha(x, x, x, attn_mask=self_mask, need_weights=need_weights, average_attn_weights=False)

TINY_MLP_STEPS, SPLIT_HEAD_STEPS = 2000, 4   # bench's SGLD chain lengths: tiny MLP (half burn-in), per-head row

def bench(device: str, out: str) -> list[dict]:
    """Each batched, fused or compiled path against a plain baseline, both timed now: out/bench.csv's rows."""
    rows = []

    def row(benchmark: str, baseline: str, ours: str, units: float, t_base: float, t_ours: float) -> None:
        rows.append({"benchmark": benchmark, "baseline": baseline, "ours": ours,
                     "baseline steps/s": round(units / t_base, 2), "ours steps/s": round(units / t_ours, 2),
                     "speedup": round(t_base / t_ours, 2), "device": device, "threads": torch.get_num_threads()})

    def chains_row(name: str, net, data, subset, cfg: LLCConfig) -> float:
        alone = [LLCConfig(**{**asdict(cfg), "chains": 1, "seed": cfg.seed + c}) for c in range(cfg.chains)]
        looped = wall_time(lambda: [physim.estimate_llc(net, mse, data, subset, c) for c in alone], device, 1)
        batched = wall_time(lambda: physim.estimate_llc(net, mse, data, subset, cfg), device, 1)
        row(name, "chains in a Python loop", "chains batched by vmap", cfg.chains * cfg.steps, looped, batched)
        return batched
    sim = SCALED.sim
    p, v = physim.random_initial_state(sim, 16, torch.Generator().manual_seed(0), device)
    row("simulator, 16 trajectories x 256 steps", "one trajectory at a time", "all 16 batched", 16 * 256,
        wall_time(lambda: [physim.simulate(p[i:i + 1], v[i:i + 1], sim, 256) for i in range(16)], device, 1),
        wall_time(lambda: physim.simulate(p, v, sim, 256), device, 1))
    torch.manual_seed(0)
    ours = physim.ParticleTransformer(FULL.model, FULL.sim).to(device)
    baseline = physim.ParticleTransformer(FULL.model, FULL.sim).to(device)
    for block in baseline.blocks:
        block.attn = MHABaseline(FULL.model.embed_dim, FULL.model.n_heads).to(device)
    baseline.load_state_dict({k.replace("attn.in_proj.weight", "attn.mha.in_proj_weight")
                               .replace("attn.in_proj.bias", "attn.mha.in_proj_bias")
                               .replace("attn.out_proj", "attn.mha.out_proj"): v for k, v in ours.state_dict().items()})
    x, y = physim.TrainingStream(FULL.sim, DataConfig(chunk_trajectories=4), FULL.train.batch_size, 0, device).batch(0)
    with torch.no_grad():
        check(torch.allclose(ours(x), baseline(x), atol=1e-4), "bench: the baseline model differs from ours")
    opt_ours, opt_base = torch.optim.Adam(ours.parameters()), torch.optim.Adam(baseline.parameters())
    row(f"training step, paper's model, batch {FULL.train.batch_size}", "eager nn.MultiheadAttention",
        "ParticleAttention (fused)", 1, wall_time(lambda: physim.training_step(baseline, opt_base, x, y), device, 5),
        wall_time(lambda: physim.training_step(ours, opt_ours, x, y), device, 5))
    torch.manual_seed(0)
    model = physim.ParticleTransformer(SCALED.model, SCALED.sim).to(device)
    x, y = physim.TrainingStream(SCALED.sim, DataConfig(chunk_trajectories=4), SCALED.train.batch_size, 0,
                                 device).batch(0)
    optimizers = {fused: torch.optim.Adam(model.parameters(), lr=SCALED.train.lr) for fused in (False, True)}
    row(f"training step, scaled preset, batch {SCALED.train.batch_size}", "explicit attention", "fused attention", 1,
        *(with_fused(fused, lambda: wall_time(lambda: physim.training_step(model, optimizers[fused], x, y), device, 30))
          for fused in (False, True)))
    t0 = time.perf_counter()
    compiled = torch.compile(model) if compile_works() else model
    physim.training_step(compiled, optimizers[True], x, y)       # compiles
    compile_seconds = time.perf_counter() - t0
    row(f"training step, scaled preset, batch {SCALED.train.batch_size} (compiling took {compile_seconds:.0f} s)",
        "eager", "torch.compile", 1, wall_time(lambda: physim.training_step(model, optimizers[True], x, y), device, 30),
        wall_time(lambda: physim.training_step(compiled, optimizers[True], x, y), device, 30))
    steps = min(2000, SCALED.train.steps)
    loop = TrainConfig(**{**asdict(SCALED.train), "steps": steps,
                          "even_checkpoints": max(1, round(steps * SCALED.train.even_checkpoints / SCALED.train.steps))})

    def scaled_loop(fused: bool) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            return with_fused(fused, lambda: timed(lambda: train_run(tmp, SCALED.sim, SCALED.model, loop, SCALED.data,
                                                                     device, label=None), device))
    row(f"training loop, scaled preset, {loop.steps} steps with data and {len(physim.checkpoint_steps(loop))} "
        "checkpoints", "explicit attention", "fused attention", loop.steps, scaled_loop(False), scaled_loop(True))
    head, mse = physim.head_parameters(model, 1, 0), torch.nn.functional.mse_loss
    states = physim.simulate_states(SCALED.sim, 4, seed=0, device=device)          # (4, T+1, N, 4)
    x, y = states[:, :-1].flatten(0, 1), states[:, 1:].flatten(0, 1)     # a fixed pool: time SGLD, not data
    for m, steps in ((8, 40), (256, 8)):
        chains_row(f"SGLD on one head, 8 chains, m={m}", model, physim.dataset_batches(x, y, m), head,
                   LLCConfig(batch_size=m, steps=steps, burn_in=steps // 2, chains=8))
    # A 2-16-16-1 tanh MLP regression, 8 chains at m = 64 on one thread (the size peer libraries benchmark).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        mlp = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                                  torch.nn.Linear(16, 1)).to(device)
        x = torch.randn(4096, 2, device=device)
        data = physim.dataset_batches(x, torch.sin(x.sum(1, keepdim=True)), 64)
        cfg = LLCConfig(step_size=1e-4, nbeta=100.0, batch_size=64, steps=TINY_MLP_STEPS,
                        burn_in=TINY_MLP_STEPS // 2, chains=8)
        everything = {n: None for n, _ in mlp.named_parameters()}
        batched = chains_row("SGLD on a 2-16-16-1 tanh MLP, 8 chains, m=64", mlp, data, everything, cfg)
        t0 = time.perf_counter()
        can_compile = compile_works()
        physim.estimate_llc(mlp, mse, data, everything, cfg, compile_step=can_compile)    # compiles, then runs the chains
        first = time.perf_counter() - t0
        compiled = wall_time(lambda: physim.estimate_llc(mlp, mse, data, everything, cfg, compile_step=can_compile),
                             device, 1)
        row(f"SGLD on a 2-16-16-1 tanh MLP, 8 chains, m=64 (compiling took {first - compiled:.1f} s)",
            "chains batched by vmap", "the same, torch.compile'd step", cfg.chains * cfg.steps, batched, compiled)
        # A head's LLC costs only what depends on it: a block-2 head of the paper's model, whole vs FromBlock.
        torch.manual_seed(0)
        full = physim.ParticleTransformer(FULL.model, FULL.sim).to(device)
        block = min(2, FULL.model.n_blocks - 1)
        states = physim.simulate_states(FULL.sim, 2, seed=0, device=device)              # (2, T+1, N, 4)
        data = physim.dataset_batches(states[:, :-1].flatten(0, 1), states[:, 1:].flatten(0, 1), 256)
        cfg = LLCConfig(batch_size=256, steps=SPLIT_HEAD_STEPS, burn_in=SPLIT_HEAD_STEPS - 4, chains=4)
        head, split = physim.head_parameters(full, block, 0), physim.FromBlock(full, block)
        row(f"SGLD on one head of block {block}, paper's model, 4 chains, m=256", "the whole model",
            f"FromBlock({block}) + prefix", cfg.chains * cfg.steps,
            wall_time(lambda: physim.estimate_llc(full, mse, data, head, cfg), device, 1),
            wall_time(lambda: physim.estimate_llc(split, mse, data, head, cfg, prefix=split.prefix), device, 1))
    finally:
        torch.set_num_threads(threads)
    os.makedirs(out, exist_ok=True)
    write_csv(os.path.join(out, "bench.csv"), rows)
    return rows

def projected_time(preset: Preset, device: str, label: str, repeat: int = 3) -> list[dict]:
    """`preset`'s wall time here: per stage, a unit's cost measured now (best of `repeat`) times the units all runs
    make; and a total."""
    sim, model_cfg, train_cfg, llc = preset.sim, preset.model, preset.train, preset.llc

    def simulation(trajectories: int, steps: int) -> float:
        """Seconds to simulate `trajectories` trajectories of `steps` steps (16 steps timed, scaled)."""
        p, v = physim.random_initial_state(sim, trajectories, torch.Generator().manual_seed(0), device)
        return wall_time(lambda: physim.simulate(p, v, sim, 16), device, 1) * steps / 16
    torch.manual_seed(0)
    model = physim.ParticleTransformer(model_cfg, sim).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=train_cfg.lr)
    stream = physim.TrainingStream(sim, preset.data, train_cfg.batch_size, 0, device)
    batches = [stream.batch(i % stream.batches_per_chunk) for i in range(256 // train_cfg.batch_size + 1)]
    pool_x, pool_y = (torch.cat(part)[:256] for part in zip(*batches))                  # (256, N, 4) each
    steps = itertools.count(1)

    def train_step():
        physim.training_step(model, optimizer, *stream.batch(next(steps) % stream.batches_per_chunk))
    heldout = pool_x[torch.arange(preset.data.heldout_states) % len(pool_x)]
    resamples = physim.bootstrap_weights(len(heldout), preset.data.bootstrap)

    def checkpoint():
        physim.head_metrics(model, heldout, heldout, resamples)
        with tempfile.TemporaryDirectory() as tmp:
            save_torch(os.path.join(tmp, "c.pt"), {"model": model.state_dict(), "optimizer": optimizer.state_dict()})
            save_torch(os.path.join(tmp, "w.pt"), {"model": {k: v.half() for k, v in model.state_dict().items()}})
    data_share = simulation(preset.data.chunk_trajectories, sim.n_steps) / stream.batches_per_chunk
    rows = [("training", f"training step, batch {train_cfg.batch_size}, with its data",
             wall_time(lambda: [train_step() for _ in range(20)], device, repeat) / 20 + data_share, train_cfg.steps),
            ("training", f"held-out metrics on {preset.data.heldout_states} states and a checkpoint",
             wall_time(checkpoint, device, repeat), len(physim.checkpoint_steps(train_cfg))),
            ("training", f"simulating the held-out set ({preset.data.heldout_states} trajectories)",
             math.ceil(preset.data.heldout_states / 32) * simulation(min(32, preset.data.heldout_states), sim.n_steps), 1)]
    with torch.no_grad():
        step_b = wall_time(lambda: model(pool_x[:preset.rollout_states]), device, repeat + 2)
        step_256 = wall_time(lambda: model(pool_x), device, repeat)
    rollout = (simulation(preset.rollout_states, preset.rollout_steps) + preset.rollout_steps * step_b
               + math.ceil(preset.rollout_states * preset.rollout_steps / 256) * step_256)
    rows.append(("rollout", f"{preset.rollout_states} states x {preset.rollout_steps} steps, and the truth", rollout, 1))
    # The heads, spread over blocks 1 to L-1 (none in block 0): the later a head's block, the cheaper its SGLD step.
    later = max(model_cfg.n_blocks - 1, 1)
    heads = [(min(1 + i % later, model_cfg.n_blocks - 1), i // later % model_cfg.n_heads)
             for i in range(preset.llc_heads + 1)]
    data = physim.dataset_batches(pool_x, pool_y, llc.batch_size)
    group = len(heads)

    def sgld(n_heads: int, chains: int, n_steps: int) -> float:
        cfg = LLCConfig(**{**asdict(llc), "steps": n_steps, "burn_in": 0, "chains": chains})

        def run():
            nonlocal group
            _, group = llc_of_heads(model, LLC_LOSSES[preset.llc_loss], data, heads[:n_heads], cfg, min(group, n_heads))
        return timed(run, device)

    def per_step(n_heads: int, chains: int) -> float:
        short = sgld(n_heads, chains, 4)                  # the first call also pays one-off set-up costs
        if short >= 4:
            return short / 4
        return (sgld(n_heads, chains, 24) - sgld(n_heads, chains, 4)) / 20   # cheap: difference out fixed costs
    # All heads x chains batched, as run_llc does. A CPU out of memory is killed, so past 2^18 particle-rows a step
    # (~16 GB) one chain is timed with 1 and 2 heads and scaled (L_m(w0) is shared by the heads, the rest is per head).
    if device == "cpu" and len(heads) * llc.chains * llc.batch_size * sim.n_particles > 2 ** 18:
        one, two = per_step(1, 1), per_step(2, 1)
        sgld_step, groups = llc.chains * (2 * one - two + len(heads) * (two - one)), 1
        how = "timed on 1 chain with 1 and 2 heads, scaled to all"
    else:
        sgld_step = per_step(len(heads), llc.chains)
        groups = math.ceil(len(heads) / group)
        how = f"{group} of {len(heads)} heads batched"
    # run_llc's data: every chain simulates its own chunks of fresh trajectories, once per group of heads
    chunk = llc_chunk_trajectories(preset)
    chunks = math.ceil(llc.steps / (chunk * sim.n_steps // llc.batch_size))
    llc_data = groups * llc.chains * chunks * simulation(chunk, sim.n_steps)
    estimates = len(llc_steps(physim.checkpoint_steps(train_cfg), preset.llc_checkpoints)) * len(heads)
    rows.append(("LLC", f"one (head, checkpoint): {llc.chains} chains x {llc.steps} SGLD steps at m = "
                        f"{llc.batch_size}, {how}", (llc.steps * sgld_step + llc_data) / len(heads), estimates))
    table = [{"preset": label, "stage": stage, "unit": unit, "unit seconds": round(t, 4), "units": n * preset.runs,
              "seconds": round(t * n * preset.runs, 1), "hours": round(t * n * preset.runs / 3600, 2)}
             for stage, unit, t, n in rows]
    total = sum(r["seconds"] for r in table)
    table.append({"preset": label, "stage": "total", "unit": f"{preset.runs} run(s) on one {device} device",
                  "unit seconds": "", "units": "", "seconds": round(total, 1), "hours": round(total / 3600, 2)})
    return table

# --- Command line -----------------------------------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description="Reproduce 'Emergence of Computational Structure in a Neural Network "
                                                 "Physics Simulator'.")
    add = parser.add_argument
    add("command", nargs="?", choices=["run", "bench", "calibrate"], default="run", help="run: train, measure and draw "
        "everything (default); bench: time the batched parts against plain baselines (bench.csv) and project the wall time "
        "of the scaled and the --full run on this device (projection.csv); calibrate: probe the LLC's step size on a "
        "trained run in --out (calibration.csv, .json, .png)")
    add("--full", action="store_true", help="the paper's configuration (Tables 2-4, five runs of 64 000 steps); default is "
        "the scaled-down run that fits a 2-core CPU in 12-15 minutes")
    add("--medium", action="store_true", help="the paper's training recipe (Table 2) on a smaller model, one run: the "
        "paper's dynamics in about 3 hours on a 2-core CPU (about 2 h of training, 58 min of LLC measured)")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to compute: auto picks cuda when "
        "available (default: auto)")
    add("--seeds", type=int, default=None, metavar="N", help="N runs (seeds 0 ... N-1) instead of the preset's (1, or 5 "
        "with --full); a folder grows to more seeds by re-running with a larger N")
    add("--runs", default=None, metavar="LIST", help="comma-separated run numbers to do in this call, e.g. 0,3 (default: "
        "all); calls for different runs can share one --out, e.g. one per GPU or Slurm task")
    add("--llc-shard", default=None, metavar="I/N", help="only the LLC estimates of shard I of N (e.g. 3/16) over the "
        "(run, checkpoint) pairs of the runs already trained in --out; many such calls (jobs) can share one --out, and "
        "--report then merges what is there")
    add("--no-llc", action="store_true", help="train and roll out only, no LLC and no report: the LLC stage is then spread "
        "over --llc-shard calls, and --report merges it all")
    add("--time-limit", default=None, metavar="DURATION", help="stop cleanly after this long (e.g. 3h50m, 90m or 3:50:00: "
        "a little under a job's wall limit), saving what a resume needs, and exit with status 75; SIGUSR1 does the same "
        "(Slurm: --signal=B:USR1@300). Re-run to resume")
    add("--compile", action="store_true", help="train a torch.compile'd model (falls back to eager where compiling fails)")
    add("--report", metavar="DIR", default=None, help="rebuild every figure, table and DIR/REPORT.md from the results "
        "saved in DIR, without training (whatever runs are finished there)")
    add("--llc-scope", choices=sorted(LLC_SCOPES), default=None, help="which LLC estimates to make: " + "; ".join(
        f"{k}: {v}" for k, v in LLC_SCOPES.items()) + " (default: the preset's)")
    add("--step-sizes", default=None, metavar="LIST", help="calibrate: the step sizes ε to probe, e.g. 4e-3,8e-3,1.6e-2 "
        "(default: the preset's ε x 0.25, 0.5, 1, 2, 4)")
    add("--llc-steps", type=int, default=None, metavar="T", help="calibrate: the chain length T of the estimates (chains "
        f"run 2T; default: the preset's, at most {CALIBRATION_MAX_STEPS}; burn-in in the preset's proportion)")
    add("--checkpoints", default=None, metavar="LIST", help="calibrate: the LLC checkpoint steps to probe, e.g. 64000 "
        "(default: the first, middle and last)")
    add("--out", default=None, help="output folder (default: runs/full with --full, runs/medium with --medium, runs/bench "
        "for bench, else runs/scaled); re-running into the same folder resumes")
    return parser.parse_args(argv)

def main(argv=None) -> int:
    args = parse_args(argv)
    preset = FULL if args.full else MEDIUM if args.medium else SCALED
    out = args.out or os.path.join("runs", "bench" if args.command == "bench" else "full" if args.full else
                                   "medium" if args.medium else "scaled")
    alarm = getattr(signal, "SIGALRM", None)                   # --time-limit's timer (not on Windows)
    stop_signals = [signal.SIGTERM]
    if args.command == "run":                                  # stops that say "saved: re-run to resume"
        stop_signals += [signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else []
        stop_signals += [alarm] if args.time_limit is not None and alarm is not None else []
    previous_handlers = {signum: signal.signal(signum, _stop) for signum in stop_signals}
    STOPPED_BY.clear()
    try:
        check(not os.path.exists(out) or os.path.isdir(out),
              f"--out {out} is a file, not a folder: name a folder for the results")
        unused = ["--runs", "--seeds", "--compile", "--full", "--medium", "--report", "--llc-shard", "--no-llc",
                  "--time-limit", "--llc-scope"] if args.command != "run" else []
        unused = [f for f in unused if args.command == "bench" or f not in ("--full", "--medium")]
        unused += ["--step-sizes", "--llc-steps", "--checkpoints"] if args.command != "calibrate" else []
        given = [flag for flag in unused if getattr(args, flag[2:].replace("-", "_")) not in (None, False)]
        check(not given, f"{args.command} does not use {', '.join(given)}: drop it")
        check(not (args.report and args.llc_shard),
              "--report and --llc-shard do not go together: run the shards, then --report")
        check(not (args.full and args.medium), "--full and --medium do not go together: choose one")
        check(args.seeds is None or args.seeds >= 1, f"--seeds wants a number of runs >= 1, got {args.seeds}")
        check(args.seeds is None or not (args.report or args.llc_shard),
              "--seeds goes with a training call, not with --report or --llc-shard")
        if args.seeds is not None:
            preset = replace(preset, runs=args.seeds)
        if args.llc_scope is not None:
            preset = replace(preset, llc_scope=args.llc_scope)
        check(args.llc_scope is None or not args.report, "--llc-scope goes with the call that estimates, not with "
              "--report (which reports what the folder holds)")
        check(not (args.no_llc and (args.report or args.llc_shard)),
              "--no-llc goes with a training call, not with --report or --llc-shard")
        if args.time_limit is not None:
            check(alarm is not None, "--time-limit needs SIGALRM, which this system lacks")
            signal.alarm(parse_duration(args.time_limit))
        device = resolve_device(args.device)
        t0 = time.time()
        if args.report:
            summary = write_report(args.report, device)
            print(f"wrote {os.path.join(args.report, 'REPORT.md')}: " + "; ".join(
                f"{claim}: {verdict}" for claim, verdict in summary["claims"].items()))
            return 0
        if args.command == "bench":
            print(markdown_table(bench(device, out)))
            projection = projected_time(SCALED, device, "scaled") + projected_time(FULL, device, "full")
            write_csv(os.path.join(out, "projection.csv"), projection)
            print(f"Projected wall time on this {device} device (projection.csv):\n" + markdown_table(projection))
            return 0
        if args.command == "calibrate":
            probe = {}
            for flag, kind in (("step_sizes", float), ("checkpoints", int)):
                try:
                    probe[flag] = None if getattr(args, flag) is None else [kind(v) for v in getattr(args, flag).split(",")]
                except ValueError:
                    raise ValueError(f"--{flag.replace('_', '-')} wants comma-separated numbers, got "
                                     f"{getattr(args, flag)!r}") from None
            check(all(e > 0 for e in probe["step_sizes"] or [1]), "--step-sizes must be positive")
            check(args.llc_steps is None or args.llc_steps >= 8, f"--llc-steps wants T >= 8, got {args.llc_steps}")
            print(calibrate(out, device, probe["step_sizes"], args.llc_steps, probe["checkpoints"]).statement)
            return 0
        if args.llc_shard is not None:
            try:
                shard, shards = (int(k) for k in args.llc_shard.split("/"))
            except ValueError:
                raise ValueError(f"--llc-shard wants I/N such as 3/16, got {args.llc_shard!r}") from None
            check(1 <= shard <= shards, f"--llc-shard {args.llc_shard}: I must be 1 ... N")
            check(args.runs is None, "--llc-shard takes no --runs: a shard covers every trained run")
            done = llc_shard(preset, out, device, shard, shards)
            print(f"shard {shard}/{shards}: its {done} LLC estimates are in {out}; --report {out} reports "
                  "every run whose estimates are all there")
            return 0
        try:
            runs = None if args.runs is None else sorted({int(r) for r in args.runs.split(",")})
        except ValueError:
            raise ValueError(f"--runs wants comma-separated run numbers such as 0,3, got {args.runs!r}") from None
        summary = reproduce(preset, out, device, runs, args.compile, llc=not args.no_llc)
        if summary is None:
            print(f"trained and rolled out in {time.time() - t0:.0f} s; the LLC stage: --llc-shard I/N calls "
                  f"into {out}, then --report {out}")
            return 0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        where = f" {e.where}" if isinstance(e, Interrupted) else ""
        by = STOPPED_BY.get("signal")
        if by is not None and by != signal.SIGTERM:
            what = f"--time-limit {args.time_limit}" if by == alarm else "SIGUSR1"
            print(f"\nstopped by {what}{where}; what a resume needs is saved: re-run the same command to resume",
                  file=sys.stderr)
            return EXIT_TIME_UP
        print(f"\ninterrupted{where}; re-run the same command to resume", file=sys.stderr)   # below the progress line
        return EXIT_INTERRUPTED
    finally:
        if alarm in previous_handlers:
            signal.alarm(0)
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
    print(f"done in {time.time() - t0:.0f} s on {device}: {summary['true_collision_heads']} of "
          f"{summary['heads']} heads end with collision score >= {TRUE_HEAD}, {summary['heads_below_0.2']} "
          f"below 0.2; best head {summary['best_head']}. Results in {out}/")
    return 0

if __name__ == "__main__":
    sys.exit(main())
