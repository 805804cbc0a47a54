"""physim: reference implementation of *Emergence of Computational Structure in a
Neural Network Physics Simulator* (Hitchcock, Delaney, Manton, Scalzo, Zhu).

Read top to bottom next to the paper:
  1. Ground-truth simulator ............ §2, Appendix C, Table 3 (Luding 2008 contacts, eq. (6))
  2. Data ............................... Appendix C (trajectories -> (x_t, x_t+1) pairs)
  3. The particle transformer ........... Appendix C.1, Fig. 4, Table 4
  4. Attention-head metrics ............. §2.2 (collision detection score, c(w))
  5. Training ........................... Table 2, checkpoints, resume
  6. The model as a simulator ........... Appendix D.2, Fig. 7
  7. Local learning coefficient (SGLD) .. §2.3, Appendix B, eq. (3)-(5), Table 1
  8. Power laws in c(t) ................. §3.2, Appendix D.1, Table 5 (and automatic regime finding)

Conventions: a particle state is x = [p v] with shape (B, N, 4) (Appendix C, D = 2); positions are in
units of the particle diameter with the box spanning [0, W] x [0, H]; gravity points along -y.
Every choice the paper leaves open is marked "free choice" at its line and listed in README.md.
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
import sys
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, fields

import numpy as np
import scipy.stats
import torch
import torch.nn as nn
import torch.nn.functional as F


def _require(ok: bool, message: str) -> None:
    """Raise the one clear error a bad config or argument gets."""
    if not ok:
        raise ValueError(message)


# ----------------------------------------------------------------------------------------------------
# 1. Ground-truth simulator (§2, Appendix C, Table 3)
# ----------------------------------------------------------------------------------------------------

MIN_STEPS_PER_CONTACT = 10  # free choice: Δt must resolve the shortest contact with >= 10 steps


@dataclass
class SimConfig:
    """The particle system of Table 3, in reduced units (mass and diameter of a particle = 1)."""
    n_particles: int = 64        # N
    diameter: float = 1.0
    mass: float = 1.0
    dt: float = 0.005            # Δt of eq. (6)
    stiffness: float = 1000.0    # k, collision spring constant
    damping: float = 10.0        # γ, collision damping coefficient
    gravity: float = 9.8         # |g|
    box_width: float = 28.0
    box_height: float = 14.0
    n_steps: int = 1024          # simulated steps per trajectory
    boundary_spacing: float = 0.25  # free choice: virtual boundary particles every d/4 along the walls

    def __post_init__(self):
        for name in ("n_particles", "diameter", "mass", "dt", "stiffness", "box_width", "box_height",
                     "n_steps", "boundary_spacing"):
            _require(getattr(self, name) > 0, f"SimConfig.{name} must be positive, got {getattr(self, name)}")
        _require(self.damping >= 0 and self.gravity >= 0,
                 f"SimConfig.damping and gravity must be >= 0, got {self.damping} and {self.gravity}")
        # The shortest contact is particle-particle (reduced mass m/2); its undamped half period
        # π·sqrt(m_r/k) is a lower bound on the contact duration t_c (contact_duration below).
        t_min = math.pi * math.sqrt(0.5 * self.mass / self.stiffness)
        _require(self.dt <= t_min / MIN_STEPS_PER_CONTACT,
                 f"SimConfig.dt={self.dt} is too coarse: a contact lasts about {t_min:.4g}, which needs "
                 f"dt <= {t_min / MIN_STEPS_PER_CONTACT:.4g} ({MIN_STEPS_PER_CONTACT} steps per contact)")
        _require(self.damping ** 2 < 2 * self.stiffness * self.mass,
                 f"SimConfig.damping={self.damping} overdamps particle contacts (needs damping² < 2 k m = "
                 f"{2 * self.stiffness * self.mass:.4g}): the closed forms t_c, e have no meaning and "
                 f"touching particles would never separate")
        _require(self.n_particles <= lattice_capacity(self),
                 f"SimConfig.n_particles={self.n_particles} does not fit: the {self.box_width} x "
                 f"{self.box_height} box holds at most {lattice_capacity(self)} particles without overlap "
                 f"on the initial lattice")


def contact_duration(cfg: SimConfig, reduced_mass: float) -> float:
    """Closed form (Luding 2008): t_c = π/ω, ω = sqrt(k/m_r − η₀²), η₀ = γ/(2 m_r)."""
    eta0 = cfg.damping / (2 * reduced_mass)
    return math.pi / math.sqrt(cfg.stiffness / reduced_mass - eta0 ** 2)


def restitution(cfg: SimConfig, reduced_mass: float) -> float:
    """Closed form (Luding 2008): coefficient of restitution e = exp(−η₀ t_c)."""
    return math.exp(-cfg.damping / (2 * reduced_mass) * contact_duration(cfg, reduced_mass))


def _pair_geometry(p: torch.Tensor, diameter: float):
    """Pairwise geometry of positions p (..., N, 2).

    Returns unit normals n_ij = (p_i − p_j)/|p_i − p_j| (..., N, N, 2) and overlaps
    δ_ij = max(0, d − |p_i − p_j|) (..., N, N), with δ_ii = 0.
    """
    r = p.unsqueeze(-2) - p.unsqueeze(-3)                          # (..., N, N, 2)
    dist = r.norm(dim=-1)                                          # (..., N, N)
    eye = torch.eye(p.shape[-2], dtype=torch.bool, device=p.device)
    overlap = (diameter - dist).clamp(min=0).masked_fill(eye, 0.0)
    normal = r / dist.clamp(min=1e-12).unsqueeze(-1)
    return normal, overlap


def _wall_overlaps(p: torch.Tensor, cfg: SimConfig):
    """Overlaps with the low walls (left, floor) and high walls (right, ceiling), each (..., N, 2)."""
    radius = cfg.diameter / 2
    high = torch.stack([p[..., 0] - (cfg.box_width - radius), p[..., 1] - (cfg.box_height - radius)], -1)
    return (radius - p).clamp(min=0), high.clamp(min=0)    # (no host-to-device copy: a CUDA sync per step)


def contact_acceleration(p: torch.Tensor, v: torch.Tensor, cfg: SimConfig) -> torch.Tensor:
    """Acceleration from damped linear spring–dashpot normal contacts (Luding 2008), (B, N, 2).

    Force on i from j while they overlap: f = (k δ_ij − γ v_n) n_ij with v_n = (v_i − v_j)·n_ij.
    Force convention: the plain linear model, attractive tail kept. Near the end of a damped contact
    k δ − γ v_n turns slightly negative; we keep it, so the contact ends exactly when δ returns to 0
    and the closed forms t_c = π/ω and e = exp(−η₀ t_c) hold (tested).
    Walls (free choice): the four box walls are flat, immovable and act with the same k and γ
    (reduced mass m) on a particle overlapping them.
    """
    normal, overlap = _pair_geometry(p, cfg.diameter)              # (B, N, N, 2), (B, N, N)
    v_rel = v.unsqueeze(-2) - v.unsqueeze(-3)                      # (B, N, N, 2) v_i − v_j
    v_n = (v_rel * normal).sum(-1)                                 # (B, N, N)
    f_mag = (cfg.stiffness * overlap - cfg.damping * v_n) * (overlap > 0)
    force = (f_mag.unsqueeze(-1) * normal).sum(-2)                 # (B, N, 2)
    low, high = _wall_overlaps(p, cfg)                             # (B, N, 2) each
    touching = (low > 0) | (high > 0)
    force = force + cfg.stiffness * (low - high) - cfg.damping * v * touching
    return force / cfg.mass


def gravity_vector(cfg: SimConfig, device=None, dtype=None) -> torch.Tensor:
    """g of eq. (6), pointing along −y: (2,), in the default dtype unless told."""
    return torch.tensor([0.0, -cfg.gravity], device=device, dtype=dtype)


def simulate(p: torch.Tensor, v: torch.Tensor, cfg: SimConfig, n_steps: int | None = None):
    """Integrate B trajectories with semi-implicit Euler, eq. (6): v' = v + Δt(a + g), p' = p + Δt v'.

    p, v: (B, N, 2). Returns positions and velocities of the whole trajectory, each (B, T+1, N, 2),
    with T = n_steps (default cfg.n_steps); index 0 is the initial state.
    """
    _require(p.shape == v.shape and p.dim() == 3 and p.shape[-1] == 2,
             f"simulate expects p and v of shape (B, N, 2), got {tuple(p.shape)} and {tuple(v.shape)}")
    n_steps = cfg.n_steps if n_steps is None else n_steps
    g = gravity_vector(cfg, p.device, p.dtype)
    ps, vs = [p], [v]
    for _ in range(n_steps):                                       # time is sequential; all else batched
        v = v + cfg.dt * (contact_acceleration(p, v, cfg) + g)     # eq. (6)
        p = p + cfg.dt * v
        ps.append(p)
        vs.append(v)
    return torch.stack(ps, 1), torch.stack(vs, 1)


def total_energy(p: torch.Tensor, v: torch.Tensor, cfg: SimConfig) -> torch.Tensor:
    """Kinetic + gravitational + elastic contact energy (Fig. 7), for states (..., N, 2) -> (...).

    Potential energy is m g y with y = 0 on the floor; each overlapping pair or wall stores ½ k δ².
    """
    kinetic = 0.5 * cfg.mass * v.pow(2).sum((-1, -2))
    gravitational = cfg.mass * cfg.gravity * p[..., 1].sum(-1)
    _, overlap = _pair_geometry(p, cfg.diameter)
    low, high = _wall_overlaps(p, cfg)
    elastic = 0.5 * cfg.stiffness * (0.5 * overlap.pow(2).sum((-1, -2))   # each pair counted twice
                                     + (low.pow(2) + high.pow(2)).sum((-1, -2)))
    return kinetic + gravitational + elastic


INIT_LATTICE = 1.25  # free choice: initial states sit on a lattice of cells 1.25 d wide, jittered inside


def lattice_capacity(cfg: SimConfig) -> int:
    cell = INIT_LATTICE * cfg.diameter
    return int(cfg.box_width // cell) * int(cfg.box_height // cell)


def random_initial_state(cfg: SimConfig, batch: int, generator: torch.Generator | None = None,
                         device=None):
    """B random states inside the box with no two particles overlapping (Appendix C, Table 3).

    Each particle takes a distinct random cell of a lattice of 1.25 d cells and a uniform jitter of
    ±0.125 d inside it, so centres are >= d apart and >= d/2 from every wall. Velocities ~ N(0, I).
    Drawn on the CPU with `generator`, then moved to `device`: the same seed gives the same states
    on every device. Returns p, v, each (B, N, 2).
    """
    _require(batch > 0, f"batch must be positive, got {batch}")
    cell = INIT_LATTICE * cfg.diameter
    nx, ny = int(cfg.box_width // cell), int(cfg.box_height // cell)
    offset = torch.tensor([cfg.box_width - nx * cell, cfg.box_height - ny * cell]) / 2 + cell / 2
    cells = torch.rand(batch, nx * ny, generator=generator).argsort(1)[:, :cfg.n_particles]  # (B, N)
    centres = torch.stack([cells % nx, cells // nx], -1) * cell + offset                       # (B, N, 2)
    jitter = (torch.rand(batch, cfg.n_particles, 2, generator=generator) - 0.5) * (cell - cfg.diameter)
    v = torch.randn(batch, cfg.n_particles, 2, generator=generator)
    return (centres + jitter).to(device), v.to(device)


def boundary_particles(cfg: SimConfig) -> torch.Tensor:
    """Virtual particles densely along the four walls (Appendix C), (M, 2).

    Spacing (free choice): d/4. The boundary embedding sums over the boundary particles within r = 2 of
    a particle; at d/4 about 16 of them fall inside that radius for a particle touching a wall, so the
    sum changes smoothly (by ~1/16 per boundary particle) as the particle slides along the wall.
    """
    s, w, h = cfg.boundary_spacing, cfg.box_width, cfg.box_height
    along_w, along_h = torch.arange(0, w, s), torch.arange(0, h, s)
    return torch.cat([
        torch.stack([along_w, torch.zeros_like(along_w)], -1),       # floor, left to right
        torch.stack([torch.full_like(along_h, w), along_h], -1),     # right wall, upwards
        torch.stack([w - along_w, torch.full_like(along_w, h)], -1),  # ceiling, right to left
        torch.stack([torch.zeros_like(along_h), h - along_h], -1),   # left wall, downwards
    ])


# ----------------------------------------------------------------------------------------------------
# 2. Data (Appendix C): trajectories of cfg.n_steps steps become (x_t, x_t+1) pairs
# ----------------------------------------------------------------------------------------------------

@dataclass
class DataConfig:
    """How trajectories become training batches and the held-out metric set."""
    chunk_trajectories: int = 64   # free choice: trajectories simulated together and shuffled together
    heldout_states: int = 256      # free choice: the metrics of §2.2 are expectations over the data; they are
                                   # taken over this many independent states, one from each of as many
                                   # held-out trajectories, at a uniformly drawn time
    bootstrap: int = 32            # free choice: bootstrap resamples of those states for the metrics' errors

    def __post_init__(self):
        for f in fields(self):
            _require(getattr(self, f.name) > 0, f"DataConfig.{f.name} must be positive")


def simulate_states(cfg: SimConfig, n_trajectories: int, seed: int, device=None,
                    n_steps: int | None = None) -> torch.Tensor:
    """Simulate n seeded trajectories of T = n_steps (default cfg.n_steps) steps; returns states
    x = [p v] of shape (n, T+1, N, 4)."""
    g = torch.Generator().manual_seed(seed)
    p, v = simulate(*random_initial_state(cfg, n_trajectories, g, device), cfg, n_steps)
    return torch.cat([p, v], -1)


class TrainingStream:
    """Fresh (x_t, x_t+1) training pairs, never reused (Appendix C: "the model never sees the same
    data sample more than once").

    Chunk k holds `chunk_trajectories` new trajectories (seeded by (seed, k)) cut into all their
    pairs and shuffled; a batch is a slice of its chunk. Batch `step` is therefore a pure function of
    (seed, step), which is what makes an interrupted run resume exactly. The remainder of a chunk that
    does not fill a whole batch is dropped.
    """

    def __init__(self, sim: SimConfig, data: DataConfig, batch_size: int, seed: int, device=None):
        self.sim, self.data, self.batch_size, self.seed, self.device = sim, data, batch_size, seed, device
        self.batches_per_chunk = data.chunk_trajectories * sim.n_steps // batch_size
        _require(self.batches_per_chunk > 0, "a data chunk must hold at least one batch")
        self._chunk_index, self._states, self._order = -1, None, None

    def batch(self, step: int):
        chunk, offset = divmod(step, self.batches_per_chunk)
        if chunk != self._chunk_index:
            seed = 1_000_003 * (self.seed + 1) + chunk
            self._states = simulate_states(self.sim, self.data.chunk_trajectories, seed, self.device)
            n_pairs = self.data.chunk_trajectories * self.sim.n_steps
            self._order = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(seed)).to(self._states.device)
            self._chunk_index = chunk
        idx = self._order[offset * self.batch_size:(offset + 1) * self.batch_size]
        traj, t = idx // self.sim.n_steps, idx % self.sim.n_steps
        return self._states[traj, t], self._states[traj, t + 1]    # (B, N, 4) each


HELDOUT_SEED = 987_654_321  # the held-out trajectories' seed, far from every training seed
HELDOUT_CHUNK = 32          # held-out trajectories simulated together (a whole trajectory is kept only while read)


def heldout_set(sim: SimConfig, data: DataConfig, device=None):
    """The fixed, seeded held-out set of the §2.2 metrics: S = data.heldout_states independent states
    (S, N, 4), the state of trajectory s at a uniformly drawn time t_s < T, with their successors
    (S, N, 4), so that the metrics are expectations over the data distribution (training pairs are
    uniform over trajectory and time too). Independent of the training seed: runs are compared on one
    set."""
    g = torch.Generator().manual_seed(HELDOUT_SEED)
    times = torch.randint(sim.n_steps, (data.heldout_states,), generator=g)
    x, y = [], []
    for first in range(0, data.heldout_states, HELDOUT_CHUNK):
        t = times[first:first + HELDOUT_CHUNK].to(device)
        states = simulate_states(sim, len(t), HELDOUT_SEED + first, device, int(t.max()) + 1)  # (32, t_max + 2, N, 4)
        rows = torch.arange(len(t), device=states.device)
        x.append(states[rows, t])
        y.append(states[rows, t + 1])
    return torch.cat(x), torch.cat(y)


# ----------------------------------------------------------------------------------------------------
# 3. The particle transformer (Appendix C.1, Fig. 4, Table 4)
# ----------------------------------------------------------------------------------------------------

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


@dataclass
class ModelConfig:
    """Architecture of Table 4, plus the free choices the paper leaves open."""
    n_blocks: int = 4               # L
    n_heads: int = 8
    embed_dim: int = 128            # E
    boundary_radius: float = 2.0    # r of the radial mask
    activation: str = "relu"        # σ
    mlp_ratio: int = 4              # free choice: block MLP width 4E, as in most transformers
    scaled_io: bool = False         # Appendix C.1 (False): the raw state [p v] and raw b_j in, a = W_u x + c_u out.
                                    # True is a free choice of the scaled preset only (README): the model sees
                                    # (p − box centre)/7, v/3 and outputs a = 100·(W_u x + c_u)

    def __post_init__(self):
        for name in ("n_blocks", "n_heads", "embed_dim", "boundary_radius", "mlp_ratio"):
            _require(getattr(self, name) > 0, f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        _require(self.embed_dim % self.n_heads == 0,
                 f"ModelConfig.embed_dim={self.embed_dim} must be divisible by n_heads={self.n_heads}")
        _require(self.activation in ACTIVATIONS,
                 f"ModelConfig.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")


# ModelConfig.scaled_io: inputs of order 1 (half the box height, a typical speed) and an output factor
# for contact accelerations of ~10-500, so that Adam's early steps reach them (a free choice, README).
SCALED_IO_POSITION, SCALED_IO_VELOCITY, SCALED_IO_ACCELERATION = 7.0, 3.0, 100.0


def _mlp(d_in: int, d_hidden: int, d_out: int, activation: str) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), ACTIVATIONS[activation](), nn.Linear(d_hidden, d_out))


class ParticleAttention(nn.Module):
    """Multi-head attention between particles (Phuong & Hutter 2022, Alg. 5) in which a particle never
    attends to itself and a zero key/value is appended (PyTorch's add_zero_attn), so the attention
    a particle gives to other particles may total less than one.

    Parameter layout is PyTorch's nn.MultiheadAttention: head h owns rows {s·E + h·E/H ... + E/H}
    (s = 0, 1, 2 for q, k, v) of in_proj and columns h·E/H ... (h+1)·E/H of out_proj.
    """

    fused = True   # False sends every call through the explicit attention (reproduce.py bench's baseline)

    def __init__(self, embed_dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        # Initialised as nn.MultiheadAttention, which Appendix C.1 points to, drawing from the RNG in its
        # order: the out-projection as nn.Linear, then a xavier-uniform fused in-projection; both biases 0.
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.in_proj = nn.utils.skip_init(nn.Linear, embed_dim, 3 * embed_dim)   # fused W_q, W_k, W_v
        nn.init.xavier_uniform_(self.in_proj.weight)
        nn.init.zeros_(self.in_proj.bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, need_weights: bool = True):
        """x (B, N, E) -> (output (B, N, E), attention weights (B, H, N, N+1) or None).

        With need_weights the attention is spelled out: softmax over the N other particles and the
        zero key. Without, the same function runs through the fused F.scaled_dot_product_attention,
        with the zero key and value appended and the self-pairs masked out (the fast path of training
        and SGLD; test_fused_attention_equals_the_explicit_one)."""
        B, N, E = x.shape
        H = self.n_heads
        q, k, v = self.in_proj(x).view(B, N, 3, H, E // H).permute(2, 0, 3, 1, 4)  # (B, H, N, E/H) each
        if self.fused and not need_weights:
            zero = q.new_zeros(B, H, 1, E // H)                                     # the zero key and value
            allowed = ~torch.eye(N, N + 1, dtype=torch.bool, device=x.device)       # (N, N+1): not itself
            out = F.scaled_dot_product_attention(q, torch.cat([k, zero], 2), torch.cat([v, zero], 2), allowed)
            return self.out_proj(out.transpose(1, 2).reshape(B, N, E)), None
        no_self = torch.zeros(N, N, dtype=x.dtype, device=x.device).fill_diagonal_(float("-inf"))
        logits = q @ k.transpose(-1, -2) / math.sqrt(E // H) + no_self             # (B, H, N, N)
        logits = torch.cat([logits, logits.new_zeros(B, H, N, 1)], -1)              # zero key: q·0 = 0
        attn = logits.softmax(-1)                                                   # (B, H, N, N+1)
        out = attn[..., :N] @ v                                                     # zero value adds 0
        return self.out_proj(out.transpose(1, 2).reshape(B, N, E)), attn


class Block(nn.Module):
    """Fig. 4: x + MHA(LN(x)), then x + MLP(LN(x)) (pre-layer-norm: free choice of placement)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E = cfg.embed_dim
        self.ln_attn, self.ln_mlp = nn.LayerNorm(E), nn.LayerNorm(E)
        self.attn = ParticleAttention(E, cfg.n_heads)
        self.mlp = _mlp(E, cfg.mlp_ratio * E, E, cfg.activation)

    def forward(self, x: torch.Tensor, need_weights: bool = True):
        a, attn = self.attn(self.ln_attn(x), need_weights)
        x = x + a
        return x + self.mlp(self.ln_mlp(x)), attn


class ParticleTransformer(nn.Module):
    """The model of Appendix C.1 / Fig. 4: state (B, N, 4) -> predicted next state (B, N, 4).

    forward(x, return_attention=True) also returns every head's attention weights, (L, B, H, N, N+1),
    where slot N is the appended zero key, computed by the explicit attention; without, the fused
    attention computes the same function (tested equal, with its gradients).
    """

    def __init__(self, cfg: ModelConfig, sim: SimConfig):
        super().__init__()
        self.cfg, self.sim = cfg, sim
        E = cfg.embed_dim
        self.embed = _mlp(4, E, E, cfg.activation)                 # x'_i = W_e2 σ(W_e1 x_i + c_e1) + c_e2
        self.boundary_embed = _mlp(2, E, E, cfg.activation)        # W_b2 σ(W_b1 b_j + c_b1) + c_b2
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_blocks))
        self.ln_final = nn.LayerNorm(E)
        self.unembed = nn.Linear(E, 2)                             # a_i = W_u x_i^(L) + c_u
        self.register_buffer("boundary", boundary_particles(sim), persistent=False)  # (M, 2)
        self.register_buffer("gravity", gravity_vector(sim), persistent=False)       # (2,)
        # What the MLPs see is (x − shift) / scale: the raw state for the paper (shift 0, scale 1), and with
        # cfg.scaled_io (p − box centre)/7, v/3; a = out_scale · (W_u x + c_u), out_scale 1 for the paper.
        centre = torch.tensor([sim.box_width, sim.box_height]) / 2
        shift = torch.cat([centre, torch.zeros(2)]) if cfg.scaled_io else torch.zeros(4)
        scale = torch.tensor([SCALED_IO_POSITION] * 2 + [SCALED_IO_VELOCITY] * 2) if cfg.scaled_io else torch.ones(4)
        self.register_buffer("in_shift", shift, persistent=False)                 # (4,)
        self.register_buffer("in_scale", scale, persistent=False)                 # (4,)
        self.out_scale = SCALED_IO_ACCELERATION if cfg.scaled_io else 1.0

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """x_i^(0) = x'_i + b'_i (Appendix C.1): the particle embedding plus the boundary MLP summed
        over the boundary particles within r of p_i (the radial mask). x (B, N, 4) -> (B, N, E)."""
        h = self.embed((x - self.in_shift) / self.in_scale)                       # x' (B, N, E)
        near = (torch.cdist(x[..., :2], self.boundary) < self.cfg.boundary_radius).to(h.dtype)  # mask (B, N, M)
        b = (self.boundary - self.in_shift[:2]) / self.in_scale[:2]               # (M, 2)
        return h + near @ self.boundary_embed(b)                                  # x' + b'

    def hidden(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """x^(block), the input of block `block` (0-based): the embedding, then blocks 0 ... block−1.
        x (B, N, 4) -> (B, N, E)."""
        h = self.embedding(x)
        for b in self.blocks[:block]:
            h, _ = b(h, need_weights=False)
        return h

    def acceleration(self, x: torch.Tensor, return_attention: bool = False, resume=None):
        """Predicted contact acceleration a (B, N, 2) [and attention (L, B, H, N, N+1)].
        resume = (l, x^(l)) starts at block l from its input (see hidden): the blocks before are skipped
        (and only blocks l ... L−1 have attention to return)."""
        first, h = (0, self.embedding(x)) if resume is None else resume           # (B, N, E)
        attention = []
        for block in self.blocks[first:]:
            h, attn = block(h, need_weights=return_attention)                    # fused without weights
            attention.append(attn)
        a = self.out_scale * self.unembed(self.ln_final(h))                       # (B, N, 2)
        return (a, torch.stack(attention)) if return_attention else a

    def forward(self, x: torch.Tensor, return_attention: bool = False, resume=None):
        out = self.acceleration(x, return_attention, resume)
        a = out[0] if return_attention else out
        v = x[..., 2:] + self.sim.dt * (a + self.gravity)                         # eq. (6)
        p = x[..., :2] + self.sim.dt * v
        x_next = torch.cat([p, v], -1)
        return (x_next, out[1]) if return_attention else x_next


# ----------------------------------------------------------------------------------------------------
# 4. Attention-head metrics (§2.2)
# ----------------------------------------------------------------------------------------------------

COLLISION_RADIUS = 1.1  # free choice: "a small, fixed radius" = 1.1 d (touching, or within 10% of it)
# §3.1: final collision scores cluster near 0.95 (true collision-detection heads), near 0 (no collision
# detection) and in small clusters "between approximately 0.3 and 0.8" (partial heads).
TRUE_HEAD_SCORE = 0.8     # free choice: the cut between partial and true heads
PARTIAL_HEAD_SCORE = 0.3  # free choice: the cut between no collision detection and partial heads


def head_class(score: float) -> str:
    """The class of a head from its collision detection score (§3.1): "true", "partial" or "none"."""
    return "true" if score >= TRUE_HEAD_SCORE else "partial" if score >= PARTIAL_HEAD_SCORE else "none"


def bootstrap_weights(n: int, replicates: int, seed: int = 0) -> torch.Tensor:
    """Bootstrap resamples of n items as weights (replicates, n): row k holds how often resample k draws
    each item (multinomial, n draws with replacement), divided by n, in float64. Weighted metrics with row k equal
    the metrics of resample k (tested); the same seed gives the same resamples at every checkpoint."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(n, (replicates, n), generator=g)                          # (K, n)
    counts = torch.zeros(replicates, n, dtype=torch.float64)
    return counts.scatter_add_(1, draws, torch.ones(replicates, n, dtype=torch.float64)) / n


def _uniform(weights: torch.Tensor | None, n_states: int, like: torch.Tensor) -> torch.Tensor:
    """The weights of the states, (K, S): the given resamples, or one row of 1/S (the plain mean)."""
    w = torch.full((1, n_states), 1.0 / n_states) if weights is None else weights
    return w.to(like.device, like.dtype)


def _weighted_mean(w: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Σ_s w_ks z_s over the leading (states) axis of z: (K, S), z (S, ...) -> (K, ...)."""
    return (w @ z.reshape(z.shape[0], -1)).view(w.shape[0], *z.shape[1:])


def collision_detection_score(attn: torch.Tensor, positions: torch.Tensor,
                              radius: float = COLLISION_RADIUS, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Expected attention a head gives to particles within `radius` of the query particle (§2.2).

    attn (..., S, H, N, N+1), positions (S, N, 2) -> (..., H). The expectation runs over states and
    over the query particles that have at least one particle within the radius; queries with none are
    left out (they cannot attend to a neighbour, and counting them would cap every head below 1).
    With weights (K, S) (bootstrap_weights) the states are weighted, one score per row: (K, ..., H).
    """
    N = positions.shape[-2]
    dist = torch.cdist(positions, positions)                                     # (S, N, N)
    near = (dist < radius) & ~torch.eye(N, dtype=torch.bool, device=dist.device)
    has_near = near.any(-1)                                                      # (S, N)
    mass = (attn[..., :N] * near.unsqueeze(-3)).sum(-1)                          # (..., S, H, N)
    per_state = (mass * has_near.unsqueeze(-2)).sum(-1)                          # (..., S, H)
    w = _uniform(weights, len(positions), per_state)                             # (K, S)
    queries = (w @ has_near.sum(-1).to(w.dtype)).clamp(min=1e-12)                # (K,) weighted count
    score = _weighted_mean(w, per_state.movedim(-2, 0))                          # (K, ..., H)
    score = score / queries.view(-1, *[1] * (score.dim() - 1))
    return score[0] if weights is None else score


def attention_distance_correlation(attn: torch.Tensor, positions: torch.Tensor,
                                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """c(w) = 1/(N²−N) Σ_{i≠j} corr(d_ij, α_ij(w)) (§2.2), per head: (..., S, H, N, N+1) -> (..., H).

    Each corr is taken over the S states separately for the pair (i, j), then averaged over pairs.
    A pair whose attention never varies has no correlation and is left out of the average.
    With weights (K, S) (bootstrap_weights) the states are weighted, one c per row: (K, ..., H).
    Computed in float64 (tiny attention weights underflow float32).
    """
    N = positions.shape[-2]
    # float64: far pairs of a sharp head get attention ~1e-30, whose squares underflow float32
    a = attn[..., :N].movedim(-4, 0)                                             # (S, ..., H, N, N), a view
    ac = torch.empty(a.shape, dtype=torch.float64, device=a.device).copy_(a)    # our own contiguous copy ...
    ac -= ac.mean(0)                                                             # ... centred: no cancellation below
    lead = [1] * (ac.dim() - 3)                                                  # attn's leading dims, and H
    d = torch.cdist(positions, positions).double().view(len(positions), *lead, N, N)  # (S, 1.., 1, N, N)
    dc = d - d.mean(0)
    w = _uniform(weights, len(positions), ac)                                    # (K, S)
    md, ma = _weighted_mean(w, dc), _weighted_mean(w, ac)                        # (K, 1.., 1, N, N), (K, ..., H, N, N)
    cov = _weighted_mean(w, dc * ac) - md * ma
    vd, va = _weighted_mean(w, dc.pow(2)) - md.pow(2), _weighted_mean(w, ac.square_()) - ma.pow(2)  # (ac is spent)
    corr = cov / (vd * va).sqrt()                                                # nan where a never varies
    corr = corr.masked_fill(torch.eye(N, dtype=torch.bool, device=corr.device), float("nan"))
    c = corr.nanmean((-1, -2))                                                   # (K, ..., H)
    return c[0] if weights is None else c


@torch.no_grad()
def moved_particle_attention(model: ParticleTransformer, state: torch.Tensor, particle: int,
                             positions: torch.Tensor) -> torch.Tensor:
    """Figs. 13-15 (Appendix D.4): one particle of a fixed state (N, 4) is moved to each of `positions`
    (G, 2), every other particle left where it is; returns the attention *from* that particle in
    every head, (L, G, H, N+1) (slot N is the zero key)."""
    states = state.expand(len(positions), -1, -1).clone()                       # (G, N, 4)
    states[:, particle, :2] = positions
    _, attn = model(states, return_attention=True)                              # (L, G, H, N, N+1)
    return attn[:, :, :, particle]


# ----------------------------------------------------------------------------------------------------
# 5. Training (Table 2)
# ----------------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Training of Table 2, and the checkpoint schedule (free choice)."""
    steps: int = 64_000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0                 # one seed per run: it seeds the model's initialisation and the data
    log_checkpoints: int = 64     # free choice: checkpoints at log-spaced steps 1 ... steps (early training) ...
    even_checkpoints: int = 250   # ... united with evenly spaced ones (late training), plus step 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "lr", "log_checkpoints", "even_checkpoints"):
            _require(getattr(self, name) > 0, f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        _require(self.weight_decay >= 0, f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")


def checkpoint_steps(cfg: TrainConfig) -> list[int]:
    """Union of log-spaced and evenly spaced steps, and 0. On log axes the log-spaced steps cover the
    fast early dynamics evenly, and the evenly spaced ones keep the late power-law regimes (which
    the paper fits over tens of thousands of steps, Table 5) densely sampled."""
    log_spaced = torch.logspace(0, math.log10(cfg.steps), cfg.log_checkpoints, dtype=torch.float64)
    even = torch.linspace(0, cfg.steps, cfg.even_checkpoints + 1, dtype=torch.float64)
    return sorted({0, *log_spaced.round().long().tolist(), *even.round().long().tolist()})


def next_state_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Table 2 / Appendix B: mean squared error between the predicted and the true next state."""
    return F.mse_loss(model(x), y)


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One step of Table 2's training on the batch (x, y); returns its loss (detached, on the device)."""
    loss = next_state_loss(model, x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


class Progress:
    """One status line with rate and ETA, redrawn at most every `every` seconds (stderr; none if label is None)."""

    def __init__(self, label: str | None, total: int, start: int = 0, every: float = 2.0, stream=sys.stderr):
        self.label, self.total, self.start, self.every = label, total, start, every
        self.stream = stream if label is not None else None
        self.t0 = self.last = time.time()

    def update(self, done: int, note: str = "", force: bool = False, eta: float | None = None) -> None:
        """Redraw the line; the ETA is `eta` if given (see WorkClock), else from the mean rate so far."""
        now = time.time()
        if self.stream is None or (not force and now - self.last < self.every):
            return
        self.last = now
        if eta is None:
            rate = (done - self.start) / max(now - self.t0, 1e-9)
            eta = (self.total - done) / rate if rate > 0 else float("nan")
        self.stream.write(f"\r{self.label}: {done}/{self.total} ({100 * done / self.total:.0f}%) "
                          f"{_fmt_time(now - self.t0)} elapsed, ETA {_fmt_time(eta)} {note}   ")
        if done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


class WorkClock:
    """Wall time spent on each kind of work (training steps, data chunks, checkpoints), so that an ETA
    weighs what is left of each kind by its own cost: the early checkpoints are dense and the data
    arrives in chunks, so a plain rate of steps per second is wrong by orders of magnitude early on."""

    def __init__(self):
        self.seconds, self.count = {}, {}

    def add(self, kind: str, seconds: float) -> None:
        self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds
        self.count[kind] = self.count.get(kind, 0) + 1

    def eta(self, left: dict) -> float:
        """Seconds for `left` = {kind: units still to do} at the mean cost per unit so far (nan if a
        kind still to do has not been timed yet)."""
        if any(n > 0 and kind not in self.count for kind, n in left.items()):
            return float("nan")
        return sum(n * self.seconds[kind] / self.count[kind] for kind, n in left.items() if n > 0)


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


@contextlib.contextmanager
def reading(path: str):
    """Any failure to read or parse `path` inside becomes one ValueError that names the file."""
    try:
        yield
    except Exception as e:                       # truncated JSON, a bad CSV field, a damaged zip, ...
        raise ValueError(f"{path} is damaged or unreadable ({type(e).__name__}: {e}); restore or delete "
                         "it and re-run") from None


def _atomic_write(path: str, write) -> None:
    """Write via a temporary file and rename, so an interruption never leaves half a file."""
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def _write_csv(path: str, rows: list[dict], columns: list[str] | None = None) -> None:
    """rows -> CSV; `columns` names the header when there may be no rows."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else columns)
            w.writeheader()
            w.writerows(rows)
    _atomic_write(path, write)


def save_checkpoint(path: str, model: nn.Module, optimizer, step: int, configs: dict, history: dict) -> None:
    """A self-describing checkpoint: configs, step, model, optimiser, RNG state and metric history."""
    state = {"configs": configs, "step": step, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(), "history": history}
    _atomic_write(path, lambda tmp: torch.save(state, tmp))


def save_weights(path: str, model: nn.Module, step: int, configs: dict) -> None:
    """The model's weights alone, in half precision (2 bytes a weight, no optimiser state: 1/6 of a
    full checkpoint), for the analyses that read a past step (the LLC); they tolerate the rounding
    (test_half_precision_weights_leave_the_analysis_unchanged)."""
    state = {"configs": configs, "step": step,
             "model": {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}}
    _atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """A checkpoint or a weights file (weights_only=True: no code is unpickled)."""
    with reading(path):
        return torch.load(path, map_location=map_location, weights_only=True)


def model_from_checkpoint(ckpt: dict, device=None) -> ParticleTransformer:
    """Rebuild the trained model a checkpoint or weights file describes (in float32)."""
    model = ParticleTransformer(ModelConfig(**ckpt["configs"]["model"]), SimConfig(**ckpt["configs"]["sim"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{step:07d}.pt")


def weights_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "weights", f"step_{step:07d}.pt")


def saved_checkpoints(run_dir: str) -> list[str]:
    """The full checkpoints of a run, newest first (training keeps the latest two)."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    names = sorted(n for n in os.listdir(ckpt_dir) if n.endswith(".pt")) if os.path.isdir(ckpt_dir) else []
    return [os.path.join(ckpt_dir, n) for n in reversed(names)]


def load_latest_checkpoint(run_dir: str) -> dict | None:
    """The newest readable full checkpoint of a run (None if it has none). A damaged one (a disk that
    filled up, a copy cut short) gets one warning line naming it, and the one before it is used."""
    paths, damaged = saved_checkpoints(run_dir), []
    for path in paths:
        try:
            ckpt = load_checkpoint(path)
        except ValueError as e:
            damaged.append(str(e))
            continue
        for message in damaged:
            print(f"warning: {message}; resuming from {path}", file=sys.stderr)
        return ckpt
    _require(not paths, f"no checkpoint of {run_dir} can be read ({', '.join(paths)}): delete the folder's "
                        "checkpoints to retrain the run from the start")
    return None


@torch.no_grad()
def head_metrics(model: ParticleTransformer, states: torch.Tensor, targets: torch.Tensor,
                 bootstrap: torch.Tensor) -> dict:
    """§2.2 metrics of every head on the held-out states (S, N, 4), with their sampling errors, and the
    held-out loss. `bootstrap` (K, S) are resamples of the states (bootstrap_weights); a metric's error
    is the standard deviation of its K resampled values. Returns {"collision_score", "collision_score_se",
    "correlation", "correlation_se": (L, H) each, "heldout_loss": float}."""
    was_training = model.training
    model.eval()
    predicted, attn = zip(*(model(x, return_attention=True) for x in states.split(64)))
    attn = torch.cat(attn, 1)                                                  # (L, S, H, N, N+1)
    positions = states[..., :2]
    weights = torch.cat([_uniform(None, len(states), bootstrap), bootstrap.to(states.device)])  # (1 + K, S)
    score = collision_detection_score(attn, positions, weights=weights)        # (1 + K, L, H)
    corr = attention_distance_correlation(attn, positions, weights=weights)    # (1 + K, L, H)
    model.train(was_training)
    return {"collision_score": score[0], "collision_score_se": score[1:].std(0),
            "correlation": corr[0], "correlation_se": corr[1:].std(0),
            "heldout_loss": float(F.mse_loss(torch.cat(predicted), targets))}


def _compiled(fn, *example):
    """torch.compile(fn), or fn itself (with one warning line) where compiling fails. fn must be pure
    (a model's forward, an SGLD step): it is called once on `example` to compile."""
    try:
        compiled = torch.compile(fn)
        compiled(*example)                       # compilation happens on the first call
        return compiled
    except Exception as e:                       # no compiler, unsupported platform, ...
        print(f"warning: torch.compile is unavailable here ({type(e).__name__}); running eagerly", file=sys.stderr)
        return fn


class Interrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C (or a signal turned into one) at `step`; its checkpoints are intact
    (they are written atomically), so calling train again resumes from the latest."""

    def __init__(self, step: int):
        super().__init__(f"interrupted at step {step}")
        self.step = step


def train(run_dir: str, sim: SimConfig, model_cfg: ModelConfig, train_cfg: TrainConfig,
          data_cfg: DataConfig, device="cpu", stop_at: int | None = None, label: str | None = "train",
          keep_weights=None, compile_model: bool = False):
    """Train one run (Table 2) into run_dir, resuming from its latest checkpoint.

    At every step of checkpoint_steps(train_cfg) it evaluates the §2.2 metrics of every head on the
    held-out set, rewrites run_dir/metrics.csv (step, layer, head, collision_score and correlation, each
    with its bootstrap standard error *_se) and
    run_dir/losses.csv, and saves a full checkpoint (what a resume needs) in place of the previous
    one; the weights of the steps in `keep_weights` (default: every checkpoint step) are kept, in
    half precision, under run_dir/weights/. `stop_at` (a checkpoint step) ends the call after the
    checkpoint at that step, e.g. to split a run over time-limited jobs; a later call resumes.
    `compile_model` trains a torch.compile'd model, falling back to eager where compiling fails.
    The checkpoint's history also records the seconds spent on training steps, data chunks and
    checkpoints ("work_seconds"; up to the previous checkpoint). Returns the model.
    """
    configs = {"sim": asdict(sim), "model": asdict(model_cfg), "train": asdict(train_cfg), "data": asdict(data_cfg)}
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    os.makedirs(os.path.join(run_dir, "weights"), exist_ok=True)
    keep = set(checkpoint_steps(train_cfg) if keep_weights is None else keep_weights)
    torch.manual_seed(train_cfg.seed)
    model = ParticleTransformer(model_cfg, sim).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)  # Table 2
    history = {"metrics": [], "losses": []}
    start = 0
    ckpt = load_latest_checkpoint(run_dir)   # on the CPU: the RNG state must be there, and so must Adam's
    resume = ckpt is not None                # step counts (on a GPU they would cost a host sync every step)
    if resume:
        _require(ckpt["configs"] == configs,
                 f"{run_dir} holds a run with a different configuration; choose another output folder")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        start, history = ckpt["step"], ckpt["history"]
    _require(stop_at is None or stop_at in checkpoint_steps(train_cfg),
             f"stop_at={stop_at} must be one of the checkpoint steps, so that the work up to it is saved")
    schedule = [s for s in checkpoint_steps(train_cfg) if s >= start]
    stream = TrainingStream(sim, data_cfg, train_cfg.batch_size, train_cfg.seed, device)
    heldout_x, heldout_y = heldout_set(sim, data_cfg, device)
    resamples = bootstrap_weights(data_cfg.heldout_states, data_cfg.bootstrap)    # (K, S), the same every checkpoint
    progress, clock = Progress(label, train_cfg.steps, start), WorkClock()
    spent = dict(history.get("work_seconds", {}))                # seconds per kind of work before this call

    def eta(done: int) -> float:                                 # seconds left, each kind of work at its own cost
        left = train_cfg.steps - done
        return clock.eta({"step": left, "checkpoint": len(schedule), "data chunk": -(-left // stream.batches_per_chunk)})
    loss_sum, loss_count = torch.zeros((), device=device), 0
    model.train()
    forward = None                               # the module that computes the training loss, set on step 1
    step = start
    try:
        for step in range(start, train_cfg.steps + 1):
            if step == schedule[0] and not (resume and step == start):
                started = time.perf_counter()
                schedule.pop(0)
                metrics = head_metrics(model, heldout_x, heldout_y, resamples)
                table = {k: v.tolist() for k, v in metrics.items() if k != "heldout_loss"}   # one copy to the host
                history["metrics"] += [
                    {"step": step, "layer": l, "head": h, **{k: v[l][h] for k, v in table.items()}}
                    for l in range(model_cfg.n_blocks) for h in range(model_cfg.n_heads)]
                history["losses"].append({"step": step, "train_loss": float(loss_sum) / max(loss_count, 1)
                                          if loss_count else float("nan"), "heldout_loss": metrics["heldout_loss"]})
                loss_sum, loss_count = torch.zeros((), device=device), 0
                history["work_seconds"] = {k: spent.get(k, 0.0) + clock.seconds.get(k, 0.0) for k in {*spent, *clock.seconds}}
                save_checkpoint(checkpoint_path(run_dir, step), model, optimizer, step, configs, history)
                for path in saved_checkpoints(run_dir)[2:]:         # keep the latest two: one may be damaged
                    os.remove(path)
                if step in keep:
                    save_weights(weights_path(run_dir, step), model, step, configs)
                _write_csv(os.path.join(run_dir, "metrics.csv"), history["metrics"])
                _write_csv(os.path.join(run_dir, "losses.csv"), history["losses"])
                clock.add("checkpoint", time.perf_counter() - started)
                progress.update(step, f"held-out loss {metrics['heldout_loss']:.3g}, best collision score "
                                      f"{max(max(row) for row in table['collision_score']):.2f}",
                                force=step == train_cfg.steps, eta=eta(step))
            elif step == schedule[0]:
                schedule.pop(0)                     # the checkpoint we resumed from
            if step == train_cfg.steps or step == stop_at:
                break
            started = time.perf_counter()
            x, y = stream.batch(step)
            if step % stream.batches_per_chunk == 0:                          # this batch simulated a new chunk
                clock.add("data chunk", time.perf_counter() - started)
                started = time.perf_counter()
            if forward is None:
                forward = _compiled(model, x) if compile_model else model
            loss_sum, loss_count = loss_sum + training_step(forward, optimizer, x, y), loss_count + 1
            clock.add("step", time.perf_counter() - started)
            progress.update(step + 1, eta=eta(step + 1))
    except KeyboardInterrupt:                    # Ctrl-C (or a SIGTERM made one): say where, keep the checkpoint
        raise Interrupted(step) from None
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# 6. The model as a simulator (Appendix D.2, Fig. 7)
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def rollout(model: ParticleTransformer, x0: torch.Tensor, n_steps: int) -> torch.Tensor:
    """Apply the model to its own output: x_{n+1} = f(x_n; w). x0 (B, N, 4) -> (B, n_steps+1, N, 4)."""
    xs = [x0]
    for _ in range(n_steps):
        xs.append(model(xs[-1]))
    return torch.stack(xs, 1)


@torch.no_grad()
def evaluate_simulator(model: ParticleTransformer, n_states: int = 16, n_steps: int = 1000,
                       seed: int = 2024) -> dict:
    """Appendix D.2: roll the model out from ground-truth initial states and compare with the truth.

    Returns per-step mean total energy of the ground truth and of the model (Fig. 7), the mean
    position error of the rollout per step, and the mean one-step position error on true states.
    """
    model.eval()
    sim = model.sim
    device = next(model.parameters()).device
    truth = simulate_states(sim, n_states, seed, device, n_steps)                     # (B, T+1, N, 4)
    pred = rollout(model, truth[:, 0], truth.shape[1] - 1)                            # (B, T+1, N, 4)
    one_step = torch.cat([model(x) for x in truth[:, :-1].flatten(0, 1).split(256)])  # (B*T, N, 4)
    one_step_err = (one_step[..., :2] - truth[:, 1:].flatten(0, 1)[..., :2]).norm(dim=-1).mean()
    return {
        "energy_true": total_energy(truth[..., :2], truth[..., 2:], sim).mean(0).tolist(),
        "energy_model": total_energy(pred[..., :2], pred[..., 2:], sim).mean(0).tolist(),
        "rollout_position_error": (pred[..., :2] - truth[..., :2]).norm(dim=-1).mean((0, 2)).tolist(),
        "one_step_position_error": float(one_step_err),
    }


# ----------------------------------------------------------------------------------------------------
# 7. The parameter-restricted local learning coefficient by SGLD (§2.3, Appendix B, Table 1)
# ----------------------------------------------------------------------------------------------------

@dataclass
class LLCConfig:
    """SGLD hyperparameters of Table 1."""
    step_size: float = 0.00075   # ε
    localization: float = 1.0    # γ, strength of the Gaussian prior centred at w₀
    nbeta: float = 1385.0        # nβ, the gradient factor β̃
    batch_size: int = 256        # m
    steps: int = 10_000          # T
    burn_in: int = 9_000         # B
    chains: int = 8              # C (Fig. 1); Section D.5 uses 4
    seed: int = 0                # chain c draws its noise and data from seed + c

    def __post_init__(self):
        for f in fields(self):
            if f.name not in ("seed", "burn_in"):
                _require(getattr(self, f.name) > 0, f"LLCConfig.{f.name} must be positive, got {getattr(self, f.name)}")
        _require(0 <= self.burn_in <= self.steps - 4,
                 f"LLCConfig.burn_in={self.burn_in} must leave at least 4 of the {self.steps} steps to average")


@dataclass
class LLCResult:
    """One estimate of eq. (3): the mean over all C chains, as the paper (and devinterp) report it. The
    health verdicts are diagnostics beside it: unhealthy chains are flagged, never dropped (dropping
    chains that go below L(w₀) would bias λ̂ upwards exactly where w₀ is not a minimum)."""
    llc: float                   # mean λ̂ over all chains
    llc_stderr: float            # standard error of that mean (nan with 1 chain)
    chain_llc: list              # λ̂ of every chain
    init_loss: list              # every chain's estimate of L_n(w₀)
    health: list                 # every chain's verdict: "healthy", or why not
    traces: torch.Tensor         # (C, T) L_m(w_t) of every chain, on the CPU
    w0_traces: torch.Tensor      # (C, T) L_m(w₀) on the same minibatches: traces − w0_traces is free
                                 #        of minibatch noise (the health verdicts and trace plots use it)
    final_params: dict           # name -> (C, *shape): the sampled tensors after the last step
    config: LLCConfig


def head_parameters(model: ParticleTransformer, block: int, head: int) -> dict:
    """The parameters of one attention head as {name: boolean mask}: its rows of the fused q, k, v
    in-projection (weight and bias) and its columns of the out-projection (see ParticleAttention)."""
    _require(0 <= block < model.cfg.n_blocks and 0 <= head < model.cfg.n_heads,
             f"no head {block}-{head} in a model of {model.cfg.n_blocks} blocks x {model.cfg.n_heads} heads")
    E, H = model.cfg.embed_dim, model.cfg.n_heads
    dh = E // H
    rows = torch.zeros(3 * E, dtype=torch.bool)
    for s in range(3):                                   # q, k, v thirds of in_proj
        rows[s * E + head * dh:s * E + (head + 1) * dh] = True
    cols = torch.zeros(E, dtype=torch.bool)
    cols[head * dh:(head + 1) * dh] = True
    prefix = f"blocks.{block}.attn."
    return {prefix + "in_proj.weight": rows[:, None].expand(3 * E, E).clone(),
            prefix + "in_proj.bias": rows,
            prefix + "out_proj.weight": cols[None, :].expand(E, E).clone()}


class FromBlock(nn.Module):
    """The particle transformer from block l on, for estimate_llc's `prefix`: when every sampled
    parameter sits in blocks l ... L−1 (e.g. heads of block l), the embedding and blocks 0 ... l−1 are
    the same for every chain and head on a minibatch, and the same as at w₀. So
        split = FromBlock(model, l);   estimate_llc(split, ..., prefix=split.prefix)
    computes x^(l) once per minibatch (prefix: x -> (x, x^(l))) and samples only the rest:
    split(x, x^(l)) = model(x) (test_llc_prefix_split_equals_the_whole_model). It holds the model's
    own modules under the model's names, so head_parameters(model, ...) names its parameters too, and
    estimate_llc draws the same noise for them."""

    def __init__(self, model: ParticleTransformer, block: int):
        super().__init__()
        for name, module in model.named_children():
            self.add_module(name, module)                                         # the same modules, same names
        self.whole, self.block = (model,), block   # a plain reference (a tuple): not a second copy of the names

    def prefix(self, x: torch.Tensor):
        return x, self.whole[0].hidden(x, self.block)                            # (B, N, 4), (B, N, E)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.whole[0](x, resume=(self.block, h))


def squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Appendix B.1's loss ℓ(w, x, y) = ‖y − f(x, w)‖², summed over every output of a sample (the 4N
    numbers of a particle state), averaged over the minibatch: L_m. (F.mse_loss also averages over the
    outputs: 4N times smaller, so at the same nβ it samples a posterior 4N times hotter.)"""
    return (output - target).pow(2).flatten(1).sum(1).mean()


LLC_LOSSES = {"sum": squared_error, "mean": F.mse_loss}   # the two conventions of L_m (reproduce.Preset.llc_loss)


def dataset_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, block: int = 256):
    """Data source for estimate_llc from a fixed dataset: (seed, start) -> endless random minibatches
    (drawn with replacement) from the start-th on. Indices are drawn on the CPU (the same seed gives the
    same minibatches on every device), `block` minibatches at a time: one host-to-device copy per block,
    not per step, and the samples gathered for many minibatches at once."""
    rows = max(1, 2 ** 22 // (batch_size * x[0].numel()))                     # ≤ 2^22 numbers of x per gather

    def batches(seed: int, start: int = 0):
        g = torch.Generator().manual_seed(seed)
        for _ in range(start // block):                                          # the blocks before start
            torch.randint(len(x), (block, batch_size), generator=g)
        skip = start % block
        while True:
            idx = torch.randint(len(x), (block, batch_size), generator=g)[skip:].to(x.device)  # (block - skip, m)
            skip = 0
            for part in idx.split(rows):                                         # one gather per `rows` minibatches
                yield from zip(x[part], y[part])                                 # (m, ...) each
    return batches


def simulator_batches(sim: SimConfig, data: DataConfig, batch_size: int, device=None):
    """Data source for estimate_llc on the physics model: (seed, start) -> endless fresh (x_t, x_t+1)
    batches, never reused (Appendix B.2), from a TrainingStream of its own, from its start-th batch on."""
    def batches(seed: int, start: int = 0):
        stream = TrainingStream(sim, data, batch_size, seed=10_000_019 + seed, device=device)
        step = start
        while True:
            yield stream.batch(step)
            step += 1
    return batches


def chain_health(trace: torch.Tensor, w0_trace: torch.Tensor, burn_in: int, llc: float = 0.0,
                 dimension: int | None = None) -> str:
    """Automatic verdict on one chain (cf. Appendix B.2.1), judged on its excess loss
    e_t = L_m(w_t) − L_m(w₀) over the same minibatch (T,), which is free of minibatch noise, and on its
    estimate `llc` against the `dimension` d of the sampled parameters:
    - diverged: a non-finite loss, or the loss running away (over the last tenth of the steps e_t
      lies above its level in the second half of burn-in by more than 9x that level, and by more
      than 10 standard deviations of e_t there: far outside its fluctuations);
    - not stationary: the two halves of the post-burn-in e_t have means that differ by more than
      4 standard errors (batch means of 10 batches per half, which absorbs autocorrelation);
    - negative: the mean of e_t after burn-in is below 0 (the chain sits below L(w₀), so λ̂ < 0);
    - too hot: λ̂ exceeds d, twice d/2, the learning coefficient of a regular minimum and the most any
      minimum has (a margin of d/2 for the chain's noise): the chain is too hot for the curvature there
      (ε too large: SGLD's stationary variance grows like 1/(1 − εP/4) for curvature P, see
      test_llc_prior_is_gamma_times_w_minus_w0)."""
    if not (torch.isfinite(trace).all() and torch.isfinite(w0_trace).all()):
        return "diverged (non-finite loss)"
    excess = trace - w0_trace
    late, settled = excess[-max(len(excess) // 10, 2):], excess[burn_in // 2:burn_in]
    if len(settled) >= 2:
        rise = late.mean() - settled.mean()
        if rise > 9 * max(float(settled.mean()), 0.0) and rise > 10 * settled.std():
            return "diverged (loss running away)"
    post = excess[burn_in:]
    half = len(post) // 2
    means, errors = [], []
    for part in (post[:half], post[half:2 * half]):
        batch_means = part[:len(part) // 10 * 10].view(10, -1).mean(1) if len(part) >= 10 else part
        means.append(part.mean())
        errors.append(batch_means.std() / math.sqrt(len(batch_means)))
    if abs(means[0] - means[1]) > 4 * math.hypot(errors[0], errors[1]):
        return "not stationary after burn-in"
    if post.mean() < 0:
        return "negative (mean loss below L(w0))"
    if dimension is not None and llc > dimension:
        return f"too hot (λ̂ > 2 · d/2 = {dimension}: lower the step size)"
    return "healthy"


NOISE_BLOCK_STEPS = 256   # estimate_llc draws each chain's noise this many steps at a time (fewer for big tensors)
LLC_SAVE_SECONDS = 300    # free choice: with a state_path, estimate_llc saves its chains once this long has passed


def estimate_llc(model: nn.Module, criterion, data, subsets, cfg: LLCConfig = LLCConfig(),
                 label: str | None = None, compile_step: bool = False, prefix=None, state_path: str | None = None):
    """Estimate the local learning coefficient restricted to some parameters, eq. (3)-(5).

    model      any nn.Module, left unchanged; called as it is (call .eval() first if it has dropout).
    criterion  criterion(model(inputs), targets) -> mean loss L_m over the minibatch.
    data       (seed, start) -> endless iterator of minibatches (inputs, targets) of cfg.batch_size
               samples from the start-th on; see dataset_batches and simulator_batches. Chain c reads
               data(cfg.seed + c, 0) (or from the step it resumes at).
    subsets    {parameter name: boolean mask of that tensor's shape, or None for all of it}: the
               parameters sampled; every other parameter stays at w₀ and gets no noise. A list of
               such dicts estimates several subsets (e.g. heads) at once, returning a list.

    All subsets x chains run in one vmap'd forward and backward per step. Each chain runs SGLD, eq. (5):
        Δw = −ε/2 · (γ (w − w₀) + nβ ∇L_m(w)) + N(0, ε),   on the selected entries only,
    and λ̂ = nβ · (mean of L_m(w_t) over t >= B − L_n(w₀)). L_n(w₀) is estimated, per chain, by the
    mean of L_m(w₀) over the same post-burn-in minibatches the chain's L_m(w_t) was averaged over:
    an unbiased estimate of the loss at w₀ on (T − B)·m samples whose minibatch noise cancels in
    the difference. L_m(w₀) is evaluated on every step's minibatch (one extra forward pass per
    chain, none per subset) so that the health verdicts can judge the noise-free excess loss.
    Chain c of every subset shares the noise generator and data of seed + c, so a chain gives the
    same numbers whether it runs alone or batched with others.

    prefix     optional: the part of the network in front of `model` that holds no sampled parameter,
               inputs -> the model's inputs (a tensor or a tuple), evaluated once per step on every
               chain's minibatch, without gradients, and shared by every subset and by L_m(w₀): the chains run only
               model(*prefix(inputs)). For heads of the particle transformer: FromBlock.
    compile_step  run each step (the batched gradients, L_m(w₀) and the update of eq. (5)) through
               torch.compile: much faster on small models once compiled (seconds), equal to the eager
               step up to float rounding (tested); where compiling fails, one warning and eager steps.
    state_path optional file for the chains' state (the step reached, w − w₀, the traces, the noise
               generators), so that an interrupted estimate resumes where it stopped: written when a
               KeyboardInterrupt (Ctrl-C, or a signal made one) stops the chains, once LLC_SAVE_SECONDS
               have passed since the last save, and at the end; read at the start when it exists (a
               finished state returns its result at once). Delete it once the result is saved. A
               resumed estimate equals the uninterrupted one (tested with eager steps).
    """
    from torch.func import functional_call, grad_and_value, vmap

    single = isinstance(subsets, dict)
    subsets = [subsets] if single else list(subsets)
    named = dict(model.named_parameters())
    names = sorted({n for s in subsets for n in s})
    for n in names:
        _require(n in named, f"estimate_llc: the model has no parameter {n!r}")
    for s in subsets:
        for n, mask in s.items():
            _require(mask is None or (mask.dtype == torch.bool and mask.shape == named[n].shape),
                     f"estimate_llc: the mask of {n!r} must be a bool tensor of shape {tuple(named[n].shape)}")
    K, C, T, B = len(subsets), cfg.chains, cfg.steps, cfg.burn_in
    device = next(iter(named.values())).device
    w0 = {n: named[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in named.items() if n not in w0}
    masks = {n: torch.stack([(s[n] if s[n] is not None else torch.ones_like(w0[n], dtype=torch.bool))
                             .to(device) if n in s else torch.zeros_like(w0[n], dtype=torch.bool)
                             for s in subsets]).repeat_interleave(C, 0) for n in names}       # (K*C, *shape)
    # Chain c draws each tensor's noise from its own generator, seeded by (seed + c, the tensor's name),
    # so a chain's noise does not depend on which other tensors or chains are sampled alongside it.
    generators = {n: [torch.Generator(device=device).manual_seed((cfg.seed + c) * 1_000_003 + zlib.crc32(n.encode()))
                      for c in range(C)] for n in names}
    delta = {n: torch.zeros(K * C, *w0[n].shape, device=device, dtype=w0[n].dtype) for n in names}

    def chain_loss(delta, x, y):                # one chain: w = w₀ + (w − w₀); delta is 0 off the selected entries
        return criterion(functional_call(model, {**frozen, **{n: w0[n] + delta[n] for n in names}}, x), y)

    def losses_at_w0(x, y):                     # every chain's L_m(w₀): one forward over all C·m samples
        with torch.no_grad():
            out = model(*(t.flatten(0, 1) for t in x))                            # (C·m, ...)
        return vmap(criterion)(out.unflatten(0, (C, -1)), y)                      # (C,)

    eps, gamma, nbeta = cfg.step_size, cfg.localization, cfg.nbeta

    def sgld_step(delta, x, y, noise):          # x: tuple of (C, m, ...); y (C, m, ...); noise: name -> (C, *shape)
        def every_subset(t):                    # (C, ...) -> (K*C, ...), the layout of delta (K*C, *shape)
            return t.repeat(K, *[1] * (t.dim() - 1))
        grads, loss = vmap(grad_and_value(chain_loss))(delta, tuple(map(every_subset, x)), every_subset(y))
        step = {n: -eps / 2 * (gamma * delta[n] + nbeta * grads[n])            # chain c's noise for every subset
                   + math.sqrt(eps) * noise[n].repeat(K, *[1] * w0[n].dim()) for n in names}
        return ({n: torch.where(masks[n], delta[n] + step[n], torch.zeros_like(step[n])) for n in names},  # eq. (5)
                loss.detach(), losses_at_w0(x, y))

    # Each chain draws a tensor's noise for `block[n]` steps at once (one generator call per block, not
    # per step), a block of at most ~2^20 numbers: a function of the tensor's shape alone, so a chain
    # still draws the same noise whether it runs alone or batched.
    block = {n: max(1, min(NOISE_BLOCK_STEPS, 2 ** 20 // w0[n].numel())) for n in names}
    # Per name: the block in use, its first step, and the generators' states before it was drawn (what
    # a save needs when it lands after a block's first step, or between the draws of its chains).
    drawn, drawn_at, before = {}, {}, {}

    def noise_at(t):                            # name -> (C, *shape): step t's noise of every chain
        for n in names:
            if t % block[n] == 0 or n not in drawn:   # a new block (or, resumed, the block of step t)
                before[n], drawn_at[n] = [g.get_state() for g in generators[n]], t - t % block[n]
                drawn[n] = torch.stack([torch.randn(block[n], *w0[n].shape, generator=g, device=device,
                                                    dtype=w0[n].dtype) for g in generators[n]])  # (C, block, *shape)
        return {n: drawn[n][:, t % block[n]] for n in names}

    dtype = next(iter(w0.values())).dtype
    traces = torch.zeros(K * C, T, device=device, dtype=dtype)
    w0_losses = torch.zeros(C, T, device=device, dtype=dtype)
    identity = {"config": asdict(cfg), "device": device.type, "w0": {n: w0[n].cpu() for n in names},
                "masks": {n: masks[n][::C].cpu() for n in names}}   # what a saved state must belong to: (K, *shape)

    def save(done, delta):                      # the state after `done` steps; each generator as it was where
                                                # the noise block holding step `done` starts
        generator_states = {n: before[n] if drawn_at[n] == done - done % block[n] else
                            [g.get_state() for g in generators[n]] for n in names}
        state = {**identity, "done": done, "delta": delta, "traces": traces[:, :done].clone(),
                 "w0_losses": w0_losses[:, :done].clone(),
                 "generators": generator_states}
        _atomic_write(state_path, lambda tmp: torch.save(state, tmp))

    start = 0
    if state_path is not None and os.path.exists(state_path):
        with reading(state_path):
            state = torch.load(state_path, map_location="cpu", weights_only=True)   # generator states live on the CPU
        _require(state["config"] == identity["config"] and state["device"] == identity["device"]
                 and all(state[k].keys() == identity[k].keys() and all(torch.equal(state[k][n], identity[k][n])
                                                                      for n in names) for k in ("w0", "masks")),
                 f"{state_path} holds the state of another estimate (other settings, model, parameters or "
                 f"device): remove it")
        start, delta = state["done"], {n: d.to(device) for n, d in state["delta"].items()}
        traces[:, :start], w0_losses[:, :start] = state["traces"], state["w0_losses"]
        for n in names:
            for g, s in zip(generators[n], state["generators"][n]):
                g.set_state(s)
    streams = [data(cfg.seed + c, start) for c in range(C)]
    progress = Progress(label, T, start)
    step_fn, saved_at = sgld_step, time.monotonic()
    # (steps done, w − w₀ after them), set in one assignment per step: an interrupt anywhere leaves a
    # consistent pair to save.
    chain = (start, delta)
    try:
        with warnings.catch_warnings():   # on the CPU vmap runs the fused attention once per chain (no batching rule):
            warnings.filterwarnings("ignore", message=".*batching rule for aten::_scaled_dot_product")  # still faster
            for t in range(start, T):
                batch = [next(s) for s in streams]
                x = torch.stack([b[0] for b in batch]).to(device)                     # (C, m, ...)
                y = torch.stack([b[1] for b in batch]).to(device)
                if prefix is None:
                    x = (x,)
                else:                               # once for every chain's minibatch: (C·m, ...) at a time
                    with torch.no_grad():
                        x = prefix(x.flatten(0, 1))
                    x = tuple(t.unflatten(0, (C, -1)) for t in (x if isinstance(x, tuple) else (x,)))  # each (C, m, ...)
                noise = noise_at(t)
                if compile_step and t == start:
                    step_fn = _compiled(sgld_step, chain[1], x, y, noise)
                new_delta, traces[:, t], w0_losses[:, t] = step_fn(chain[1], x, y, noise)
                chain = (t + 1, new_delta)
                progress.update(t + 1)
                if state_path is not None and time.monotonic() - saved_at > LLC_SAVE_SECONDS:
                    save(*chain)
                    saved_at = time.monotonic()
    except KeyboardInterrupt:
        if state_path is not None and chain[0] > start:
            save(*chain)
        raise
    if state_path is not None and chain[0] > start:
        save(*chain)                            # finished: a later call with this state_path returns at once
    delta = chain[1]

    traces, w0_losses = traces.cpu().view(K, C, T), w0_losses.cpu()         # (K, C, T), (C, T)
    init = w0_losses[:, B:].mean(1)                                           # L_n(w₀) per chain, (C,)
    results = []
    for k in range(K):
        chain_llc = nbeta * (traces[k, :, B:].mean(1) - init)                 # eq. (3), (C,)
        dimension = sum(int(masks[n][k * C].sum()) for n in names)               # d, the sampled entries
        health = [chain_health(traces[k, c], w0_losses[c], B, float(chain_llc[c]), dimension) for c in range(C)]
        llc = float(chain_llc.mean())
        stderr = float(chain_llc.std() / math.sqrt(C)) if C > 1 else float("nan")
        final = {n: torch.where(masks[n][k * C:(k + 1) * C], w0[n] + delta[n][k * C:(k + 1) * C], w0[n]).cpu()
                 for n in subsets[k]}
        results.append(LLCResult(llc, stderr, chain_llc.tolist(), init.tolist(), health, traces[k], w0_losses,
                                 final, cfg))
    return results[0] if single else results


@dataclass
class Calibration:
    """calibrate_llc's answer: every probed cell, and the setting it recommends (None where none fits)."""
    rows: list                   # one dict per (model, ε, nβ, subset): its λ̂ ± se, healthy chains, verdicts
    step_size: float | None      # the recommended ε ...
    nbeta: float | None          # ... and nβ
    statement: str               # the recommendation, or why there is none, in one sentence


def calibrate_llc(models: dict, criterion, data, subsets, cfg: LLCConfig, step_sizes, nbetas=None,
                  min_healthy: float = 0.75, label: str | None = None) -> Calibration:
    """Appendix B.2.1 automated. The paper chose ε and nβ by reading trace plots: early checkpoints
    converge slowly, a larger ε makes late ones diverge, and no one setting suited every head. Here
    short chains run over a grid of ε (and optionally nβ) at a few models (e.g. checkpoints early,
    middle and late) and subsets (e.g. heads), and chain_health judges every chain.

    models     {name: nn.Module}; criterion, data and subsets as for estimate_llc (subsets a dict or a list)
    cfg        the chains' settings (T, B, C, m, γ, seed); its ε and nβ are replaced by the grid's
    A cell (model, ε, nβ) is healthy if each subset has at least `min_healthy` of its chains healthy
    (our choice: short chains flag a healthy chain now and then, so 3 of 4 by default). The
    recommended setting is the largest ε healthy at every model (among equal ε, the first nβ listed).
    Health cannot see everything. Chains too short to equilibrate give a λ̂ that grows with ε, and
    SGLD's discretisation inflates λ̂ by about 1/(1 − εP/4) at curvature P
    (test_llc_prior_is_gamma_times_w_minus_w0). So every row also carries λ̂ over its value at the
    next smaller ε, and the statement says so where that ratio is still large at the recommendation."""
    nbetas = [cfg.nbeta] if nbetas is None else list(nbetas)
    subsets = [subsets] if isinstance(subsets, dict) else list(subsets)
    rows, cells = [], len(models) * len(nbetas) * len(step_sizes)
    for name, model in models.items():
        for nbeta in nbetas:
            for eps in step_sizes:
                cell = LLCConfig(**{**asdict(cfg), "step_size": eps, "nbeta": nbeta})
                results = estimate_llc(model, criterion, data, subsets, cell, label=f"{label}: cell {len(rows) // len(subsets) + 1}"
                                       f"/{cells} ({name}, ε = {eps:g}, nβ = {nbeta:g})" if label else None)
                rows += [{"model": name, "step_size": eps, "nbeta": nbeta, "subset": k, "llc": r.llc,
                          "llc_stderr": r.llc_stderr, "healthy_chains": r.health.count("healthy"), "chains": len(r.health),
                          "unhealthy": "; ".join(sorted({h for h in r.health if h != "healthy"}))}
                         for k, r in enumerate(results)]

    # Diagnostic: λ̂ against its value at the next smaller probed ε (same model, nβ, subset). Near 1 once
    # ε no longer matters; close to the ratio of the two ε while the chains are too short to equilibrate
    # (they have not left w₀'s neighbourhood and λ̂ grows with how far ε lets them go).
    for r in rows:
        smaller = [q for q in rows if (q["model"], q["nbeta"], q["subset"]) == (r["model"], r["nbeta"], r["subset"])
                   and q["step_size"] < r["step_size"]]
        below = max(smaller, key=lambda q: q["step_size"]) if smaller else None
        r["llc_over_smaller_step"] = r["llc"] / below["llc"] if below and below["llc"] > 0 else math.nan

    def healthy(eps, nbeta):                     # at every model, every subset
        return all(r["healthy_chains"] >= min_healthy * r["chains"]
                   for r in rows if r["step_size"] == eps and r["nbeta"] == nbeta)
    fits = [(eps, nbeta) for nbeta in nbetas for eps in step_sizes if healthy(eps, nbeta)]
    if not fits:
        return Calibration(rows, None, None, f"no probed setting (ε in {sorted(step_sizes)}, nβ in {nbetas}) keeps "
                                             f"{min_healthy:.0%} of the chains healthy at every one of the "
                                             f"{len(models)} models: probe other ε, or longer chains")
    eps, nbeta = max(fits, key=lambda f: (f[0], -nbetas.index(f[1])))
    ratios = [r["llc_over_smaller_step"] for r in rows if (r["step_size"], r["nbeta"]) == (eps, nbeta)
              and not math.isnan(r["llc_over_smaller_step"])]
    growth = float(np.median(ratios)) if ratios else math.nan
    caveat = (f"; but there λ̂ is still {growth:.2f}x its value at the next smaller ε (median over models and "
              f"subsets): the chains have not equilibrated, so λ̂ measures the chain as much as the model"
              if growth > 1.25 else "")
    return Calibration(rows, eps, nbeta, f"ε = {eps:g}, nβ = {nbeta:g}: the largest probed ε that keeps "
                                         f"{min_healthy:.0%} of the chains healthy at all {len(models)} models" + caveat)


# ----------------------------------------------------------------------------------------------------
# 8. Power laws in the attention-distance correlation (§3.2, Appendix D.1, Table 5)
# ----------------------------------------------------------------------------------------------------

@dataclass
class PowerLawFit:
    """log|c| = α log t + log A fitted by least squares (natural logs), i.e. |c| = A t^α: a row of
    Table 5. α is Table 5's column "Exponent −α", negative where |c| decays. find_power_law_regimes
    adds diagnostics that allow for errors correlated between checkpoints (AR(1), see below)."""
    exponent: float            # α, the slope on log-log axes
    exponent_ci: float         # half-width of α's 95% confidence interval (iid errors, as the paper)
    log_constant: float        # log A
    r2: float                  # R² of the linear fit
    start: float               # first and last training step in the fit
    end: float
    n_points: int
    exponent_ar1: float = math.nan     # α by generalised least squares with AR(1) errors ...
    exponent_ar1_ci: float = math.nan  # ... and its 95% half-width: the exponent is resolved if it excludes 0
    curvature_p: float = math.nan      # p of a quadratic term in log t (AR(1) F test): small = curved
    exponential_p: float = math.nan    # p of a term linear in t (AR(1) F test): small = not a pure power law
    is_power_law: bool = True  # find_power_law_regimes: whether this piece is a power-law regime ...
    verdict: str = "fitted"    # ... and why (not)


def _log_log(t, c, start=None, end=None):
    """The points with t > 0 and c ≠ 0 inside [start, end]: t, log t, log|c| as float64 arrays."""
    t, c = np.asarray(t, dtype=np.float64), np.abs(np.asarray(c, dtype=np.float64))
    keep = (t > 0) & np.isfinite(c) & (c > 0)
    if start is not None:
        keep &= t >= start
    if end is not None:
        keep &= t <= end
    return t[keep], np.log(t[keep]), np.log(c[keep])


def fit_power_law(t, c, start=None, end=None, confidence: float = 0.95) -> PowerLawFit:
    """Appendix D.1: least squares of log|c| on log t over start <= t <= end (steps t > 0 with c ≠ 0).
    The confidence interval of α assumes, as the paper does, a linear relation with iid normal
    zero-mean errors: α ± t_{n−2} quantile · standard error of α."""
    t, x, y = _log_log(t, c, start, end)
    _require(len(x) >= 3 and np.ptp(x) > 0, f"fit_power_law needs at least 3 distinct steps t > 0 with c != 0 "
                                              f"in [{start}, {end}], got {len(x)}")
    fit = scipy.stats.linregress(x, y)
    r2 = float(fit.rvalue) ** 2 if np.isfinite(fit.rvalue) else 0.0
    half_width = float(scipy.stats.t.ppf(0.5 + confidence / 2, len(x) - 2) * fit.stderr)
    return PowerLawFit(float(fit.slope), half_width, float(fit.intercept), r2, float(t[0]), float(t[-1]), len(x))


# Beyond the paper, which chose its sections by eye. c(t) does not scatter independently around a
# trend: it drifts from one checkpoint to the next (training fluctuations, and the one fixed held-out
# set). We model those deviations of log|c| as AR(1) across checkpoints, e_k = ρ e_{k−1} + noise, and fit
# by generalised least squares: rows r_k − ρ r_{k−1} (Prais-Winsten, the first row scaled by
# sqrt(1 − ρ²)) have independent errors, so intervals and F tests on them hold (with ρ = 0, plain least
# squares). Tests with iid errors reject true late regimes of correlated c(t) in most draws.

def noise_correlation(t, curves) -> float:
    """ρ of the AR(1) deviations of log|c| between consecutive checkpoints, estimated over the second
    half of training (where the curves move slowly) from several curves c (each like t): the lag-1
    autocorrelation r of the centred differences of log|c| is −(1 − ρ)/2 for AR(1) deviations, so
    ρ = 1 + 2 r, with r the median over curves. Clipped to [0, 0.99]."""
    t = np.asarray(t, dtype=np.float64)
    late = t >= t[-1] / 2
    lags = []
    for c in curves:
        d = np.diff(np.log(np.abs(np.asarray(c, dtype=np.float64)[late])))
        d = d[np.isfinite(d)] - d[np.isfinite(d)].mean()
        if len(d) > 2 and (d * d).sum() > 0:
            lags.append((d[1:] * d[:-1]).sum() / (d * d).sum())
    return float(np.clip(1 + 2 * np.median(lags), 0.0, 0.99)) if lags else 0.0


def _ar1_least_squares(A: np.ndarray, y: np.ndarray, rho: float):
    """Generalised least squares of y on the columns of A with AR(1) errors of coefficient rho
    (Prais-Winsten). Returns the coefficients, the residual sum of squares of the whitened rows, and
    the covariance of the coefficients."""
    scale = math.sqrt(1 - rho ** 2)
    Aw = np.vstack([A[:1] * scale, A[1:] - rho * A[:-1]])
    yw = np.concatenate([y[:1] * scale, y[1:] - rho * y[:-1]])
    beta, *_ = np.linalg.lstsq(Aw, yw, rcond=None)
    rss = float(np.sum((yw - Aw @ beta) ** 2))
    return beta, rss, rss / max(len(y) - A.shape[1], 1) * np.linalg.pinv(Aw.T @ Aw)


def _more_terms_p(t, x, y, extra, rho: float) -> float:
    """p value of adding the column `extra` to the line a + b log t (F test on the AR(1)-whitened rows)."""
    n, line = len(x), np.stack([np.ones(len(x)), x], 1)
    _, rss_line, _ = _ar1_least_squares(line, y, rho)
    _, rss_more, _ = _ar1_least_squares(np.column_stack([line, extra]), y, rho)
    return float(scipy.stats.f.sf((rss_line - rss_more) / max(rss_more / (n - 3), 1e-300), 1, n - 3))


def _line_rss(x, y, rho: float) -> np.ndarray:
    """Residual sum of squares of the AR(1) least-squares line through points i .. j−1, for all i < j:
    (n+1, n+1), from cumulative sums of the whitened rows (row i scaled by s = sqrt(1 − ρ²), then
    (1 − ρ, x_k − ρ x_{k−1} | y_k − ρ y_{k−1}))."""
    n = len(x)
    s2, one = 1 - rho ** 2, 1 - rho
    u = np.concatenate([[0.0], x[1:] - rho * x[:-1]])
    v = np.concatenate([[0.0], y[1:] - rho * y[:-1]])
    cum = {k: np.concatenate([[0.0], np.cumsum(a)]) for k, a in
           {"n": np.ones(n), "u": u, "v": v, "uu": u * u, "uv": u * v, "vv": v * v}.items()}
    i, j = np.arange(n + 1)[:, None], np.arange(n + 1)[None, :]
    first = np.clip(i, 0, n - 1)

    def rows_after_first(key):                                                  # Σ over k = i+1 .. j−1
        return cum[key][j] - cum[key][np.clip(i + 1, 0, n)]
    Saa = s2 + one * one * rows_after_first("n")
    Sau = s2 * x[first] + one * rows_after_first("u")
    Suu = s2 * x[first] ** 2 + rows_after_first("uu")
    Sav = s2 * y[first] + one * rows_after_first("v")
    Suv = s2 * x[first] * y[first] + rows_after_first("uv")
    Svv = s2 * y[first] ** 2 + rows_after_first("vv")
    with np.errstate(divide="ignore", invalid="ignore"):
        rss = Svv - (Suu * Sav ** 2 - 2 * Sau * Sav * Suv + Saa * Suv ** 2) / (Saa * Suu - Sau ** 2)
    return np.clip(rss, 0, None)


@dataclass
class RegimeConfig:
    """The criterion of find_power_law_regimes. All free choices: the paper found its sections by eye."""
    max_segments: int = 5      # at most this many straight pieces per curve
    min_points: int = 5        # a piece holds at least this many checkpoints ...
    min_span: float = 1.15     # ... and spans at least this factor in t (the shortest section of
                               #     Table 5, steps 4864-5734, spans 1.18)
    min_r2: float = 0.5        # a power law fits its piece with R² at least this (Table 5 keeps 0.525-0.982)
    exponential_p: float = 0.01  # end_of_development: an exponential decay fits significantly better at this level

    def __post_init__(self):
        _require(self.max_segments >= 1 and self.min_points >= 3 and self.min_span >= 1 and 0 <= self.min_r2 <= 1,
                 f"RegimeConfig needs max_segments >= 1, min_points >= 3, min_span >= 1, 0 <= min_r2 <= 1: {self}")


def find_power_law_regimes(t, c, rho: float = 0.0, cfg: RegimeConfig = RegimeConfig()) -> list[PowerLawFit]:
    """Split log|c| vs log t into straight pieces and say which are power-law regimes. Returns every
    piece in order of t, with the paper's fit (fit_power_law) and the AR(1) diagnostics (rho from
    noise_correlation; 0 = independent errors); the breakpoints between pieces are the transitions
    (e.g. between head variants, Fig. 1).

    1. Segmentation: for k = 1 .. max_segments, the split into k contiguous pieces (each of at least
       min_points points spanning a factor min_span in t) with the least total squared (whitened)
       residual of a separate line per piece, found exactly by dynamic programming; k is chosen by BIC,
       n log(RSS/n) + 3k log n (a slope and an intercept per piece, k − 1 breakpoints, the variance).
    2. A piece is a power-law regime (a row of Table 5) iff "a good linear fit" (§3.2): R² >= min_r2,
       and its exponent is resolved (the AR(1) interval excludes 0: |c| moves). The curvature and
       exponential tests are reported beside it (end_of_development uses the exponential one).
    """
    t, x, y = _log_log(t, c)
    n = len(x)
    if n < cfg.min_points:
        return []
    i, j = np.indices((n + 1, n + 1))
    span = x[np.clip(j - 1, 0, n - 1)] - x[np.clip(i, 0, n - 1)]
    rss = np.where((j - i >= cfg.min_points) & (span >= math.log(cfg.min_span) - 1e-12), _line_rss(x, y, rho), np.inf)
    # Dynamic programming: best[k][j] = least RSS of points 0 .. j-1 cut into k pieces.
    best, cut = [np.where(np.arange(n + 1) == 0, 0.0, np.inf)], []
    for _ in range(cfg.max_segments):
        total = best[-1][:, None] + rss                                          # (n+1 start, n+1 end)
        best.append(total.min(0))
        cut.append(total.argmin(0))
    floor = n * 1e-12                      # an exact curve has RSS 0: keep the logarithm finite
    bic = [n * math.log(max(best[k][n], floor) / n) + 3 * k * math.log(n) if np.isfinite(best[k][n]) else np.inf
           for k in range(1, cfg.max_segments + 1)]
    k = int(np.argmin(bic)) + 1
    bounds, end = [], n
    for level in range(k, 0, -1):                                                # walk the cuts back
        start = int(cut[level - 1][end])
        bounds.append((start, end))
        end = start
    pieces = []
    for start, end in reversed(bounds):
        ts, xs, ys = t[start:end], x[start:end], y[start:end]
        fit = fit_power_law(ts, np.exp(ys))
        beta, _, cov = _ar1_least_squares(np.stack([np.ones(len(xs)), xs], 1), ys, rho)
        fit.exponent_ar1 = float(beta[1])
        fit.exponent_ar1_ci = float(scipy.stats.t.ppf(0.975, len(xs) - 2) * math.sqrt(max(cov[1, 1], 0.0)))
        centred = (xs - xs.mean()) / max(xs.std(), 1e-12)
        fit.curvature_p = _more_terms_p(ts, xs, ys, centred ** 2, rho)
        fit.exponential_p = _more_terms_p(ts, xs, ys, ts / ts[-1], rho)
        if fit.r2 < cfg.min_r2:
            fit.is_power_law, fit.verdict = False, f"R² {fit.r2:.2f} < {cfg.min_r2}"
        elif abs(fit.exponent_ar1) <= fit.exponent_ar1_ci:
            fit.is_power_law, fit.verdict = False, "flat: the AR(1) 95% interval of the exponent contains 0"
        else:
            fit.verdict = "power law"
        pieces.append(fit)
    return pieces


def end_of_development(t, c, pieces: list[PowerLawFit], rho: float = 0.0, cfg: RegimeConfig = RegimeConfig()) -> dict:
    """§3.2's rule: "at the end of its development (at the end of training or before the correlation
    function stops changing) the correlation function of a collision detection head evolves as a power
    law". The end of development is the last piece of find_power_law_regimes in which c still changes
    (its exponent resolved, and its trend explains R² >= min_r2 of its variance); later pieces are flat
    or noise. The head follows a power law there iff that piece is a decaying power-law regime and,
    over the decaying stretch that ends with it (it and the decaying pieces right before it), an
    exponential in t (log|c| linear in t: Appendix A.1's convergence near a non-degenerate minimum)
    does not fit significantly better (AR(1) F test at cfg.exponential_p; within one piece of a smooth
    exponential no test can tell, over the stretch it can). Returns {"piece": the end-of-development
    PowerLawFit or None, "follows": bool, "why": str, "stretch_exponential_p": float}."""
    changing = [k for k, p in enumerate(pieces) if p.is_power_law]     # resolved, and R² >= min_r2
    if not changing:
        return {"piece": None, "follows": False, "why": "c never changes beyond its fluctuations",
                "stretch_exponential_p": math.nan}
    last = changing[-1]
    piece = pieces[last]
    if piece.exponent >= 0:
        return {"piece": piece, "follows": False, "why": f"|c| rises (exponent {piece.exponent:+.2f})",
                "stretch_exponential_p": math.nan}
    first = last
    while first > 0 and pieces[first - 1].exponent_ar1 < -pieces[first - 1].exponent_ar1_ci:
        first -= 1
    ts, xs, ys = _log_log(t, c, pieces[first].start, piece.end)
    p = _more_terms_p(ts, xs, ys, ts / ts[-1], rho)
    _, rss_power, _ = _ar1_least_squares(np.stack([np.ones(len(xs)), xs], 1), ys, rho)
    _, rss_exponential, _ = _ar1_least_squares(np.stack([np.ones(len(ts)), ts / ts[-1]], 1), ys, rho)
    if p < cfg.exponential_p and rss_exponential < rss_power:
        return {"piece": piece, "follows": False, "stretch_exponential_p": p,
                "why": f"an exponential decay fits steps {pieces[first].start:.0f}-{piece.end:.0f} better (p = {p:.1g})"}
    return {"piece": piece, "follows": True, "stretch_exponential_p": p,
            "why": f"decays as t^{piece.exponent:+.2f} over steps {piece.start:.0f}-{piece.end:.0f} (R² {piece.r2:.2f})"}
