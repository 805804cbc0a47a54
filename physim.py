"""physim: a minimal reference implementation of *Emergence of Computational Structure in a Neural
Network Physics Simulator* (Hitchcock, Delaney, Manton, Scalzo, Zhu). Read it next to the paper:

  1. Ground-truth simulator ....... §2, Appendix C, Table 3 (Luding 2008 contacts, eq. (6))
  2. Data ......................... Appendix C: trajectories -> (x_t, x_t+1) pairs, never reused
  3. The particle transformer ..... Appendix C.1, Fig. 4, Table 4
  4. Attention-head metrics ....... §2.2: collision detection score, attention-distance correlation c(w)
  5. Training ..................... Table 2
  6. The model as a simulator ..... Appendix D.2, Fig. 7
  7. The LLC by SGLD .............. §2.3, Appendix B, eq. (3)-(5), Table 1
  8. Power-law fits ............... §3.2, Appendix D.1, Table 5
  9. Beyond the paper ............. error bars, chain health, calibration, the power-law regime finder

A particle state is x = [p v] of shape (B, N, 4) (D = 2); positions are in particle diameters, the box is
[0, W] x [0, H] and gravity points along -y. Defaults are the paper's values; every choice the paper
leaves open is marked "free choice" and listed in docs/choices.md. Files, resume, signals and progress
belong to reproduce.py: nothing here writes a file or prints.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import scipy.stats
import torch
import torch.nn as nn
import torch.nn.functional as F

# --- 1. Ground-truth simulator (§2, Appendix C, Table 3) --------------------------------------------------

@dataclass
class SimConfig:
    """The particle system of Table 3, in reduced units (a particle's mass and diameter are 1)."""
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
        for name in ("n_particles", "diameter", "mass", "dt", "stiffness", "box_width", "box_height", "n_steps", "boundary_spacing"):
            assert getattr(self, name) > 0, f"SimConfig.{name} must be positive, got {getattr(self, name)}"
        assert self.damping >= 0 and self.gravity >= 0, "SimConfig.damping and gravity must be >= 0"
        t_min = math.pi * math.sqrt(0.5 * self.mass / self.stiffness)   # the shortest contact (reduced mass m/2)
        assert self.dt <= t_min / 10, f"SimConfig.dt={self.dt} is too coarse: a contact lasts about {t_min:.3g} (free choice: >= 10 steps)"
        assert self.damping ** 2 < 2 * self.stiffness * self.mass, f"SimConfig.damping={self.damping} overdamps contacts (needs damping² < 2km)"


def contact_duration(cfg: SimConfig, reduced_mass: float) -> float:
    """Closed form (Luding 2008): t_c = π/ω, ω = sqrt(k/m_r − η₀²), η₀ = γ/(2 m_r)."""
    eta0 = cfg.damping / (2 * reduced_mass)
    return math.pi / math.sqrt(cfg.stiffness / reduced_mass - eta0 ** 2)


def restitution(cfg: SimConfig, reduced_mass: float) -> float:
    """Closed form (Luding 2008): coefficient of restitution e = exp(−η₀ t_c)."""
    return math.exp(-cfg.damping / (2 * reduced_mass) * contact_duration(cfg, reduced_mass))


def pair_geometry(p: torch.Tensor, diameter: float):
    """Unit normals n_ij = (p_i − p_j)/|p_i − p_j| (..., N, N, 2) and overlaps δ_ij = max(0, d − |p_i − p_j|)
    (..., N, N), δ_ii = 0, of positions p (..., N, 2)."""
    r = p.unsqueeze(-2) - p.unsqueeze(-3)                          # (..., N, N, 2)
    dist = r.norm(dim=-1)                                          # (..., N, N)
    eye = torch.eye(p.shape[-2], dtype=torch.bool, device=p.device)
    overlap = (diameter - dist).clamp(min=0).masked_fill(eye, 0.0)
    return r / dist.clamp(min=1e-12).unsqueeze(-1), overlap


def wall_overlaps(p: torch.Tensor, cfg: SimConfig):
    """Overlaps with the low walls (left, floor) and the high walls (right, ceiling), each (..., N, 2)."""
    radius = cfg.diameter / 2
    high = torch.stack([p[..., 0] - (cfg.box_width - radius), p[..., 1] - (cfg.box_height - radius)], -1)
    return (radius - p).clamp(min=0), high.clamp(min=0)


def contact_acceleration(p: torch.Tensor, v: torch.Tensor, cfg: SimConfig) -> torch.Tensor:
    """Acceleration (B, N, 2) from damped linear spring-dashpot normal contacts (Luding 2008).

    Force on i from j while they overlap: f = (k δ_ij − γ v_n) n_ij, v_n = (v_i − v_j)·n_ij. The attractive
    tail near a contact's end is kept, so the closed forms of t_c and e hold. Free choice: the four walls
    are flat and immovable and act with the same k and γ on a particle that overlaps them.
    """
    normal, overlap = pair_geometry(p, cfg.diameter)               # (B, N, N, 2), (B, N, N)
    v_n = ((v.unsqueeze(-2) - v.unsqueeze(-3)) * normal).sum(-1)   # (B, N, N)
    f_mag = (cfg.stiffness * overlap - cfg.damping * v_n) * (overlap > 0)
    force = (f_mag.unsqueeze(-1) * normal).sum(-2)                 # (B, N, 2)
    low, high = wall_overlaps(p, cfg)                              # (B, N, 2) each
    force = force + cfg.stiffness * (low - high) - cfg.damping * v * ((low > 0) | (high > 0))
    return force / cfg.mass


def simulate(p: torch.Tensor, v: torch.Tensor, cfg: SimConfig, n_steps: int | None = None):
    """Semi-implicit Euler, eq. (6): v' = v + Δt(a + g), p' = p + Δt v', for B trajectories at once.
    p, v (B, N, 2) -> positions and velocities (B, T+1, N, 2) each, T = n_steps (default cfg.n_steps)."""
    assert p.shape == v.shape and p.dim() == 3 and p.shape[-1] == 2, f"simulate expects p and v of shape (B, N, 2), got {tuple(p.shape)} and {tuple(v.shape)}"
    g = torch.tensor([0.0, -cfg.gravity], device=p.device, dtype=p.dtype)   # g points along −y
    ps, vs = [p], [v]
    for _ in range(cfg.n_steps if n_steps is None else n_steps):  # time is sequential; all else batched
        v = v + cfg.dt * (contact_acceleration(p, v, cfg) + g)     # eq. (6)
        p = p + cfg.dt * v
        ps.append(p)
        vs.append(v)
    return torch.stack(ps, 1), torch.stack(vs, 1)


def total_energy(p: torch.Tensor, v: torch.Tensor, cfg: SimConfig) -> torch.Tensor:
    """Kinetic + gravitational (y = 0 on the floor) + ½ k δ² of every overlap (Fig. 7): (..., N, 2) -> (...)."""
    kinetic = 0.5 * cfg.mass * v.pow(2).sum((-1, -2))
    gravitational = cfg.mass * cfg.gravity * p[..., 1].sum(-1)
    _, overlap = pair_geometry(p, cfg.diameter)
    low, high = wall_overlaps(p, cfg)
    elastic = 0.5 * cfg.stiffness * (0.5 * overlap.pow(2).sum((-1, -2))   # each pair counted twice
                                     + (low.pow(2) + high.pow(2)).sum((-1, -2)))
    return kinetic + gravitational + elastic


INIT_CELL = 1.25  # free choice: initial states sit on a lattice of cells 1.25 d wide, jittered inside


def random_initial_state(cfg: SimConfig, batch: int, generator: torch.Generator | None = None, device=None):
    """B random states in the box, no two particles overlapping, velocities ~ N(0, I) (Table 3).
    Each particle takes a distinct random lattice cell and a uniform jitter inside it. Drawn on the CPU,
    then moved to `device`: a seed gives the same states on every device. Returns p, v, each (B, N, 2)."""
    cell = INIT_CELL * cfg.diameter
    nx, ny = int(cfg.box_width // cell), int(cfg.box_height // cell)
    assert batch > 0, f"batch must be positive, got {batch}"
    assert cfg.n_particles <= nx * ny, f"{cfg.n_particles} particles do not fit: the box holds {nx * ny} without overlap"
    offset = torch.tensor([cfg.box_width - nx * cell, cfg.box_height - ny * cell]) / 2 + cell / 2
    cells = torch.rand(batch, nx * ny, generator=generator).argsort(1)[:, :cfg.n_particles]   # (B, N)
    centres = torch.stack([cells % nx, cells // nx], -1) * cell + offset                        # (B, N, 2)
    jitter = (torch.rand(batch, cfg.n_particles, 2, generator=generator) - 0.5) * (cell - cfg.diameter)
    v = torch.randn(batch, cfg.n_particles, 2, generator=generator)
    return (centres + jitter).to(device), v.to(device)


# --- 2. Data (Appendix C) ---------------------------------------------------------------------------------

@dataclass
class DataConfig:
    """How trajectories become training batches and the held-out set of the metrics."""
    chunk_trajectories: int = 64   # free choice: trajectories simulated and shuffled together
    heldout_states: int = 256      # free choice: the §2.2 expectations over the data are taken over this many
                                   # independent states, one per held-out trajectory, at a uniform time
    bootstrap: int = 32            # free choice: bootstrap resamples of those states for the metrics' errors


def simulate_states(cfg: SimConfig, n_trajectories: int, seed: int, device=None, n_steps: int | None = None):
    """States x = [p v] of n seeded trajectories of T = n_steps (default cfg.n_steps) steps: (n, T+1, N, 4)."""
    g = torch.Generator().manual_seed(seed)
    p, v = simulate(*random_initial_state(cfg, n_trajectories, g, device), cfg, n_steps)
    return torch.cat([p, v], -1)


class TrainingStream:
    """Fresh (x_t, x_t+1) pairs, never reused ("the model never sees the same data sample more than once").
    Chunk k holds `chunk_trajectories` new trajectories seeded by (seed, k), cut into all their pairs and
    shuffled; a batch is a slice of its chunk, so batch `step` is a pure function of (seed, step)."""

    def __init__(self, sim: SimConfig, data: DataConfig, batch_size: int, seed: int, device=None):
        self.sim, self.data, self.batch_size, self.seed, self.device = sim, data, batch_size, seed, device
        self.batches_per_chunk = data.chunk_trajectories * sim.n_steps // batch_size
        assert self.batches_per_chunk > 0, "a data chunk must hold at least one batch"
        self.chunk = -1

    def batch(self, step: int):
        chunk, offset = divmod(step, self.batches_per_chunk)
        if chunk != self.chunk:
            seed = 1_000_003 * (self.seed + 1) + chunk
            self.states = simulate_states(self.sim, self.data.chunk_trajectories, seed, self.device)
            n_pairs = self.data.chunk_trajectories * self.sim.n_steps
            self.order = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(seed)).to(self.states.device)
            self.chunk = chunk
        idx = self.order[offset * self.batch_size:(offset + 1) * self.batch_size]
        traj, t = idx // self.sim.n_steps, idx % self.sim.n_steps
        return self.states[traj, t], self.states[traj, t + 1]     # (B, N, 4) each


HELDOUT_SEED = 987_654_321  # the held-out trajectories' seed, far from every training seed


def heldout_set(sim: SimConfig, data: DataConfig, device=None):
    """The held-out set of the §2.2 metrics: S = data.heldout_states independent states (S, N, 4), state
    t_s ~ U{0 .. T−1} of trajectory s, and their successors (S, N, 4). The same for every run."""
    g = torch.Generator().manual_seed(HELDOUT_SEED)
    times = torch.randint(sim.n_steps, (data.heldout_states,), generator=g)
    x, y = [], []
    for first in range(0, data.heldout_states, 32):               # 32 trajectories simulated at a time
        t = times[first:first + 32].to(device)
        states = simulate_states(sim, len(t), HELDOUT_SEED + first, device, int(t.max()) + 1)
        rows = torch.arange(len(t), device=states.device)
        x.append(states[rows, t])
        y.append(states[rows, t + 1])
    return torch.cat(x), torch.cat(y)


# --- 3. The particle transformer (Appendix C.1, Fig. 4, Table 4) ------------------------------------------

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


@dataclass
class ModelConfig:
    """The architecture of Table 4."""
    n_blocks: int = 4               # L
    n_heads: int = 8
    embed_dim: int = 128            # E
    boundary_radius: float = 2.0    # r of the radial mask
    activation: str = "relu"        # σ
    mlp_ratio: int = 4              # free choice: block MLP width 4E
    scaled_io: bool = False         # False is Appendix C.1: raw [p v] and b_j in, a = W_u x + c_u out. True (free
                                    # choice of the CPU presets): the MLPs see (p − box centre)/7, v/3; a = 100 (W_u x + c_u)

    def __post_init__(self):
        assert min(self.n_blocks, self.n_heads, self.embed_dim, self.mlp_ratio) > 0, f"ModelConfig sizes must be positive: {self}"
        assert self.embed_dim % self.n_heads == 0, f"ModelConfig.embed_dim={self.embed_dim} must be divisible by n_heads={self.n_heads}"
        assert self.activation in ACTIVATIONS, f"ModelConfig.activation must be one of {sorted(ACTIVATIONS)}"


def boundary_particles(cfg: SimConfig) -> torch.Tensor:
    """Virtual particles densely along the four walls (Appendix C), (M, 2). Free choice: spacing d/4, so
    about 16 fall within r = 2 of a particle touching a wall and the boundary sum changes smoothly."""
    s, w, h = cfg.boundary_spacing, cfg.box_width, cfg.box_height
    along_w, along_h = torch.arange(0, w, s), torch.arange(0, h, s)
    return torch.cat([
        torch.stack([along_w, torch.zeros_like(along_w)], -1),       # floor, left to right
        torch.stack([torch.full_like(along_h, w), along_h], -1),     # right wall, upwards
        torch.stack([w - along_w, torch.full_like(along_w, h)], -1),  # ceiling, right to left
        torch.stack([torch.zeros_like(along_h), h - along_h], -1),   # left wall, downwards
    ])


def mlp(d_in: int, d_hidden: int, d_out: int, activation: str) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), ACTIVATIONS[activation](), nn.Linear(d_hidden, d_out))


class ParticleAttention(nn.Module):
    """Multi-head attention between particles (Phuong & Hutter 2022, Alg. 5): a particle never attends to
    itself, and a zero key and value are appended (PyTorch's add_zero_attn), so the attention a particle
    gives to the others may total less than one. Head h owns rows s·E + h·E/H ... (s = 0, 1, 2: q, k, v) of
    in_proj and columns h·E/H ... (h+1)·E/H of out_proj, nn.MultiheadAttention's layout."""

    fused = True   # False: every call takes the explicit path (the baseline a timing compares with)

    def __init__(self, embed_dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        # Initialised as nn.MultiheadAttention (which Appendix C.1 points to), in its RNG order.
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.in_proj = nn.utils.skip_init(nn.Linear, embed_dim, 3 * embed_dim)   # W_q, W_k, W_v fused
        nn.init.xavier_uniform_(self.in_proj.weight)
        nn.init.zeros_(self.in_proj.bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, need_weights: bool = True):
        """x (B, N, E) -> output (B, N, E) and the weights (B, H, N, N+1), slot N the zero key. Without
        weights the same function runs through the fused scaled_dot_product_attention."""
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
        out = attn[..., :N] @ v                                                     # the zero value adds 0
        return self.out_proj(out.transpose(1, 2).reshape(B, N, E)), attn


class Block(nn.Module):
    """Fig. 4: x + MHA(LN(x)), then x + MLP(LN(x)) (free choice: pre-layer-norm)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E = cfg.embed_dim
        self.ln_attn, self.ln_mlp = nn.LayerNorm(E), nn.LayerNorm(E)
        self.attn = ParticleAttention(E, cfg.n_heads)
        self.mlp = mlp(E, cfg.mlp_ratio * E, E, cfg.activation)

    def forward(self, x: torch.Tensor, need_weights: bool = True):
        a, attn = self.attn(self.ln_attn(x), need_weights)
        x = x + a
        return x + self.mlp(self.ln_mlp(x)), attn


class ParticleTransformer(nn.Module):
    """Appendix C.1, Fig. 4: state (B, N, 4) -> predicted next state (B, N, 4). With return_attention it
    also returns every head's weights (L, B, H, N, N+1), slot N the zero key."""

    def __init__(self, cfg: ModelConfig, sim: SimConfig):
        super().__init__()
        self.cfg, self.sim = cfg, sim
        E = cfg.embed_dim
        self.embed = mlp(4, E, E, cfg.activation)                  # x'_i = W_e2 σ(W_e1 x_i + c_e1) + c_e2
        self.boundary_embed = mlp(2, E, E, cfg.activation)         # W_b2 σ(W_b1 b_j + c_b1) + c_b2
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_blocks))
        self.ln_final = nn.LayerNorm(E)
        self.unembed = nn.Linear(E, 2)                             # a_i = W_u x_i^(L) + c_u
        self.register_buffer("boundary", boundary_particles(sim), persistent=False)  # (M, 2)
        self.register_buffer("gravity", torch.tensor([0.0, -sim.gravity]), persistent=False)  # g (2,)
        centre = torch.tensor([sim.box_width, sim.box_height]) / 2                 # ModelConfig.scaled_io
        self.register_buffer("in_shift", torch.cat([centre, torch.zeros(2)]) if cfg.scaled_io else torch.zeros(4), persistent=False)
        self.register_buffer("in_scale", torch.tensor([7.0, 7.0, 3.0, 3.0]) if cfg.scaled_io else torch.ones(4), persistent=False)
        self.out_scale = 100.0 if cfg.scaled_io else 1.0

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """x_i^(0) = x'_i + b'_i: the state MLP plus the boundary MLP summed over the boundary particles
        within r of p_i (the radial mask). (B, N, 4) -> (B, N, E)."""
        h = self.embed((x - self.in_shift) / self.in_scale)                       # x' (B, N, E)
        near = (torch.cdist(x[..., :2], self.boundary) < self.cfg.boundary_radius).to(h.dtype)  # (B, N, M)
        return h + near @ self.boundary_embed((self.boundary - self.in_shift[:2]) / self.in_scale[:2])

    def hidden(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """x^(block), the input of block `block`: (B, N, 4) -> (B, N, E)."""
        h = self.embedding(x)
        for b in self.blocks[:block]:
            h, _ = b(h, need_weights=False)
        return h

    def forward(self, x: torch.Tensor, return_attention: bool = False, resume=None):
        """x (B, N, 4) -> x_next (B, N, 4) [, attention (L, B, H, N, N+1)]. resume = (l, x^(l)) starts at
        block l from its input (then only blocks l ... L−1 return attention)."""
        first, h = (0, self.embedding(x)) if resume is None else resume           # (B, N, E)
        attention = []
        for block in self.blocks[first:]:
            h, attn = block(h, need_weights=return_attention)                    # fused without weights
            attention.append(attn)
        a = self.out_scale * self.unembed(self.ln_final(h))                       # (B, N, 2)
        v = x[..., 2:] + self.sim.dt * (a + self.gravity)                         # eq. (6)
        p = x[..., :2] + self.sim.dt * v
        x_next = torch.cat([p, v], -1)
        return (x_next, torch.stack(attention)) if return_attention else x_next


# --- 4. Attention-head metrics (§2.2) ---------------------------------------------------------------------

COLLISION_RADIUS = 1.1  # free choice: "a small, fixed radius" = 1.1 d (touching, or within 10 % of it)


def _state_weights(weights, n_states: int, like: torch.Tensor) -> torch.Tensor:
    """Weights (K, S) of the states: the given ones, or one row of 1/S (the plain expectation)."""
    w = torch.full((1, n_states), 1.0 / n_states) if weights is None else weights
    return w.to(like.device, like.dtype)


def _weighted_mean(w: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Σ_s w_ks z_s over the leading (states) axis of z: w (K, S), z (S, ...) -> (K, ...)."""
    return (w @ z.reshape(z.shape[0], -1)).view(w.shape[0], *z.shape[1:])


def collision_detection_score(attn: torch.Tensor, positions: torch.Tensor, radius: float = COLLISION_RADIUS,
                              weights: torch.Tensor | None = None) -> torch.Tensor:
    """The expected attention a head gives within `radius` of the query particle (§2.2), over states and
    over the queries that have a particle that near: attn (..., S, H, N, N+1), positions (S, N, 2) -> (..., H).
    weights (K, S) weigh the states (e.g. bootstrap resamples), one score per row: (K, ..., H)."""
    N = positions.shape[-2]
    near = (torch.cdist(positions, positions) < radius) & ~torch.eye(N, dtype=torch.bool, device=positions.device)
    has_near = near.any(-1)                                                      # (S, N)
    mass = (attn[..., :N] * near.unsqueeze(-3)).sum(-1)                          # (..., S, H, N)
    per_state = (mass * has_near.unsqueeze(-2)).sum(-1)                          # (..., S, H)
    w = _state_weights(weights, len(positions), per_state)                       # (K, S)
    queries = (w @ has_near.sum(-1).to(w.dtype)).clamp(min=1e-12)                # (K,)
    score = _weighted_mean(w, per_state.movedim(-2, 0))                          # (K, ..., H)
    score = score / queries.view(-1, *[1] * (score.dim() - 1))
    return score[0] if weights is None else score


def attention_distance_correlation(attn: torch.Tensor, positions: torch.Tensor,
                                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """c(w) = 1/(N²−N) Σ_{i≠j} corr(d_ij, α_ij(w)) (§2.2), each corr over the S states, per head:
    attn (..., S, H, N, N+1), positions (S, N, 2) -> (..., H); pairs whose attention never varies are left
    out. weights as for collision_detection_score. In float64: a sharp head's far weights underflow float32."""
    N = positions.shape[-2]
    a = attn[..., :N].movedim(-4, 0)                                             # (S, ..., H, N, N), a view
    ac = torch.empty(a.shape, dtype=torch.float64, device=a.device).copy_(a)
    ac -= ac.mean(0)                                                             # centred
    d = torch.cdist(positions, positions).double().view(len(positions), *[1] * (ac.dim() - 3), N, N)
    dc = d - d.mean(0)
    w = _state_weights(weights, len(positions), ac)                              # (K, S)
    md, ma = _weighted_mean(w, dc), _weighted_mean(w, ac)
    cov = _weighted_mean(w, dc * ac) - md * ma
    vd, va = _weighted_mean(w, dc.pow(2)) - md.pow(2), _weighted_mean(w, ac.square_()) - ma.pow(2)
    corr = cov / (vd * va).sqrt()                                                # nan where α never varies
    corr = corr.masked_fill(torch.eye(N, dtype=torch.bool, device=corr.device), float("nan"))
    c = corr.nanmean((-1, -2))                                                   # (K, ..., H)
    return c[0] if weights is None else c


# --- 5. Training (Table 2) --------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Training of Table 2, and the checkpoints at which the heads are measured."""
    steps: int = 64_000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0                 # seeds the model's initialisation and the data of one run
    log_checkpoints: int = 64     # free choice: checkpoints at log-spaced steps 1 ... steps, united with ...
    even_checkpoints: int = 250   # ... evenly spaced ones, plus step 0

    def __post_init__(self):
        assert min(self.steps, self.batch_size, self.lr, self.log_checkpoints, self.even_checkpoints) > 0, f"TrainConfig sizes must be positive: {self}"
        assert self.weight_decay >= 0, f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}"


def checkpoint_steps(cfg: TrainConfig) -> list[int]:
    """Log-spaced steps (the fast early dynamics, even on log axes) united with evenly spaced ones (the late
    power-law regimes that Table 5 fits over tens of thousands of steps), and 0."""
    log_spaced = torch.logspace(0, math.log10(cfg.steps), cfg.log_checkpoints, dtype=torch.float64)
    even = torch.linspace(0, cfg.steps, cfg.even_checkpoints + 1, dtype=torch.float64)
    return sorted({0, *log_spaced.round().long().tolist(), *even.round().long().tolist()})


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One step on the mean squared error of the predicted next state; returns the loss (on the device)."""
    loss = F.mse_loss(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train(sim: SimConfig, model_cfg: ModelConfig, train_cfg: TrainConfig, data_cfg: DataConfig, device="cpu",
          resume: dict | None = None, on_checkpoint=None, on_step=None, compile_model: bool = False) -> ParticleTransformer:
    """Table 2: Adam on fresh pairs of TrainingStream for train_cfg.steps steps, all seeded by train_cfg.seed.
    At every step of checkpoint_steps(train_cfg), on_checkpoint(step, model, optimizer, train_loss) is called,
    train_loss the mean loss of the steps since the previous checkpoint (nan at step 0): measure the heads
    and save there. resume = {"step", "model", "optimizer"} saved at a checkpoint continues from it (its
    checkpoint is not repeated). on_step(step) follows every step; compile_model trains a torch.compile'd model."""
    torch.manual_seed(train_cfg.seed)
    model = ParticleTransformer(model_cfg, sim).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        start = resume["step"]
    forward = torch.compile(model) if compile_model else model
    stream = TrainingStream(sim, data_cfg, train_cfg.batch_size, train_cfg.seed, device)
    checkpoints = set(checkpoint_steps(train_cfg)) - ({start} if resume is not None else set())
    loss_sum, n = torch.zeros((), device=device), 0
    model.train()
    for step in range(start, train_cfg.steps + 1):
        if step in checkpoints and on_checkpoint is not None:
            on_checkpoint(step, model, optimizer, float(loss_sum) / n if n else float("nan"))
            loss_sum, n = torch.zeros((), device=device), 0
        if step == train_cfg.steps:
            break
        loss_sum, n = loss_sum + training_step(forward, optimizer, *stream.batch(step)), n + 1
        if on_step is not None:
            on_step(step + 1)
    return model.eval()


# --- 6. The model as a simulator (Appendix D.2, Fig. 7) ---------------------------------------------------

@torch.no_grad()
def rollout(model: ParticleTransformer, x0: torch.Tensor, n_steps: int) -> torch.Tensor:
    """x_{n+1} = f(x_n; w_final): x0 (B, N, 4) -> (B, n_steps+1, N, 4)."""
    xs = [x0]
    for _ in range(n_steps):
        xs.append(model(xs[-1]))
    return torch.stack(xs, 1)


@torch.no_grad()
def evaluate_simulator(model: ParticleTransformer, n_states: int = 16, n_steps: int = 1000, seed: int = 2024) -> dict:
    """Appendix D.2: roll the model out from ground-truth initial states beside the truth. Returns the mean
    total energy per step of both (Fig. 7), the rollout's mean position error per step and the mean one-step
    position error on true states."""
    model.eval()
    sim, device = model.sim, next(model.parameters()).device
    truth = simulate_states(sim, n_states, seed, device, n_steps)                     # (B, T+1, N, 4)
    pred = rollout(model, truth[:, 0], truth.shape[1] - 1)                            # (B, T+1, N, 4)
    one_step = torch.cat([model(x) for x in truth[:, :-1].flatten(0, 1).split(256)])  # (B*T, N, 4)
    return {
        "energy_true": total_energy(truth[..., :2], truth[..., 2:], sim).mean(0).tolist(),
        "energy_model": total_energy(pred[..., :2], pred[..., 2:], sim).mean(0).tolist(),
        "rollout_position_error": (pred[..., :2] - truth[..., :2]).norm(dim=-1).mean((0, 2)).tolist(),
        "one_step_position_error": float((one_step[..., :2] - truth[:, 1:].flatten(0, 1)[..., :2]).norm(dim=-1).mean()),
    }


# --- 7. The parameter-restricted local learning coefficient by SGLD (§2.3, Appendix B, Table 1) -----------

@dataclass
class LLCConfig:
    """SGLD hyperparameters of Table 1."""
    step_size: float = 0.00075   # ε
    localization: float = 1.0    # γ, strength of the Gaussian prior centred at w₀
    nbeta: float = 1385.0        # nβ, the gradient factor β̃
    batch_size: int = 256        # m
    steps: int = 10_000          # T
    burn_in: int = 9_000         # B
    chains: int = 8              # C (Fig. 1; Section D.5 uses 4)
    seed: int = 0                # chain c draws its noise and data from seed + c

    def __post_init__(self):
        assert min(self.step_size, self.localization, self.nbeta, self.batch_size, self.steps, self.chains) > 0, f"LLCConfig values must be positive: {self}"
        assert 0 <= self.burn_in <= self.steps - 4, f"LLCConfig.burn_in={self.burn_in} must leave >= 4 of the {self.steps} steps"


@dataclass
class LLCResult:
    """One estimate of eq. (3): the mean over the chains, as the paper (and devinterp) report it."""
    llc: float                   # mean λ̂ over the chains
    llc_stderr: float            # its standard error (nan with one chain)
    chain_llc: list              # λ̂ of each chain
    init_loss: list              # each chain's estimate of L_n(w₀)
    traces: torch.Tensor         # (C, T) L_m(w_t), on the CPU
    w0_traces: torch.Tensor      # (C, T) L_m(w₀) on the same minibatches
    acceptance: torch.Tensor     # (C, T) MALA's acceptance probability of the step into w_t (nan at t = 0)
    final_params: dict           # name -> (C, *shape): the sampled tensors after the last step
    dimension: int               # d, the number of sampled entries
    config: LLCConfig


def estimate_llc(model: nn.Module, criterion, data, subsets, cfg: LLCConfig = LLCConfig(), prefix=None,
                 compile_step: bool = False, state: dict | None = None, on_step=None):
    """λ̂ of eq. (3), the LLC restricted to `subsets` of the parameters, by the SGLD of eq. (5).

    criterion(output, target) -> L_m, the mean loss of a minibatch; data(seed, start) -> endless minibatches
    (inputs, targets) from the start-th on (dataset_batches, simulator_batches). subsets: {name: bool mask,
    or None for the whole tensor}, or a list of them (one LLCResult each); the other parameters stay at w₀.
    Chain c reads data(cfg.seed + c, ·) and draws noise seeded by cfg.seed + c alone, so it gives the same
    numbers alone or batched with other chains and subsets. Each chain also takes L_m(w₀) on its minibatches:
    their mean is its L_n(w₀), with the minibatch noise paired out. prefix: a frozen front of the network
    (inputs -> the model's inputs), run once per minibatch (FromBlock). compile_step: torch.compile the step.
    Each step also gives the acceptance probability a Metropolis correction (MALA) would give it, a check
    that ε is small enough. state / on_step: continue from, and see after every step, {"step", "delta": w −
    w₀, "traces", "w0_traces", "acceptance", "previous": ‖∇U‖² at the last step}.
    """
    from torch.func import functional_call, grad_and_value, vmap
    single = isinstance(subsets, dict)
    subsets = [subsets] if single else list(subsets)
    params = dict(model.named_parameters())
    for n, mask in ((n, m) for s in subsets for n, m in s.items()):
        assert n in params, f"estimate_llc: the model has no parameter {n!r}"
        assert mask is None or (mask.dtype == torch.bool and mask.shape == params[n].shape), f"estimate_llc: the mask of {n!r} must be a bool tensor of shape {tuple(params[n].shape)}"
    names = sorted({n for s in subsets for n in s})
    K, C, T, B = len(subsets), cfg.chains, cfg.steps, cfg.burn_in
    eps, gamma, nbeta = cfg.step_size, cfg.localization, cfg.nbeta
    w0 = {n: params[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in params.items() if n not in w0}
    device = w0[names[0]].device
    masks = {n: torch.stack([s[n].to(device) if s.get(n) is not None else torch.full_like(w0[n], n in s, dtype=torch.bool)
                             for s in subsets]).repeat_interleave(C, 0) for n in names}   # (K·C, *shape)
    tile = lambda z: z.repeat(K, *[1] * (z.dim() - 1))    # chain c's minibatch or noise for each subset: (K·C, ...)

    def loss(delta, x, y):                                 # L_m at w = w₀ + δ, one chain
        return criterion(functional_call(model, {**frozen, **{n: w0[n] + delta[n] for n in names}}, x), y)

    def sgld_step(delta, x, y, xi):                        # x (tuple), y: (C, m, ...); xi: name -> (C, *shape) ~ N(0, I)
        grad, L = vmap(grad_and_value(loss))(delta, tuple(map(tile, x)), tile(y))
        with torch.no_grad():
            L0 = vmap(criterion)(model(*(z.flatten(0, 1) for z in x)).unflatten(0, (C, -1)), y)   # L_m(w₀), (C,)
        drift = {n: torch.where(masks[n], gamma * delta[n] + nbeta * grad[n], 0) for n in names}  # ∇U, U = nβ L_m + γ/2 ‖δ‖²
        dw = {n: -eps / 2 * drift[n] + math.sqrt(eps) * tile(xi[n]) for n in names}           # eq. (5), δ = w − w₀
        G = sum(g.flatten(1).pow(2).sum(1) for g in drift.values())                          # ‖∇U(w_t)‖², (K·C,)
        return {n: torch.where(masks[n], delta[n] + dw[n], 0) for n in names}, L.detach(), L0, G   # w_t+1 = w_t + Δw_t
    step = torch.compile(sgld_step) if compile_step else sgld_step

    # Chain c's noise for tensor n comes from a generator seeded by (seed + c, n), `block[n]` steps at a time.
    gens = {n: [torch.Generator(device).manual_seed((cfg.seed + c) * 1_000_003 + zlib.crc32(n.encode())) for c in range(C)] for n in names}
    block = {n: max(1, min(256, 2 ** 20 // w0[n].numel())) for n in names}
    draw = lambda n: torch.stack([torch.randn(block[n], *w0[n].shape, generator=g, device=device, dtype=w0[n].dtype) for g in gens[n]])
    start = 0 if state is None else state["step"]
    delta = {n: torch.zeros(K * C, *w0[n].shape, device=device, dtype=w0[n].dtype) if state is None else state["delta"][n].to(device) for n in names}
    traces, w0_traces, accept = (torch.full((k, T), math.nan, device=device, dtype=w0[names[0]].dtype) for k in (K * C, C, K * C))
    previous = None if state is None else state["previous"].to(device)
    if state is not None:
        for z, key in ((traces, "traces"), (w0_traces, "w0_traces"), (accept, "acceptance")):
            z[:, :start] = state[key][:, :start].to(device)
    noise = {}
    for n in names:                                        # replay each generator up to the block of step `start`
        for _ in range(start // block[n] + 1):
            noise[n] = draw(n)
    streams = [data(cfg.seed + c, start) for c in range(C)]
    for t in range(start, T):
        x, y = (torch.stack(z).to(device) for z in zip(*(next(s) for s in streams)))   # (C, m, ...) each
        with torch.no_grad():
            x = (x,) if prefix is None else tuple(z.unflatten(0, (C, -1)) for z in prefix(x.flatten(0, 1)))
        noise.update({n: draw(n) for n in names if t % block[n] == 0 and t > start})
        delta, traces[:, t], w0_traces[:, t], G = step(delta, x, y, {n: noise[n][:, t % block[n]] for n in names})
        # MALA's acceptance of the step w_t−1 -> w_t: log α = U(w_t−1) − U(w_t) + log q(w_t−1 | w_t) − log q(w_t | w_t−1).
        # With U(w_t) − U(w_t−1) by the trapezoid rule (exact for a quadratic U, and free of the minibatch noise in U
        # itself) it is log α = ε/8 (‖∇U(w_t−1)‖² − ‖∇U(w_t)‖²).
        if previous is not None:
            accept[:, t] = (eps / 8 * (previous - G)).clamp(max=0).exp()
        previous = G
        if on_step is not None:
            on_step({"step": t + 1, "delta": delta, "traces": traces, "w0_traces": w0_traces, "acceptance": accept, "previous": previous})

    traces, w0_traces, accept = traces.cpu().view(K, C, T), w0_traces.cpu(), accept.cpu().view(K, C, T)
    init = w0_traces[:, B:].mean(1)                                           # L_n(w₀) per chain, (C,)
    results = []
    for k, s in enumerate(subsets):
        chain_llc = nbeta * (traces[k, :, B:].mean(1) - init)                 # eq. (3), λ̂ = nβ (E_w[L_n(w)] − L_n(w₀))
        final = {n: (w0[n] + delta[n][k * C:(k + 1) * C]).where(masks[n][k * C:(k + 1) * C], w0[n]).cpu() for n in s}
        results.append(LLCResult(float(chain_llc.mean()), float(chain_llc.std() / math.sqrt(C)) if C > 1 else math.nan,
                                 chain_llc.tolist(), init.tolist(), traces[k], w0_traces, accept[k], final,
                                 sum(int(masks[n][k * C].sum()) for n in names), cfg))
    return results[0] if single else results


def dataset_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, block: int = 256):
    """Data for estimate_llc from a fixed dataset: (seed, start) -> endless minibatches drawn with
    replacement, from the start-th on. Indices are drawn on the CPU, `block` minibatches at a time."""
    rows = max(1, 2 ** 22 // (batch_size * x[0].numel()))                     # <= 2^22 numbers a gather

    def batches(seed: int, start: int = 0):
        g = torch.Generator().manual_seed(seed)
        for _ in range(start // block):
            torch.randint(len(x), (block, batch_size), generator=g)
        skip = start % block
        while True:
            idx = torch.randint(len(x), (block, batch_size), generator=g)[skip:].to(x.device)   # (block − skip, m)
            skip = 0
            for part in idx.split(rows):
                yield from zip(x[part], y[part])                                 # (m, ...) each
    return batches


def head_parameters(model: ParticleTransformer, block: int, head: int) -> dict:
    """One attention head's parameters as {name: bool mask}: its rows of the fused q, k, v in-projection
    (weight and bias) and its columns of the out-projection (ParticleAttention's layout)."""
    assert 0 <= block < model.cfg.n_blocks and 0 <= head < model.cfg.n_heads, f"no head {block}-{head} in this model"
    E, H = model.cfg.embed_dim, model.cfg.n_heads
    rows = torch.zeros(3, H, E // H, dtype=torch.bool)
    rows[:, head] = True                                           # q, k, v thirds
    cols = rows[0].reshape(E)
    prefix = f"blocks.{block}.attn."
    return {prefix + "in_proj.weight": rows.reshape(3 * E, 1).expand(3 * E, E).clone(),
            prefix + "in_proj.bias": rows.reshape(3 * E), prefix + "out_proj.weight": cols.expand(E, E).clone()}


class FromBlock(nn.Module):
    """The particle transformer from block l on, for estimate_llc's prefix: where every sampled parameter
    sits in blocks >= l, x^(l) is the same for every chain and head, so prefix(x) = (x, x^(l)) runs once per
    minibatch and split(x, x^(l)) = model(x). It holds the model's own modules under the model's names."""

    def __init__(self, model: ParticleTransformer, block: int):
        super().__init__()
        for name, module in model.named_children():
            self.add_module(name, module)
        self.whole, self.block = (model,), block   # a tuple: not registered twice

    def prefix(self, x: torch.Tensor):
        return x, self.whole[0].hidden(x, self.block)                            # (B, N, 4), (B, N, E)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.whole[0](x, resume=(self.block, h))


def squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Appendix B.1's ℓ(w, x, y) = ‖y − f(x, w)‖² over a sample's outputs, averaged over the minibatch: L_m
    (F.mse_loss also averages over the outputs: 4N times smaller, a posterior 4N times hotter at one nβ)."""
    return (output - target).pow(2).flatten(1).sum(1).mean()


def simulator_batches(sim: SimConfig, data: DataConfig, batch_size: int, device=None):
    """Data for estimate_llc on the physics model: (seed, start) -> endless fresh (x_t, x_t+1) minibatches,
    never reused (Appendix B.2), from the start-th on."""
    def batches(seed: int, start: int = 0):
        stream = TrainingStream(sim, data, batch_size, seed=10_000_019 + seed, device=device)
        step = start
        while True:
            yield stream.batch(step)
            step += 1
    return batches


# --- 8. Power laws in the attention-distance correlation (§3.2, Appendix D.1, Table 5) --------------------

@dataclass
class PowerLawFit:
    """log|c| = α log t + log A by least squares (natural logs), |c| = A t^α: a row of Table 5 (α is its
    "Exponent −α", negative where |c| decays)."""
    exponent: float            # α, the slope on log-log axes
    exponent_ci: float         # half-width of α's 95 % interval under iid normal errors, as the paper
    log_constant: float        # log A
    r2: float                  # R² of the fit
    start: float               # the first and last training step in the fit
    end: float
    n_points: int


def _log_log(t, c, start=None, end=None):
    """The points with t > 0, c ≠ 0 and start <= t <= end: t, log t, log|c| as float64 arrays."""
    t, c = np.asarray(t, dtype=np.float64), np.abs(np.asarray(c, dtype=np.float64))
    keep = (t > 0) & np.isfinite(c) & (c > 0) & (t >= (start if start is not None else -np.inf)) & (t <= (end if end is not None else np.inf))
    return t[keep], np.log(t[keep]), np.log(c[keep])


def fit_power_law(t, c, start=None, end=None, confidence: float = 0.95) -> PowerLawFit:
    """Appendix D.1: least squares of log|c| on log t over start <= t <= end; α's interval is the t_{n−2}
    quantile times its standard error (the paper's assumption: linear, iid normal zero-mean errors)."""
    t, x, y = _log_log(t, c, start, end)
    assert len(x) >= 3 and np.ptp(x) > 0, f"fit_power_law needs >= 3 distinct steps t > 0 with c != 0 in [{start}, {end}], got {len(x)}"
    fit = scipy.stats.linregress(x, y)
    r2 = float(fit.rvalue) ** 2 if np.isfinite(fit.rvalue) else 0.0
    half_width = float(scipy.stats.t.ppf(0.5 + confidence / 2, len(x) - 2) * fit.stderr)
    return PowerLawFit(float(fit.slope), half_width, float(fit.intercept), r2, float(t[0]), float(t[-1]), len(x))


# --- 9. Beyond the paper: error bars, chain health, calibration, and finding power-law regimes ------------

# §3.1: final collision scores cluster near 0.95 (true heads), near 0 (none), and "between approximately
# 0.3 and 0.8" (partial heads).
TRUE_HEAD_SCORE = 0.8     # free choice: the cut between partial and true heads
PARTIAL_HEAD_SCORE = 0.3  # free choice: the cut between none and partial heads


def head_class(score: float) -> str:
    """The class of a head from its final collision detection score: "true", "partial" or "none"."""
    return "true" if score >= TRUE_HEAD_SCORE else "partial" if score >= PARTIAL_HEAD_SCORE else "none"


def bootstrap_weights(n: int, replicates: int, seed: int = 0) -> torch.Tensor:
    """Bootstrap resamples of n items as weights (replicates, n), float64: how often resample k draws each
    item, over n. The metrics of section 4 with these weights are the metrics of the resamples."""
    draws = torch.randint(n, (replicates, n), generator=torch.Generator().manual_seed(seed))
    counts = torch.zeros(replicates, n, dtype=torch.float64)
    return counts.scatter_add_(1, draws, torch.ones(replicates, n, dtype=torch.float64)) / n


@torch.no_grad()
def head_metrics(model: ParticleTransformer, states: torch.Tensor, targets: torch.Tensor, bootstrap: torch.Tensor) -> dict:
    """Every head's §2.2 metrics on held-out states (S, N, 4) with bootstrap errors (the standard deviation
    over the resamples `bootstrap` (K, S)), c on each half of the states (two independent held-out sets), and
    the held-out loss: {"collision_score", "collision_score_se", "correlation", "correlation_se",
    "correlation_first_half", "correlation_second_half": (L, H) each, "heldout_loss": float}."""
    was_training = model.training
    model.eval()
    predicted, attn = zip(*(model(x, return_attention=True) for x in states.split(64)))
    attn, positions, S = torch.cat(attn, 1), states[..., :2], len(states)       # (L, S, H, N, N+1)
    halves = (torch.arange(S) < S // 2).double()
    weights = torch.cat([_state_weights(None, S, bootstrap), torch.stack([halves / halves.sum(), (1 - halves) / (1 - halves).sum()]),
                         bootstrap]).to(states.device)                          # (3 + K, S)
    score = collision_detection_score(attn, positions, weights=weights)        # (3 + K, L, H)
    corr = attention_distance_correlation(attn, positions, weights=weights)    # (3 + K, L, H)
    model.train(was_training)
    return {"collision_score": score[0], "collision_score_se": score[3:].std(0), "correlation": corr[0],
            "correlation_se": corr[3:].std(0), "correlation_first_half": corr[1], "correlation_second_half": corr[2],
            "heldout_loss": float(F.mse_loss(torch.cat(predicted), targets))}


def chain_health(trace: torch.Tensor, w0_trace: torch.Tensor, burn_in: int, llc: float = 0.0, dimension: int | None = None) -> str:
    """A verdict on one chain (cf. Appendix B.2.1) from its excess loss e_t = L_m(w_t) − L_m(w₀) (T,):
    "diverged" (a non-finite loss, or over the last tenth e_t above its late burn-in level by 9x that level
    and 10 of its standard deviations), "not stationary" (the post-burn-in halves' means differ by > 4
    standard errors, from 10 batch means each), "negative" (mean e_t < 0: λ̂ < 0), "too hot" (λ̂ > d, twice a
    regular minimum's d/2: ε too large for the curvature), else "healthy"."""
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


def llc_health(r: LLCResult) -> list[str]:
    """chain_health of every chain of an estimate."""
    return [chain_health(r.traces[c], r.w0_traces[c], r.config.burn_in, r.chain_llc[c], r.dimension) for c in range(len(r.chain_llc))]


# Whether an estimate has equilibrated: free-choice thresholds (README, "Can an LLC estimate be trusted?") on
# the chains' excess loss e_t = L_m(w_t) − L_m(w₀) after burn-in; split-R̂ and ESS as Vehtari et al. (2021).
RHAT_MAX = 1.05         # split-R̂ above this: the chains, or the halves of a chain, disagree
ESS_MIN = 100           # fewer effective draws (over all chains): λ̂'s error is itself unreliable
DRIFT_Z_MAX = 3.0       # λ̂ of the draws' second half minus their first half's, in standard errors
ACCEPTANCE_MIN = 0.9    # MALA's mean acceptance below this: ε too large for the posterior's curvature


def split_rhat(x) -> float:
    """Split-R̂ of draws x (M chains, n): each chain cut in two halves, sqrt(var⁺ / W) over the 2M halves."""
    x = np.asarray(x, dtype=np.float64)
    h = x.shape[1] // 2
    halves = np.concatenate([x[:, :h], x[:, h:2 * h]])                          # (2M, h)
    W, B = halves.var(1, ddof=1).mean(), h * halves.mean(1).var(ddof=1)
    return float(np.sqrt(((h - 1) / h * W + B / h) / W)) if W > 0 else math.nan


def effective_sample_size(x) -> float:
    """Effective number of independent draws in x (M chains, n): M·n / τ with τ = 1 + 2 Σ_k ρ_k, ρ_k the
    multi-chain autocorrelation summed by Geyer's initial monotone sequence (as Stan does)."""
    x = np.asarray(x, dtype=np.float64)
    M, n = x.shape
    f = np.fft.rfft(x - x.mean(1, keepdims=True), 2 * n)
    acov = np.fft.irfft(f * f.conj(), 2 * n)[:, :n] / n                        # (M, n): lags 0 ... n − 1
    W = acov[:, 0].mean() * n / (n - 1)
    var_plus = W * (n - 1) / n + (x.mean(1).var(ddof=1) if M > 1 else 0.0)
    if var_plus <= 0:
        return math.nan
    rho = 1 - (W - acov.mean(0)) / var_plus
    rho[0] = 1.0
    pairs = rho[:n // 2 * 2].reshape(-1, 2).sum(1)                              # ρ_2k + ρ_2k+1
    pairs = np.minimum.accumulate(pairs[:np.argmax(pairs < 0) if (pairs < 0).any() else len(pairs)])
    return float(M * n / max(-1 + 2 * pairs.sum(), 1 / math.log10(max(M * n, 10))))


def truncated(r: LLCResult, steps: int, burn_in: int) -> LLCResult:
    """The estimate r's chains would have given stopped after `steps` steps with `burn_in` (the same draws)."""
    excess = r.traces[:, burn_in:steps] - r.w0_traces[:, burn_in:steps].mean(1, keepdim=True)
    chain_llc = r.config.nbeta * excess.mean(1)
    C = len(chain_llc)
    return LLCResult(float(chain_llc.mean()), float(chain_llc.std() / math.sqrt(C)) if C > 1 else math.nan,
                     chain_llc.tolist(), r.w0_traces[:, burn_in:steps].mean(1).tolist(), r.traces[:, :steps],
                     r.w0_traces[:, :steps], r.acceptance[:, :steps], {}, r.dimension,
                     LLCConfig(**{**r.config.__dict__, "steps": steps, "burn_in": burn_in}))


def convergence(r: LLCResult) -> dict:
    """Whether estimate r has equilibrated: split-R̂ and ESS of e_t after burn-in, λ̂'s Monte Carlo standard error
    nβ·sd(e)/√ESS ("llc_mcse"), λ̂ of the draws' first and
    second half and their difference in standard errors (z), MALA's mean acceptance, every chain's health;
    "verdict": "equilibrated", or "not equilibrated: " and each reason."""
    B, nbeta = r.config.burn_in, r.config.nbeta
    e = (r.traces - r.w0_traces)[:, B:].double().numpy()                        # (C, T − B)
    h = e.shape[1] // 2
    with np.errstate(all="ignore"):                                              # a diverged chain: nan, and a failed test
        halves = [(nbeta * z.mean(), nbeta * z.std() / math.sqrt(effective_sample_size(z))) for z in (e[:, :h], e[:, h:2 * h])]
        ess = effective_sample_size(e)
        out = {"rhat": split_rhat(e), "ess": ess, "llc_mcse": float(nbeta * e.std() / math.sqrt(ess)), "llc_first_half": float(halves[0][0]),
               "llc_second_half": float(halves[1][0]), "drift_z": float((halves[1][0] - halves[0][0]) / math.hypot(halves[0][1], halves[1][1])),
               "acceptance": float(np.nanmean(r.acceptance[:, max(B, 1):].double().numpy()))}
    health = llc_health(r)
    tests = [(out["rhat"] <= RHAT_MAX, f"split-R̂ {out['rhat']:.3f} > {RHAT_MAX}"), (out["ess"] >= ESS_MIN, f"ESS {out['ess']:.0f} < {ESS_MIN}"),
             (abs(out["drift_z"]) <= DRIFT_Z_MAX, f"λ̂ drifts {out['drift_z']:+.1f} se from the first half of the draws to the second"),
             (out["acceptance"] >= ACCEPTANCE_MIN, f"MALA acceptance {np.floor(out['acceptance'] * 1000) / 1000:.3f} < {ACCEPTANCE_MIN}"),
             (health.count("healthy") == len(health), f"{len(health) - health.count('healthy')} of {len(health)} chains unhealthy")]
    reasons = [message for ok, message in tests if not ok]       # a nan fails its test
    return {**out, "verdict": "equilibrated" if not reasons else "not equilibrated: " + "; ".join(reasons)}


@dataclass
class Calibration:
    """calibrate_llc's answer: every probed cell, and the selected setting (None where none passes)."""
    rows: list                   # one dict per (model, ε, nβ, subset): λ̂ ± se at T and 2T, its convergence, the tests
    step_size: float | None
    nbeta: float | None
    statement: str               # the selection, or what came closest and what it would take
    closest: tuple = ()          # (ε, nβ) of the selected cell, or of the closest where none passes


def calibrate_llc(models: dict, criterion, data, subsets, cfg: LLCConfig, step_sizes, nbetas=None, alpha: float = 0.05,
                  on_cell=None) -> Calibration:
    """Appendix B.2.1 automated: where λ̂ stops depending on the sampler. Chains of 2T steps (T = cfg.steps) over a
    grid of ε (and nβ) at several models {name: module} and subsets; each gives λ̂ at (T, B) from its first T steps
    and at (2T, 2B), with its convergence; select_sampler judges the rows. on_cell(done, total) follows each cell."""
    nbetas, step_sizes = [cfg.nbeta] if nbetas is None else list(nbetas), sorted(step_sizes)
    subsets = [subsets] if isinstance(subsets, dict) else list(subsets)
    rows, cells = [], [(name, nb, eps) for name in models for nb in nbetas for eps in step_sizes]
    long = lambda eps, nb: LLCConfig(**{**cfg.__dict__, "step_size": eps, "nbeta": nb, "steps": 2 * cfg.steps, "burn_in": 2 * cfg.burn_in})
    for i, (name, nbeta, eps) in enumerate(cells):
        for j, r2 in enumerate(estimate_llc(models[name], criterion, data, subsets, long(eps, nbeta))):
            r = truncated(r2, cfg.steps, cfg.burn_in)
            rows.append({"model": name, "step_size": eps, "nbeta": nbeta, "subset": j, "llc": r.llc, "llc_stderr": r.llc_stderr,
                         "llc_2T": r2.llc, "llc_2T_stderr": r2.llc_stderr, "llc_2T_mcse": convergence(r2)["llc_mcse"], **convergence(r)})
        if on_cell is not None:
            on_cell(i + 1, len(cells))
    return select_sampler(rows, cfg, alpha)


def select_sampler(rows: list, cfg: LLCConfig, alpha: float = 0.05) -> Calibration:
    """calibrate_llc's rule on its rows (or saved ones). A cell (ε, nβ) passes where, at every model and subset,
    the (T, B) estimate is equilibrated, doubling T moves λ̂ by at most z_d standard errors of the difference,
    and λ̂ at 2T exceeds its value at the next smaller ε and 2T by at most z_g of them. A standard error is
    llc_mcse·√φ: φ, the cell's mean of (chains' se / llc_mcse)² over its 2k estimates (k model-subset pairs),
    widens the ESS-based error to the chains' spread where a slow mode hides from the autocorrelation. z_d, z_g:
    Student t (2k(C − 1) degrees of freedom) at Bonferroni's two- and one-sided levels for the cell's 2k tests,
    so a sampler that no longer depends on ε and T passes with probability >= 1 − alpha. The selection: the
    largest ε that passes (the fastest sampler), with T."""
    step_sizes = sorted({r["step_size"] for r in rows})
    nbetas = list(dict.fromkeys(r["nbeta"] for r in rows))
    k = len({(r["model"], r["subset"]) for r in rows})
    n_models, n_subsets = len({r["model"] for r in rows}), len({r["subset"] for r in rows})
    df = 2 * k * (cfg.chains - 1) if cfg.chains > 1 else math.inf    # T's and 2T's spreads: disjoint draws where B = T/2
    z_d, z_g = scipy.stats.t.isf(alpha / (4 * k), df), scipy.stats.t.isf(alpha / (2 * k), df)
    cell_rows = lambda eps, nb: [r for r in rows if (r["step_size"], r["nbeta"]) == (eps, nb)]
    for eps in step_sizes:
        for nb in nbetas:
            cell = cell_rows(eps, nb)
            phi = 1.0 if cfg.chains == 1 else float(np.mean([(r[se] / r[mcse]) ** 2 for r in cell for se, mcse in (("llc_stderr", "llc_mcse"), ("llc_2T_stderr", "llc_2T_mcse"))]))
            for r in cell:
                r["dispersion"] = phi
                r["doubling_z"] = (r["llc_2T"] - r["llc"]) / math.sqrt(phi * (r["llc_mcse"] ** 2 + r["llc_2T_mcse"] ** 2))
    for r in rows:
        below = [q for q in rows if (q["model"], q["nbeta"], q["subset"]) == (r["model"], r["nbeta"], r["subset"]) and q["step_size"] < r["step_size"]]
        q = max(below, key=lambda q: q["step_size"]) if below else None
        r["growth_z"] = (r["llc_2T"] - q["llc_2T"]) / math.sqrt(r["dispersion"] * r["llc_2T_mcse"] ** 2 + q["dispersion"] * q["llc_2T_mcse"] ** 2) if q else math.nan
        r["llc_over_smaller_step"] = r["llc_2T"] / q["llc_2T"] if q and q["llc_2T"] > 0 else math.nan
        tests = [(r["verdict"] == "equilibrated", r["verdict"]), (abs(r["doubling_z"]) <= z_d, f"doubling T moves λ̂ {r['doubling_z']:+.2f} se (bound {z_d:.2f})"),
                 (q is not None, "no smaller ε probed"), (q is None or r["growth_z"] <= z_g, f"λ̂ grows {r['growth_z']:+.2f} se from the next smaller ε (bound {z_g:.2f})")]
        failed = [message for ok, message in tests if not ok]
        r["passes"], r["failed"] = not failed, "; ".join(failed)
    passing = [(eps, nb) for nb in nbetas for eps in step_sizes if all(r["passes"] for r in cell_rows(eps, nb))]
    if passing:
        eps, nbeta = max(passing, key=lambda f: (f[0], -nbetas.index(f[1])))
        return Calibration(rows, eps, nbeta, f"ε = {eps:g}, nβ = {nbeta:g}, T = {cfg.steps} (B = {cfg.burn_in}): the largest probed ε "
                           f"at which, at all {n_models} models and {n_subsets} subsets, the chains equilibrate, and doubling T "
                           f"and halving ε move λ̂ by at most {z_d:.2f} and {z_g:.2f} standard errors (Bonferroni, {alpha:g} "
                           f"over the cell's {2 * k} tests)", (eps, nbeta))
    eps, nbeta = max(((e, n) for n in nbetas for e in step_sizes),      # closest: most passing pairs, fewest failed tests
                     key=lambda f: (sum(r["passes"] for r in cell_rows(*f)), -sum(r["failed"].count(";") + 1 for r in cell_rows(*f) if r["failed"]), f[0]))
    worst = cell_rows(eps, nbeta)
    why = " ".join(r["failed"] for r in worst)
    hint = [h for keys, h in ((("split-R̂", "ESS", "drifts", "doubling"), f"longer chains than T = {cfg.steps} (or more of them, or a larger m)"),
                              (("MALA", "unhealthy", "grows"), "a smaller ε"), (("no smaller",), "a grid reaching smaller ε")) if any(k in why for k in keys)]
    return Calibration(rows, None, None, f"no probed setting passes (ε in {step_sizes}, nβ in {nbetas}, T = {cfg.steps}); closest: "
                       f"ε = {eps:g}, nβ = {nbeta:g}, passing at {sum(r['passes'] for r in worst)} of {len(worst)} (model, subset) pairs "
                       f"({'; '.join(sorted({r['failed'] for r in worst if r['failed']}))[:300]}); it would take {' and '.join(hint)}", (eps, nbeta))


# The paper chose its power-law sections by eye. Here: c is measured on the same held-out states at every
# checkpoint, so its errors are correlated from one checkpoint to the next; the errors of log|c| are modelled
# as AR(1), e_k = ρ e_{k−1} + noise, and fitted by generalised least squares:
# rows r_k − ρ r_{k−1} (Prais-Winsten, the first row scaled by sqrt(1 − ρ²)) have independent errors.

def error_correlation(t, halves) -> float:
    """ρ of the AR(1) errors of log|c| between neighbouring checkpoints, measured directly: `halves` holds pairs
    (c₁, c₂) of c(t) on two independent held-out sets; d = log|c₁| − log|c₂| has no trend, only the two sets'
    errors, so ρ is its lag-1 autocorrelation over the second half of training (median over the pairs), in [0, 0.99]."""
    late, lags = np.asarray(t, dtype=np.float64) >= np.asarray(t)[-1] / 2, []
    for c1, c2 in halves:
        d = np.log(np.abs(np.asarray(c1, dtype=np.float64)[late])) - np.log(np.abs(np.asarray(c2, dtype=np.float64)[late]))
        d = d[np.isfinite(d)] - d[np.isfinite(d)].mean()
        if len(d) > 2 and (d * d).sum() > 0:
            lags.append((d[1:] * d[:-1]).sum() / (d * d).sum())
    return float(np.clip(np.median(lags), 0.0, 0.99)) if lags else 0.0


def _ar1_least_squares(A: np.ndarray, y: np.ndarray, rho: float):
    """Least squares of y on the columns of A with AR(1) errors: coefficients, whitened RSS, their covariance."""
    scale = math.sqrt(1 - rho ** 2)
    Aw = np.vstack([A[:1] * scale, A[1:] - rho * A[:-1]])
    yw = np.concatenate([y[:1] * scale, y[1:] - rho * y[:-1]])
    beta, *_ = np.linalg.lstsq(Aw, yw, rcond=None)
    rss = float(np.sum((yw - Aw @ beta) ** 2))
    return beta, rss, rss / max(len(y) - A.shape[1], 1) * np.linalg.pinv(Aw.T @ Aw)


def _more_terms_p(t, x, y, extra, rho: float) -> float:
    """p of adding the column `extra` to the line a + b log t (F test on the AR(1)-whitened rows)."""
    n, line = len(x), np.stack([np.ones(len(x)), x], 1)
    _, rss_line, _ = _ar1_least_squares(line, y, rho)
    _, rss_more, _ = _ar1_least_squares(np.column_stack([line, extra]), y, rho)
    return float(scipy.stats.f.sf((rss_line - rss_more) / max(rss_more / (n - 3), 1e-300), 1, n - 3))


def _line_rss(x, y, rho: float) -> np.ndarray:
    """(n+1, n+1): the whitened RSS of the AR(1) line through points i .. j−1, for all i < j at once, from
    cumulative sums of the whitened rows (row i scaled by sqrt(1 − ρ²), then (1 − ρ, x_k − ρ x_k−1 | y_k − ρ y_k−1))."""
    n, s2, one = len(x), 1 - rho ** 2, 1 - rho
    u = np.concatenate([[0.0], x[1:] - rho * x[:-1]])
    v = np.concatenate([[0.0], y[1:] - rho * y[:-1]])
    cum = {k: np.concatenate([[0.0], np.cumsum(a)]) for k, a in {"n": np.ones(n), "u": u, "v": v, "uu": u * u, "uv": u * v, "vv": v * v}.items()}
    i, j = np.arange(n + 1)[:, None], np.arange(n + 1)[None, :]
    first = np.clip(i, 0, n - 1)
    after = lambda key: cum[key][j] - cum[key][np.clip(i + 1, 0, n)]            # Σ over k = i+1 .. j−1
    Saa, Sau, Suu = s2 + one * one * after("n"), s2 * x[first] + one * after("u"), s2 * x[first] ** 2 + after("uu")
    Sav, Suv, Svv = s2 * y[first] + one * after("v"), s2 * x[first] * y[first] + after("uv"), s2 * y[first] ** 2 + after("vv")
    with np.errstate(divide="ignore", invalid="ignore"):
        rss = Svv - (Suu * Sav ** 2 - 2 * Sau * Sav * Suv + Saa * Suv ** 2) / (Saa * Suu - Sau ** 2)
    return np.clip(rss, 0, None)


@dataclass
class RegimeConfig:
    """find_power_law_regimes' criterion (all free choices)."""
    max_segments: int = 5      # at most this many straight pieces per curve
    min_points: int = 5        # a piece holds at least this many checkpoints ...
    min_span: float = 1.15     # ... and spans this factor in t (Table 5's shortest, 4864-5734, spans 1.18)
    min_r2: float = 0.5        # a power law fits its piece with R² >= this (Table 5 keeps 0.525-0.982)
    min_exponent: float = 0.04  # ... with |α| >= this (Table 5's shallowest: -0.049) ...
    min_change: float = 0.05   # ... and |c| changing over it by >= this beyond its error (Table 5's least: 7 %)
    max_exponent: float = 2.0  # a steeper piece is a jump of |c|, not a power law (Table 5's steepest: -0.846)
    exponential_p: float = 0.01  # end_of_development: an exponential decay fits significantly better at this level


@dataclass
class Regime(PowerLawFit):
    """A straight piece of log|c| vs log t: the paper's fit and AR(1) diagnostics."""
    exponent_ar1: float = math.nan     # α by AR(1) least squares, and its 95 % half-width
    exponent_ar1_ci: float = math.nan
    curvature_p: float = math.nan      # p of a quadratic term in log t: small = curved
    exponential_p: float = math.nan    # p of a term linear in t: small = not a pure power law
    change: float = math.nan           # |c(end)/c(start)| − 1 on the AR(1) line, and the bound of its 95 % interval
    change_bound: float = math.nan     # nearest 0 (of the same sign, or 0 where the interval holds 0)
    changes: bool = True               # |c| changes over it beyond its fluctuations ...
    is_power_law: bool = True          # ... as a power-law regime (a row of Table 5) ...
    verdict: str = "fitted"            # ... and why (not)


def find_power_law_regimes(t, c, rho: float = 0.0, cfg: RegimeConfig = RegimeConfig()) -> list[Regime]:
    """Cut log|c| vs log t into straight pieces and say which are power-law regimes; rho from error_correlation.
    1. For k = 1 .. max_segments pieces (each >= min_points points spanning min_span in t), the cut with the
       least total whitened RSS (exact, by dynamic programming); k by BIC, n log(RSS/n) + 3k log n.
    2. c changes over a piece iff R² >= min_r2, |α| >= min_exponent and |c| changes by >= min_change at the
       near end of its 95 % AR(1) interval; the piece is a power-law regime ("a good linear fit", §3.2) iff
       also |α| <= max_exponent (steeper: a jump). The breakpoints are the transitions (Fig. 1)."""
    t, x, y = _log_log(t, c)
    n = len(x)
    if n < cfg.min_points:
        return []
    i, j = np.indices((n + 1, n + 1))
    span = x[np.clip(j - 1, 0, n - 1)] - x[np.clip(i, 0, n - 1)]
    rss = np.where((j - i >= cfg.min_points) & (span >= math.log(cfg.min_span) - 1e-12), _line_rss(x, y, rho), np.inf)
    best, cut = [np.where(np.arange(n + 1) == 0, 0.0, np.inf)], []              # best[k][j]: points 0 .. j−1 in k pieces
    for _ in range(cfg.max_segments):
        total = best[-1][:, None] + rss                                          # (start, end)
        best.append(total.min(0))
        cut.append(total.argmin(0))
    bic = [n * math.log(max(best[k][n], n * 1e-12) / n) + 3 * k * math.log(n) if np.isfinite(best[k][n]) else np.inf
           for k in range(1, cfg.max_segments + 1)]
    bounds, end = [], n
    for level in range(int(np.argmin(bic)) + 1, 0, -1):                         # walk the cuts back
        bounds.append((int(cut[level - 1][end]), end))
        end = bounds[-1][0]
    pieces = []
    for start, end in reversed(bounds):
        ts, xs, ys = t[start:end], x[start:end], y[start:end]
        piece = Regime(**fit_power_law(ts, np.exp(ys)).__dict__)
        beta, _, cov = _ar1_least_squares(np.stack([np.ones(len(xs)), xs], 1), ys, rho)
        piece.exponent_ar1 = float(beta[1])
        piece.exponent_ar1_ci = float(scipy.stats.t.ppf(0.975, len(xs) - 2) * math.sqrt(max(cov[1, 1], 0.0)))
        piece.curvature_p = _more_terms_p(ts, xs, ys, ((xs - xs.mean()) / max(xs.std(), 1e-12)) ** 2, rho)
        piece.exponential_p = _more_terms_p(ts, xs, ys, ts / ts[-1], rho)
        span = xs[-1] - xs[0]                                                    # log(end / start)
        piece.change = math.expm1(piece.exponent_ar1 * span)
        near = max(abs(piece.exponent_ar1) - piece.exponent_ar1_ci, 0.0) * math.copysign(1, piece.exponent_ar1)
        piece.change_bound = math.expm1(near * span)
        if piece.r2 < cfg.min_r2:
            piece.changes, piece.verdict = False, f"R² {piece.r2:.2f} < {cfg.min_r2}"
        elif abs(piece.exponent_ar1) < cfg.min_exponent:
            piece.changes, piece.verdict = False, f"flat: |exponent| {abs(piece.exponent_ar1):.3f} < {cfg.min_exponent}"
        elif abs(piece.change_bound) < cfg.min_change:
            piece.changes, piece.verdict = False, (f"flat: |c| changes by {piece.change:+.0%}, by {piece.change_bound:+.0%} "
                                                   f"at its 95% bound (< {cfg.min_change:.0%})")
        elif abs(piece.exponent_ar1) > cfg.max_exponent:
            piece.verdict = f"a jump: |exponent| {abs(piece.exponent_ar1):.1f} > {cfg.max_exponent}"
        else:
            piece.verdict = "power law"
        piece.is_power_law = piece.verdict == "power law"
        pieces.append(piece)
    return pieces


def end_of_development(t, c, pieces: list[Regime], rho: float = 0.0, cfg: RegimeConfig = RegimeConfig()) -> dict:
    """§3.2: "at the end of its development (at the end of training or before the correlation function stops
    changing) the correlation function of a collision detection head evolves as a power law". The end of
    development is the last piece of find_power_law_regimes over which c changes (later pieces are flat or noise).
    The head follows a power law iff that piece is a decaying power-law regime and an exponential in t (Appendix
    A.1's convergence near a non-degenerate minimum) does not fit the decaying stretch ending with it significantly
    better (AR(1) F test at cfg.exponential_p). Returns {"piece", "follows", "why", "stretch_exponential_p"}."""
    changing = [k for k, p in enumerate(pieces) if p.changes]
    if not changing:
        return {"piece": None, "follows": False, "why": "c never changes beyond its fluctuations", "stretch_exponential_p": math.nan}
    last = changing[-1]
    piece = pieces[last]
    if not piece.is_power_law:
        return {"piece": piece, "follows": False, "why": f"|c| jumps (exponent {piece.exponent:+.1f} over steps "
                f"{piece.start:.0f}-{piece.end:.0f})", "stretch_exponential_p": math.nan}
    if piece.exponent >= 0:
        return {"piece": piece, "follows": False, "why": f"|c| rises (exponent {piece.exponent:+.2f})", "stretch_exponential_p": math.nan}
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
