"""Tests of physim.py (in the paper's order) and of reproduce.py (the machinery around it).

physim.py:
  0. The paper's numbers: the defaults and the --full preset hold Tables 1-4 (typed in here).
  1. Simulator: closed-form contact duration and restitution (Luding 2008), gravity an acceleration,
     energy conserved without damping and never created with it, initial states and boundary particles.
  2. Data: the training stream is a pure function of (seed, step) and serves true simulator pairs.
  3. Model: eq. (6) by hand, x^(0) by a loop, the residual blocks, permutation equivariance, and the
     attention's equality with nn.MultiheadAttention.
  4. Metrics: both head metrics against slow, obviously correct loop references; c needs float64.
  5. Training: Adam at Table 2's settings, the checkpoint schedule, bad configs fail one clear assertion.
  6. The model as a simulator: rollout, and the energy of a deliberately wrong model by hand.
  7. LLC: SGLD recovers known learning coefficients (regular, degenerate, restricted, and a prior that
     matters), selects exactly one head, moves only it, gives the same chains batched or alone.
  8. Power-law fits: exact fits and the stated coverage of the exponent's interval.
  9. Beyond the paper: bootstrap errors, chain health, calibration, the regime finder and the judge.
 10. The four pieces copy out: each runs alone in a fresh namespace with physim's numbers.
 11. The CUDA path on the CPU: no line of physim.py makes a host-device round trip once per step.
reproduce.py:
 12. A run's folder: CSVs, checkpoints, half-precision weights, resume (training and SGLD), the ETA.
 13. End to end on a tiny preset: resume, --report, damaged files, signals, kill -9, shards, --seeds.
 14. The analysis and each claim's verdict at its thresholds.
 15. bench and the projection.
 16. docs/tour.md: every snippet runs and prints what the page shows.

Physics tests run in float64 (fixture `float64`); everything uses tiny configs.
"""
import csv

import glob

import json

import math

import os

import shutil

from dataclasses import asdict, replace

import numpy as np

import pytest

import torch

import physim as P

import reproduce as R


@pytest.fixture(autouse=True)
def _no_projection(request, monkeypatch):
    """Runs skip the projected-time line (it times real steps, and tests count and patch steps), except in the
    end-to-end test, which checks it."""
    if request.node.originalname != "test_reproduce_end_to_end_and_resume":
        monkeypatch.setattr(R, "PROJECT_FIRST", False)


# Every tensor here is tiny: one intra-op thread is fastest and avoids OpenMP threads spinning
# against each other on a busy machine (which made the training tests ~25x slower on 2 cores).
torch.set_num_threads(1)
# On the CPU, vmap runs the fused attention once per chain (no batching rule yet), and says so.
pytestmark = pytest.mark.filterwarnings("ignore:.*batching rule:UserWarning")


# ----------------------------------------------------------------------------------------------------
# Shared fixtures and tiny configs
# ----------------------------------------------------------------------------------------------------

@pytest.fixture
def float64():
    """Run one test with float64 as the default dtype, restoring the previous default afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# scaled_io (the scaled preset's input and output scaling) lets 100 tiny steps learn visibly; the
# paper's raw input and output are tested on their own (section 3).
TINY_MODEL = P.ModelConfig(n_blocks=2, n_heads=2, embed_dim=16, scaled_io=True)


# The training run shared by the training, resume and checkpoint tests (float32, as in real use).
TRAIN_SIM = P.SimConfig(n_particles=16, n_steps=64, box_width=10.0, box_height=6.0)


TRAIN_CFG = P.TrainConfig(steps=100, batch_size=8, log_checkpoints=4, even_checkpoints=2)


TRAIN_DATA = P.DataConfig(chunk_trajectories=4, heldout_states=32, bootstrap=8)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One uninterrupted tiny training run: (run_dir, returned model)."""
    run_dir = str(tmp_path_factory.mktemp("uninterrupted"))
    model = R.train_run(run_dir, TRAIN_SIM, TINY_MODEL, TRAIN_CFG, TRAIN_DATA)
    return run_dir, model


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------------
# 0. The paper's numbers (Tables 1-4), pinned
# ----------------------------------------------------------------------------------------------------

# Typed in from the paper, not from physim: a changed default or a swapped box must fail here.
PAPER_TABLE_1 = dict(step_size=0.00075, localization=1.0, nbeta=1385.0, batch_size=256, steps=10_000,
                     burn_in=9_000, chains=8)                      # C = 8 for Fig. 1 (4 for Section D.5)


PAPER_TABLE_2 = dict(lr=0.001, weight_decay=0.0, batch_size=64, steps=64_000)    # Adam; 5 runs


PAPER_TABLE_3 = dict(n_particles=64, diameter=1.0, mass=1.0, dt=0.005, stiffness=1000.0, damping=10.0,
                     gravity=9.8, box_width=28.0, box_height=14.0, n_steps=1024)  # D = 2, v0 ~ N(0, I)


PAPER_TABLE_4 = dict(n_blocks=4, n_heads=8, embed_dim=128, boundary_radius=2.0, activation="relu")


def _fields(obj, names):
    return {name: getattr(obj, name) for name in names}


def test_defaults_and_full_preset_are_the_papers_tables():
    # Proves the config defaults, and the --full preset built from them, hold Tables 1-4 exactly
    # (box 28 wide along x, 14 high along y, gravity along -y), five runs, Adam, and Appendix D.2's
    # 1000-step rollout. The --medium preset keeps Tables 2 and 3 (the paper's training recipe and
    # physics) and changes only the model's size and its input/output scaling.
    import reproduce as R
    for sim in (P.SimConfig(), R.FULL.sim, R.MEDIUM.sim):
        assert _fields(sim, PAPER_TABLE_3) == PAPER_TABLE_3
    for model in (P.ModelConfig(), R.FULL.model):
        assert _fields(model, PAPER_TABLE_4) == PAPER_TABLE_4
    for train in (P.TrainConfig(), R.FULL.train, R.MEDIUM.train):
        assert _fields(train, PAPER_TABLE_2) == PAPER_TABLE_2
    for llc in (P.LLCConfig(), R.FULL.llc):
        assert _fields(llc, PAPER_TABLE_1) == PAPER_TABLE_1
    assert R.FULL.runs == 5 and R.FULL.rollout_steps == 1000
    assert R.MEDIUM.runs == 1 and R.MEDIUM.rollout_steps == 1000 and R.MEDIUM.sim == P.SimConfig()
    assert {k: v for k, v in asdict(R.MEDIUM.model).items() if k not in ("n_blocks", "embed_dim", "scaled_io")} \
        == {k: v for k, v in asdict(P.ModelConfig()).items() if k not in ("n_blocks", "embed_dim", "scaled_io")}
    # the box's width lies along x and gravity along -y: the walls and the gravity vector say so
    b = P.boundary_particles(P.SimConfig())
    assert float(b[:, 0].max()) == 28.0 and float(b[:, 1].max()) == 14.0
    assert P.ParticleTransformer(P.ModelConfig(), P.SimConfig()).gravity.tolist() == pytest.approx([0.0, -9.8])


# ----------------------------------------------------------------------------------------------------
# 1. Ground-truth simulator (§2, Appendix C, Table 3)
# ----------------------------------------------------------------------------------------------------

def closed_form_contact(k, gamma, reduced_mass):
    """Luding 2008: t_c = π/ω, ω = sqrt(k/m_r − η₀²), η₀ = γ/(2 m_r); e = exp(−η₀ t_c)."""
    eta0 = gamma / (2 * reduced_mass)
    omega = math.sqrt(k / reduced_mass - eta0 ** 2)
    t_c = math.pi / omega
    return t_c, math.exp(-eta0 * t_c)


# (stiffness, damping, mass, diameter): the paper's values, and a stiffer-damped, heavier, larger
# particle so that no constant 1 for mass or diameter can hide in the code.
CONTACT_PARAMS = [(1000.0, 10.0, 1.0, 1.0), (1000.0, 20.0, 2.0, 1.5)]


CONTACT_KINDS = ["pair", "left_wall", "right_wall", "floor", "ceiling"]


@pytest.mark.parametrize("k, gamma, mass, diameter", CONTACT_PARAMS)
@pytest.mark.parametrize("kind", CONTACT_KINDS)
def test_head_on_contact_matches_closed_form(float64, kind, k, gamma, mass, diameter):
    # Proves the contact force, its reduced mass (m/2 for pairs, m for walls) and the kept attractive
    # tail (contact ends when the overlap returns to 0): a single head-on contact lasts t_c and
    # leaves with restitution e within 2 %. Clamping the force at 0 would change e by > 10 %.
    dt = 2e-5
    width, height = 8 * diameter, 6 * diameter
    n_particles = 2 if kind == "pair" else 1
    cfg = P.SimConfig(n_particles=n_particles, gravity=0.0, dt=dt, stiffness=k, damping=gamma,
                      mass=mass, diameter=diameter, box_width=width, box_height=height)
    # Start just short of contact, moving into it at unit normal speed; a tangential drift of 0.3
    # (shared by both particles of a pair, so their line of centres stays along x) must survive.
    gap = 1e-3 * diameter
    r = diameter / 2
    start = {
        "pair": ([[width / 2 - r - gap / 2, height / 2], [width / 2 + r + gap / 2, height / 2]],
                 [[1.0, 0.3], [-1.0, 0.3]]),
        "left_wall": ([[r + gap, height / 2]], [[-1.0, 0.3]]),
        "right_wall": ([[width - r - gap, height / 2]], [[1.0, 0.3]]),
        "floor": ([[width / 2, r + gap]], [[0.3, -1.0]]),
        "ceiling": ([[width / 2, height - r - gap]], [[0.3, 1.0]]),
    }[kind]
    p0, v0 = torch.tensor([start[0]]), torch.tensor([start[1]])
    reduced_mass = mass / 2 if kind == "pair" else mass

    t_c, e = closed_form_contact(k, gamma, reduced_mass)
    assert P.contact_duration(cfg, reduced_mass) == pytest.approx(t_c, rel=1e-12)
    assert P.restitution(cfg, reduced_mass) == pytest.approx(e, rel=1e-12)

    ps, vs = P.simulate(p0, v0, cfg, n_steps=int(1.2 * t_c / dt) + 100)
    ps, vs = ps[0], vs[0]                                            # (T+1, N, 2)
    axis = 1 if kind in ("floor", "ceiling") else 0                  # the contact normal: x or y
    if kind == "pair":
        overlapping = (ps[:, 0] - ps[:, 1]).norm(dim=-1) < diameter
        normal_velocity = vs[:, 0, 0] - vs[:, 1, 0]                  # relative velocity along x
    else:
        coordinate = ps[:, 0, axis]
        if kind in ("left_wall", "floor"):
            overlapping = coordinate < r
        else:
            overlapping = coordinate > (width if axis == 0 else height) - r
        normal_velocity = vs[:, 0, axis]

    steps_in_contact = torch.nonzero(overlapping).flatten()
    assert len(steps_in_contact) > 0, "the particles never touched"
    # exactly one contact, and it is over at the end (no sticking, no second contact)
    assert torch.equal(steps_in_contact, torch.arange(steps_in_contact[0], steps_in_contact[-1] + 1))
    assert not overlapping[-1]

    measured_t_c = len(steps_in_contact) * dt
    measured_e = abs(float(normal_velocity[-1])) / abs(float(normal_velocity[0]))
    assert measured_t_c == pytest.approx(t_c, rel=0.02)
    assert measured_e == pytest.approx(e, rel=0.02)
    # the contact force is purely normal (frictionless): the tangential velocity is untouched
    tangential = 1 - axis
    assert torch.allclose(vs[:, :, tangential], v0[:, :, tangential], rtol=0, atol=1e-12)


def _count_contact_onsets(ps, cfg):
    """Number of new particle-particle contacts and new wall contacts along a trajectory (T+1, N, 2)."""
    dist = torch.cdist(ps, ps)
    n = ps.shape[-2]
    pair_contact = (dist < cfg.diameter) & ~torch.eye(n, dtype=torch.bool)
    pair_onsets = (pair_contact[1:] & ~pair_contact[:-1]).sum() // 2     # each pair appears twice
    r = cfg.diameter / 2
    box = torch.tensor([cfg.box_width, cfg.box_height])
    wall_contact = (ps < r) | (ps > box - r)
    wall_onsets = (wall_contact[1:] & ~wall_contact[:-1]).sum()
    return int(pair_onsets), int(wall_onsets)


def test_energy_conserved_without_damping(float64):
    # Proves contact forces and total_energy are consistent (a conservative spring, elastic energy
    # ½kδ² counted once per pair and per wall): with γ = 0 and g = 0 the total energy stays within
    # 1 % through dozens of collisions. Semi-implicit Euler conserves only a shadow energy, whose
    # difference from E is O(ω Δt) during contacts: about 0.6 % at Δt = 5e-4, ω = sqrt(2000).
    cfg = P.SimConfig(n_particles=12, gravity=0.0, damping=0.0, dt=5e-4, box_width=5.0, box_height=5.0)
    p, v = P.random_initial_state(cfg, 1, torch.Generator().manual_seed(0))
    ps, vs = P.simulate(p, v, cfg, n_steps=6000)                     # 3 time units
    energy = P.total_energy(ps, vs, cfg)[0]                          # (T+1,)

    pair_onsets, wall_onsets = _count_contact_onsets(ps[0], cfg)
    assert pair_onsets >= 30 and wall_onsets >= 10, (pair_onsets, wall_onsets)
    assert torch.all((energy / energy[0] - 1).abs() < 0.01)


def test_energy_never_rises_with_damping_and_gravity(float64):
    # Proves the dashpot (walls and pairs) only removes energy: with the paper's k, γ, g the total
    # energy never rises by more than 1e-5 of its initial value in one step (integration noise at
    # Δt = 1e-3 is ~1e-6), and after 3 time units of collisions it has dropped by more than 40 %.
    cfg = P.SimConfig(n_particles=12, dt=1e-3, box_width=5.0, box_height=5.0)
    p, v = P.random_initial_state(cfg, 1, torch.Generator().manual_seed(0))
    ps, vs = P.simulate(p, v, cfg, n_steps=3000)
    energy = P.total_energy(ps, vs, cfg)[0]

    pair_onsets, _ = _count_contact_onsets(ps[0], cfg)
    assert pair_onsets >= 20
    assert float((energy[1:] - energy[:-1]).max()) <= 1e-5 * float(energy[0])
    assert float(energy[-1]) < 0.6 * float(energy[0])


@pytest.mark.parametrize("mass", [2.0, 3.0])
def test_gravity_is_an_acceleration_and_contacts_a_force(float64, mass):
    # Proves gravity accelerates every mass by g (not g/m) and a contact force k·δ is divided by m:
    # (a) a particle in free fall follows semi-implicit Euler exactly, v_n = v_0 − n Δt g ŷ and
    # p_n = p_0 + n Δt v_0 − Δt² g n(n+1)/2 ŷ, whatever its mass; (b) one resting on the floor settles
    # at the overlap where k δ = m g, δ = m g / k (deeper for a heavier particle).
    cfg = P.SimConfig(n_particles=1, mass=mass, box_width=20.0, box_height=40.0)
    p0, v0 = torch.tensor([[[10.0, 30.0]]]), torch.tensor([[[0.7, 1.3]]])
    ps, vs = P.simulate(p0, v0, cfg, n_steps=200)                    # 1 time unit: falls ~4 d, no wall
    n = torch.arange(201, dtype=torch.float64)[:, None]
    down = torch.tensor([0.0, -cfg.gravity])
    torch.testing.assert_close(vs[0, :, 0], v0[0, 0] + n * cfg.dt * down, rtol=0, atol=1e-12)
    torch.testing.assert_close(ps[0, :, 0], p0[0, 0] + n * cfg.dt * v0[0, 0] + cfg.dt ** 2 * n * (n + 1) / 2 * down,
                               rtol=0, atol=1e-12)

    resting = P.simulate(torch.tensor([[[10.0, 0.5]]]), torch.zeros(1, 1, 2), cfg, n_steps=4000)[0][0, -1, 0]
    overlap = cfg.diameter / 2 - float(resting[1])
    assert overlap == pytest.approx(mass * cfg.gravity / cfg.stiffness, rel=1e-6)


@pytest.mark.parametrize("diameter", [1.0, 2.0])
def test_random_initial_state(float64, diameter):
    # Proves initial states are valid (no overlaps, inside the box at >= d/2 from every wall),
    # velocities are standard normal (loose check on 2048 samples), and seeding is reproducible.
    cfg = P.SimConfig(n_particles=16, diameter=diameter, box_width=10.0 * diameter,
                      box_height=6.0 * diameter)
    p, v = P.random_initial_state(cfg, 64, torch.Generator().manual_seed(1))
    assert p.shape == v.shape == (64, 16, 2)

    dist = torch.cdist(p, p) + torch.eye(16) * 1e9                   # ignore self-distances
    assert float(dist.min()) >= diameter - 1e-9
    r = diameter / 2
    assert float(p[..., 0].min()) >= r - 1e-9 and float(p[..., 0].max()) <= cfg.box_width - r + 1e-9
    assert float(p[..., 1].min()) >= r - 1e-9 and float(p[..., 1].max()) <= cfg.box_height - r + 1e-9
    # the lattice is actually used: particles spread across the box, not clumped in one corner
    assert float(p[..., 0].max() - p[..., 0].min()) > cfg.box_width / 2

    assert abs(float(v.mean())) < 0.1
    assert abs(float(v.std()) - 1.0) < 0.1

    p2, v2 = P.random_initial_state(cfg, 64, torch.Generator().manual_seed(1))
    assert torch.equal(p, p2) and torch.equal(v, v2)
    p3, _ = P.random_initial_state(cfg, 64, torch.Generator().manual_seed(2))
    assert not torch.equal(p, p3)


def test_boundary_particles_lie_on_the_walls_with_stated_spacing(float64):
    # Proves the virtual boundary particles cover all four walls, exactly on them, once each, and
    # that walking around the perimeter every step is boundary_spacing long (including corners).
    cfg = P.SimConfig(n_particles=4, box_width=5.0, box_height=3.0, boundary_spacing=0.25)
    b = P.boundary_particles(cfg)
    w, h, s = cfg.box_width, cfg.box_height, cfg.boundary_spacing
    assert b.shape == (round(2 * (w + h) / s), 2)

    on_vertical = (b[:, 0] == 0) | (b[:, 0] == w)
    on_horizontal = (b[:, 1] == 0) | (b[:, 1] == h)
    assert torch.all(on_vertical | on_horizontal)
    assert torch.all((b[:, 0] >= 0) & (b[:, 0] <= w) & (b[:, 1] >= 0) & (b[:, 1] <= h))
    for wall in (b[:, 0] == 0, b[:, 0] == w, b[:, 1] == 0, b[:, 1] == h):
        assert int(wall.sum()) > 0
    assert len(torch.unique(b, dim=0)) == len(b)

    steps = (b - b.roll(-1, 0)).norm(dim=-1)                       # consecutive, closing the loop
    assert torch.allclose(steps, torch.full_like(steps, s), atol=1e-9)


# ----------------------------------------------------------------------------------------------------
# 2. Data (Appendix C)
# ----------------------------------------------------------------------------------------------------

STREAM_SIM = P.SimConfig(n_particles=4, n_steps=8, box_width=5.0, box_height=5.0)


STREAM_DATA = P.DataConfig(chunk_trajectories=2)            # 16 pairs a chunk: 4 batches of 4


def test_training_stream_is_a_pure_function_of_seed_and_step(float64):
    # Proves batch(step) depends only on (seed, step): two fresh streams queried in different
    # orders, across a chunk boundary (steps 3 | 4), give identical batches; a chunk serves each
    # of its pairs exactly once; another seed gives other data.
    a = P.TrainingStream(STREAM_SIM, STREAM_DATA, batch_size=4, seed=3)
    b = P.TrainingStream(STREAM_SIM, STREAM_DATA, batch_size=4, seed=3)
    assert a.batches_per_chunk == 4
    steps = [0, 1, 2, 3, 4, 5, 8]
    in_order = {s: a.batch(s) for s in steps}
    shuffled = {s: b.batch(s) for s in reversed(steps)}
    for s in steps:
        assert torch.equal(in_order[s][0], shuffled[s][0]) and torch.equal(in_order[s][1], shuffled[s][1])

    first_chunk = torch.cat([in_order[s][0] for s in range(4)])      # (16, N, 4)
    assert len(torch.unique(first_chunk.flatten(1), dim=0)) == 16    # no pair served twice
    assert not torch.equal(in_order[0][0], in_order[4][0])           # next chunk holds new data

    other_seed = P.TrainingStream(STREAM_SIM, STREAM_DATA, batch_size=4, seed=4)
    assert not torch.equal(other_seed.batch(0)[0], in_order[0][0])


def test_heldout_states_are_independent_pairs_over_the_data(float64):
    # Proves the metric states are one state per held-out trajectory (no two from one trajectory: their
    # initial conditions differ), at times spread over the trajectory, each with its true successor,
    # and that the set is fixed: the same call gives the same states.
    sim = P.SimConfig(n_particles=4, n_steps=40, box_width=5.0, box_height=5.0)
    data = P.DataConfig(heldout_states=40)
    x, y = P.heldout_set(sim, data)
    assert x.shape == y.shape == (40, 4, 4)
    ps, vs = P.simulate(x[..., :2], x[..., 2:], sim, n_steps=1)
    torch.testing.assert_close(torch.cat([ps[:, 1], vs[:, 1]], -1), y, rtol=0, atol=1e-12)
    x2, _ = P.heldout_set(sim, data)
    assert torch.equal(x, x2)
    # every state is a time step of its own trajectory: replay the 40 trajectories and find each state
    g = torch.Generator().manual_seed(P.HELDOUT_SEED)
    times = torch.randint(sim.n_steps, (40,), generator=g)
    trajectories = torch.cat([P.simulate_states(sim, 32, P.HELDOUT_SEED, n_steps=sim.n_steps),
                              P.simulate_states(sim, 8, P.HELDOUT_SEED + 32, n_steps=sim.n_steps)])
    torch.testing.assert_close(x, trajectories[torch.arange(40), times], rtol=0, atol=1e-12)
    assert len(torch.unique(trajectories[:, 0].flatten(1), dim=0)) == 40           # 40 distinct trajectories
    assert times.float().std() > sim.n_steps / 5                                   # spread over time


def test_training_pairs_are_consecutive_simulator_states(float64):
    # Proves y is one simulator step from x (not some other time offset or trajectory).
    stream = P.TrainingStream(STREAM_SIM, STREAM_DATA, batch_size=4, seed=3)
    for step in (0, 5):
        x, y = stream.batch(step)
        assert x.shape == y.shape == (4, 4, 4)
        ps, vs = P.simulate(x[..., :2], x[..., 2:], STREAM_SIM, n_steps=1)
        assert torch.allclose(torch.cat([ps[:, 1], vs[:, 1]], -1), y, rtol=0, atol=1e-12)
        assert not torch.allclose(x, y)


# ----------------------------------------------------------------------------------------------------
# 3. The particle transformer (Appendix C.1)
# ----------------------------------------------------------------------------------------------------

def _tiny_model_and_state(n_particles=6, batch=2, seed=0):
    sim = P.SimConfig(n_particles=n_particles, box_width=5.0, box_height=5.0)
    torch.manual_seed(seed)
    model = P.ParticleTransformer(TINY_MODEL, sim).eval()
    p, v = P.random_initial_state(sim, batch, torch.Generator().manual_seed(seed))
    return model, torch.cat([p, v], -1)


def test_model_is_permutation_equivariant(float64):
    # Proves particles are treated as a set: permuting the input permutes the prediction, and the
    # attention of every head is permuted in both the query and key index, the zero slot staying last.
    model, x = _tiny_model_and_state()
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        y, attn = model(x, return_attention=True)
        y_perm, attn_perm = model(x[:, perm], return_attention=True)
    assert torch.allclose(y_perm, y[:, perm], atol=1e-10)
    key_perm = torch.cat([perm, torch.tensor([6])])                  # zero slot (index N) stays last
    expected = attn[..., perm, :][..., key_perm]
    assert torch.allclose(attn_perm, expected, atol=1e-10)
    assert not torch.allclose(attn_perm, attn, atol=1e-3)           # the permutation did something


def test_forward_is_eq_6_semi_implicit_euler(float64):
    # Proves the model's update is eq. (6), v' = v + Δt (a + g), p' = p + Δt v' (semi-implicit, with g
    # along −y): with the unembedding zeroed (a = 0) the model is exact free fall, written out by hand;
    # with it trained-like (random), the same update applies to the model's own acceleration a.
    model, x = _tiny_model_and_state(n_particles=5, batch=3)
    p, v = x[..., :2], x[..., 2:]
    seen = []
    model.unembed.register_forward_hook(lambda module, inputs, output: seen.append(output))
    with torch.no_grad():
        model(x)
        a = model.out_scale * seen[0]                                # the model's acceleration (B, N, 2), not zero
        assert a.abs().max() > 1e-3
        v_next = v + model.sim.dt * (a + torch.tensor([0.0, -9.8]))
        torch.testing.assert_close(model(x), torch.cat([p + model.sim.dt * v_next, v_next], -1), rtol=0, atol=1e-12)
        model.unembed.weight.zero_()
        model.unembed.bias.zero_()
        v_fall = v + 0.005 * torch.tensor([0.0, -9.8])
        torch.testing.assert_close(model(x), torch.cat([p + 0.005 * v_fall, v_fall], -1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("scaled_io", [False, True])
def test_embedding_is_particle_mlp_plus_masked_boundary_sum(float64, scaled_io):
    # Proves x_i^(0) = x'_i + Σ_j 1(|p_i − b_j| < r) [W_b2 σ(W_b1 b_j + c_b1) + c_b2] (Appendix C.1) by a
    # loop over particles and boundary particles, on states with particles near walls and corners
    # (some boundary particles inside the radius, some not) and with r = 2 from Table 4. The MLPs see
    # the raw p, v and b_j (the paper), or (p − box centre)/7, v/3, (b_j − box centre)/7 with scaled_io;
    # the radial mask always uses the raw distance.
    sim = P.SimConfig(n_particles=6, box_width=5.0, box_height=5.0)
    torch.manual_seed(0)
    model = P.ParticleTransformer(P.ModelConfig(n_blocks=2, n_heads=2, embed_dim=16, scaled_io=scaled_io), sim).eval()
    p, v = P.random_initial_state(sim, 2, torch.Generator().manual_seed(0))
    x = torch.cat([p, v], -1)
    centre, pos, vel = (torch.tensor([2.5, 2.5]), 7.0, 3.0) if scaled_io else (torch.zeros(2), 1.0, 1.0)
    with torch.no_grad():
        got = model.embedding(x)                                     # (B, N, E)
        for b in range(x.shape[0]):
            for i in range(x.shape[1]):
                p, v = x[b, i, :2], x[b, i, 2:]
                expected = model.embed(torch.cat([(p - centre) / pos, v / vel]))
                inside = 0
                for boundary in model.boundary:
                    if float((p - boundary).norm()) < 2.0:
                        expected = expected + model.boundary_embed((boundary - centre) / pos)
                        inside += 1
                assert 0 < inside < len(model.boundary)
                torch.testing.assert_close(got[b, i], expected, rtol=0, atol=1e-10)


def test_blocks_add_attention_and_mlp_to_the_residual_stream(float64):
    # Proves each block is x + MHA(LN x), then + MLP(LN x) (Fig. 4), and that attention matters: with
    # every block's attention output zeroed, the model predicts something else.
    model, x = _tiny_model_and_state(n_particles=5, batch=2)
    with torch.no_grad():
        h = model.embedding(x)
        for block in model.blocks:
            mid = h + block.attn(block.ln_attn(h))[0]
            expected = mid + block.mlp(block.ln_mlp(mid))
            torch.testing.assert_close(block(h)[0], expected, rtol=0, atol=1e-12)
            h = expected
        y = model(x)
        for block in model.blocks:
            block.attn.out_proj.weight.zero_()
            block.attn.out_proj.bias.zero_()
        assert (model(x) - y).abs().max() > 1e-6


def test_attention_equals_pytorch_multihead_attention():
    # Proves ParticleAttention is nn.MultiheadAttention with add_zero_attn and a self-mask, in the
    # same parameter layout (head_parameters relies on it), and that its attention weights are MHA's.
    torch.manual_seed(0)
    ours = P.ParticleAttention(16, 4)
    mha = torch.nn.MultiheadAttention(16, 4, add_zero_attn=True, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(ours.in_proj.weight)
        mha.in_proj_bias.copy_(ours.in_proj.bias)
        mha.out_proj.weight.copy_(ours.out_proj.weight)
        mha.out_proj.bias.copy_(ours.out_proj.bias)
    x = torch.randn(3, 7, 16)
    self_mask = torch.eye(7, dtype=torch.bool)
    expected, expected_attn = mha(x, x, x, attn_mask=self_mask, need_weights=True, average_attn_weights=False)
    out, attn = ours(x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(attn, expected_attn)                                # (B, H, N, N+1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_fused_attention_equals_the_explicit_one(dtype, device):
    # Proves the fast path (F.scaled_dot_product_attention with the zero key/value appended and the
    # self-pairs masked) is the explicit attention: the same outputs and the same gradients of every
    # parameter and of the input, to float tolerance, for one block and for the whole model.
    torch.manual_seed(0)
    attn = P.ParticleAttention(16, 4).to(device, dtype)
    x = torch.randn(3, 7, 16, device=device, dtype=dtype, requires_grad=True)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    outputs, grads = [], []
    for need_weights in (True, False):
        out, weights = attn(x, need_weights)
        assert (weights is None) == (not need_weights)
        outputs.append(out)
        grads.append(torch.autograd.grad(out.pow(2).sum(), [x, *attn.parameters()]))
    torch.testing.assert_close(outputs[1], outputs[0], **tol)
    for fused, explicit in zip(grads[1], grads[0]):
        torch.testing.assert_close(fused, explicit, **tol)

    model, state = _tiny_model_and_state(n_particles=6, batch=2)
    model = model.to(device, dtype)
    state = state.to(device, dtype)
    explicit_out = model(state, return_attention=True)[0]
    fused_out = model(state)
    torch.testing.assert_close(fused_out, explicit_out, **tol)
    g_explicit = torch.autograd.grad(explicit_out.pow(2).sum(), list(model.parameters()))
    g_fused = torch.autograd.grad(fused_out.pow(2).sum(), list(model.parameters()))
    for a, b in zip(g_fused, g_explicit):
        torch.testing.assert_close(a, b, **tol)


def test_attention_is_initialised_as_pytorch_multihead_attention():
    # Proves the initialisation Appendix C.1 points to: from the same seed, ParticleAttention's weights
    # are nn.MultiheadAttention's, bit for bit (xavier-uniform fused in-projection, nn.Linear's default
    # out-projection, both biases zero), and the in-projection is not nn.Linear's default (its entries
    # exceed that default's bound 1/sqrt(E), as xavier's bound sqrt(6 / (E + 3E)) = 1.22/sqrt(E) allows).
    for E, H in ((16, 4), (128, 8)):
        torch.manual_seed(0)
        ours = P.ParticleAttention(E, H)
        torch.manual_seed(0)
        mha = torch.nn.MultiheadAttention(E, H, add_zero_attn=True, batch_first=True)
        assert torch.equal(ours.in_proj.weight, mha.in_proj_weight)
        assert torch.equal(ours.out_proj.weight, mha.out_proj.weight)
        assert torch.equal(ours.in_proj.bias, torch.zeros(3 * E)) and torch.equal(ours.out_proj.bias, torch.zeros(E))
        assert float(ours.in_proj.weight.detach().abs().max()) > 1.1 / math.sqrt(E)


def test_attention_shape_normalisation_and_self_mask():
    # Proves the attention is (L, B, H, N, N+1), every row (zero slot included) sums to 1, a particle
    # never attends to itself, and the zero slot really takes some mass.
    model, x = _tiny_model_and_state(n_particles=5, batch=3)
    with torch.no_grad():
        _, attn = model(x, return_attention=True)
    L, H, N = TINY_MODEL.n_blocks, TINY_MODEL.n_heads, 5
    assert attn.shape == (L, 3, H, N, N + 1)
    assert torch.allclose(attn.sum(-1), torch.ones(L, 3, H, N), atol=1e-6)
    assert torch.all(attn[..., torch.arange(N), torch.arange(N)] == 0)
    assert torch.all(attn[..., N] > 0)
    assert torch.all(attn >= 0)


# ----------------------------------------------------------------------------------------------------
# 4. Attention-head metrics (§2.2)
# ----------------------------------------------------------------------------------------------------

def reference_collision_score(attn, positions, radius=P.COLLISION_RADIUS, skip_isolated=True):
    """Loop reference: mean over (state, query with a neighbour within radius) of the attention that
    query gives to its neighbours. attn (L, S, H, N, N+1), positions (S, N, 2) -> (L, H)."""
    L, S, H, N, _ = attn.shape
    scores = np.zeros((L, H))
    for l in range(L):
        for h in range(H):
            total, count = 0.0, 0
            for s in range(S):
                for i in range(N):
                    neighbours = [j for j in range(N) if j != i
                                  and np.linalg.norm(positions[s, i] - positions[s, j]) < radius]
                    if not neighbours and skip_isolated:
                        continue
                    total += sum(attn[l, s, h, i, j] for j in neighbours)
                    count += 1
            scores[l, h] = total / count
    return scores


def reference_correlation(attn, positions):
    """Loop reference: for each pair i != j the correlation over states of d_ij and α_ij, averaged
    over the pairs (pairs with constant attention are skipped). (L, S, H, N, N+1) -> (L, H)."""
    L, S, H, N, _ = attn.shape
    dist = np.linalg.norm(positions[:, :, None] - positions[:, None], axis=-1)   # (S, N, N)
    result = np.zeros((L, H))
    for l in range(L):
        for h in range(H):
            corrs = []
            for i in range(N):
                for j in range(N):
                    if i != j and np.std(attn[l, :, h, i, j]) > 0:
                        corrs.append(np.corrcoef(dist[:, i, j], attn[l, :, h, i, j])[0, 1])
            result[l, h] = np.mean(corrs)
    return result


def _random_metric_inputs(seed=0, L=2, S=12, H=3, N=7):
    """Random positions in a 4 x 4 box (some pairs touching, some particles isolated) and random
    attention rows: softmax over N + 1 slots with the self slot at exactly 0."""
    g = torch.Generator().manual_seed(seed)
    positions = torch.rand(S, N, 2, generator=g, dtype=torch.float64) * 4
    logits = torch.randn(L, S, H, N, N + 1, generator=g, dtype=torch.float64) * 2
    logits[..., torch.arange(N), torch.arange(N)] = float("-inf")
    return logits.softmax(-1), positions


def test_metrics_agree_with_loop_references():
    # Proves both vectorised metrics equal the slow references, including the rule that queries
    # without any neighbour within the radius are left out of the collision score.
    attn, positions = _random_metric_inputs()
    dist = torch.cdist(positions, positions) + torch.eye(positions.shape[1]) * 1e9   # no self pairs
    has_near = (dist < P.COLLISION_RADIUS).any(-1)
    assert has_near.any() and not has_near.all()                     # both kinds of queries occur

    a, pos = attn.numpy(), positions.numpy()
    expected_score = reference_collision_score(a, pos)
    # the input is one where leaving isolated queries out matters
    assert np.abs(expected_score - reference_collision_score(a, pos, skip_isolated=False)).min() > 1e-3
    assert np.allclose(P.collision_detection_score(attn, positions).numpy(), expected_score,
                       rtol=0, atol=1e-12)
    before = attn.clone()
    assert np.allclose(P.attention_distance_correlation(attn, positions).numpy(),
                       reference_correlation(a, pos), rtol=0, atol=1e-12)
    assert torch.equal(attn, before)                                   # the input is left as it was


def test_collision_score_extremes():
    # Proves the score's range: all mass on touching particles scores 1 (isolated queries put theirs
    # on the zero slot and are left out), all mass on the zero slot scores 0.
    _, positions = _random_metric_inputs()
    S, N = positions.shape[:2]
    dist = torch.cdist(positions, positions)
    near = ((dist < P.COLLISION_RADIUS) & ~torch.eye(N, dtype=torch.bool)).to(torch.float64)
    n_near = near.sum(-1, keepdim=True)                               # (S, N, 1)
    on_neighbours = torch.where(n_near > 0, near / n_near.clamp(min=1), 0.0)
    zero_slot = (n_near == 0).to(torch.float64)
    attn = torch.cat([on_neighbours, zero_slot], -1)[:, None]        # (S, H=1, N, N+1)
    assert torch.allclose(attn.sum(-1), torch.ones(S, 1, N, dtype=torch.float64))
    assert float(P.collision_detection_score(attn, positions)) == pytest.approx(1.0, abs=1e-12)

    all_on_zero_slot = torch.zeros(S, 1, N, N + 1, dtype=torch.float64)
    all_on_zero_slot[..., N] = 1.0
    assert float(P.collision_detection_score(all_on_zero_slot, positions)) == 0.0


def test_correlation_is_per_pair_then_averaged():
    # Proves c(w) averages per-pair correlations over states rather than pooling all pairs: three
    # particles jitter around fixed spots, so each pair has its own typical distance; the attention
    # is an increasing linear function of distance for every pair (each per-pair correlation is +1)
    # but with pair offsets that fall with the typical distance, so the pooled correlation is < 0.
    g = torch.Generator().manual_seed(0)
    S, N = 8, 3
    spots = torch.tensor([[0.5, 1.0], [2.0, 1.0], [4.5, 1.0]], dtype=torch.float64)
    positions = spots + (torch.rand(S, N, 2, generator=g, dtype=torch.float64) - 0.5) * 0.6
    dist = torch.cdist(positions, positions)                          # (S, N, N)
    alpha = 0.45 - 0.1 * dist.mean(0, keepdim=True) + 0.02 * dist
    alpha = alpha.masked_fill(torch.eye(N, dtype=torch.bool), 0.0)
    assert torch.all(alpha >= 0) and torch.all(alpha.sum(-1) <= 1)
    attn = torch.cat([alpha, 1 - alpha.sum(-1, keepdim=True)], -1)[:, None]   # (S, H=1, N, N+1)

    off_diagonal = ~torch.eye(N, dtype=torch.bool)
    pooled = np.corrcoef(dist[:, off_diagonal].flatten().numpy(), alpha[:, off_diagonal].flatten().numpy())[0, 1]
    assert pooled < 0                                                 # the two definitions differ here
    assert float(P.attention_distance_correlation(attn, positions)) == pytest.approx(1.0, abs=1e-9)


def test_correlation_of_a_sharp_head_needs_float64():
    # Proves why c(w) is computed in float64: a sharp head gives far pairs attention ~1e-25 (here
    # rising with distance, so their true correlation is +1), whose squared deviations (~1e-52)
    # underflow float32 to 0. The same formula in float32 then divides by a zero std and gets c wrong;
    # attention_distance_correlation, fed the same float32 weights, matches the float64 loop reference.
    attn, positions = _random_metric_inputs(L=1, H=1)
    N = positions.shape[1]
    index = torch.arange(N)
    far = (index[:, None] - index[None, :]).abs() >= 3                # the same pairs in every state
    dist = torch.cdist(positions, positions)                          # (S, N, N)
    alpha = torch.where(far, 1e-25 * (1 + dist / 10), attn[0, :, 0, :, :N])
    attn32 = torch.cat([alpha, 1 - alpha.sum(-1, keepdim=True)], -1)[None, :, None].float()   # (1, S, 1, N, N+1)
    assert 0 < float(attn32[..., :N][attn32[..., :N] > 0].min()) < 1e-24

    expected = reference_correlation(attn32.double().numpy(), positions.numpy())
    got = P.attention_distance_correlation(attn32, positions.float())
    assert np.allclose(got.numpy(), expected, rtol=0, atol=1e-5)
    d = dist.float().unsqueeze(-3)                                    # the same formula, kept in float32
    a = attn32[..., :N]
    dc, ac = d - d.mean(-4, keepdim=True), a - a.mean(-4, keepdim=True)
    corr32 = (dc * ac).mean(-4) / (dc.pow(2).mean(-4).sqrt() * ac.pow(2).mean(-4).sqrt())
    c32 = corr32.masked_fill(torch.eye(N, dtype=torch.bool), float("nan")).nanmean((-1, -2))
    assert not np.isclose(float(c32), expected[0, 0], atol=0.05), (float(c32), expected[0, 0])


# ----------------------------------------------------------------------------------------------------
# 5. Training (Table 2) and the configs
# ----------------------------------------------------------------------------------------------------

def test_training_uses_adam_at_the_configured_rate(trained_run):
    # Proves train() steps with Table 2's optimiser: Adam (second moments, no decoupled decay, no
    # AMSGrad) at TrainConfig's lr and weight decay, as its checkpoint records.
    run_dir, _ = trained_run
    optimizer = R.load_latest_checkpoint(run_dir)["optimizer"]
    group = optimizer["param_groups"][0]
    assert group["lr"] == TRAIN_CFG.lr and group["weight_decay"] == TRAIN_CFG.weight_decay == 0.0
    assert not group["decoupled_weight_decay"] and not group["amsgrad"]
    assert tuple(group["betas"]) == (0.9, 0.999)
    assert all({"exp_avg", "exp_avg_sq"} <= set(state) for state in optimizer["state"].values())


def test_checkpoint_steps_schedule():
    # Proves the schedule holds 0 and the last step, is sorted and unique, is dense early (log
    # spacing: no gap wider than the log ratio allows) and evenly spaced late (every multiple of
    # steps / even_checkpoints is present).
    cfg = P.TrainConfig(steps=64_000, log_checkpoints=64, even_checkpoints=250)
    steps = P.checkpoint_steps(cfg)
    assert steps[0] == 0 and steps[-1] == cfg.steps
    assert steps == sorted(set(steps))
    assert all(isinstance(s, int) for s in steps)

    even_spacing = cfg.steps // cfg.even_checkpoints                 # 256
    assert set(range(0, cfg.steps + 1, even_spacing)) <= set(steps)
    log_ratio = cfg.steps ** (1 / (cfg.log_checkpoints - 1))         # ~1.19
    for a, b in zip(steps[1:], steps[2:]):
        assert b <= max(a * log_ratio, a + even_spacing) + 1, (a, b)
    assert sum(1 <= s <= 100 for s in steps) >= 15                   # dense early
    assert steps[1:4] == [1, 2, 3]


BAD_ARGUMENTS = [  # (what is wrong, the call, what the error message must say)
    ("zero mass", lambda: P.SimConfig(mass=0.0), "mass must be positive"),
    ("negative mass", lambda: P.SimConfig(mass=-1.0), "mass must be positive"),
    ("zero diameter", lambda: P.SimConfig(diameter=0.0), "diameter must be positive"),
    ("negative box width", lambda: P.SimConfig(box_width=-5.0), "box_width must be positive"),
    ("zero box height", lambda: P.SimConfig(box_height=0.0), "box_height must be positive"),
    ("no particles", lambda: P.SimConfig(n_particles=0), "n_particles must be positive"),
    ("dt 10x the paper's", lambda: P.SimConfig(dt=0.05), "dt=0.05 is too coarse"),
    ("< 10 steps a contact", lambda: P.SimConfig(dt=0.01), "dt=0.01 is too coarse: a contact lasts"),
    ("negative damping", lambda: P.SimConfig(damping=-1.0), "damping and gravity must be >= 0"),
    ("negative gravity", lambda: P.SimConfig(gravity=-9.8), "damping and gravity must be >= 0"),
    ("too many particles", lambda: P.random_initial_state(P.SimConfig(n_particles=500), 1), "do not fit"),
    ("too small a box", lambda: P.random_initial_state(P.SimConfig(n_particles=17, box_width=5.0, box_height=5.0), 1), "do not fit"),
    ("heads do not divide E", lambda: P.ModelConfig(embed_dim=10, n_heads=4), "divisible by n_heads"),
    ("unknown activation", lambda: P.ModelConfig(activation="swish"), "activation must be one of"),
    ("no blocks", lambda: P.ModelConfig(n_blocks=0), "sizes must be positive"),
    ("no training steps", lambda: P.TrainConfig(steps=0), "sizes must be positive"),
    ("negative weight decay", lambda: P.TrainConfig(weight_decay=-0.1), "weight_decay must be >= 0"),
    ("empty data chunk", lambda: P.TrainingStream(STREAM_SIM, P.DataConfig(chunk_trajectories=0), batch_size=8, seed=0), "at least one batch"),
    ("empty batch of states", lambda: P.random_initial_state(P.SimConfig(), 0), "batch must be positive"),
    ("batch larger than a chunk",
     lambda: P.TrainingStream(STREAM_SIM, P.DataConfig(chunk_trajectories=1), batch_size=9, seed=0), "at least one batch"),
    ("simulate without batch dim",
     lambda: P.simulate(torch.zeros(3, 2), torch.zeros(3, 2), STREAM_SIM, 1), "expects p and v of shape"),
    ("simulate p, v mismatch",
     lambda: P.simulate(torch.zeros(1, 3, 2), torch.zeros(1, 4, 2), STREAM_SIM, 1), "expects p and v of shape"),
    ("simulate 3-d positions",
     lambda: P.simulate(torch.zeros(1, 3, 3), torch.zeros(1, 3, 3), STREAM_SIM, 1), "expects p and v of shape"),
]


@pytest.mark.parametrize("make, match", [pytest.param(make, match, id=name) for name, make, match in BAD_ARGUMENTS])
def test_bad_configs_and_arguments_fail_one_clear_assertion(make, match):
    # Proves each bad config or argument is caught up front by an assertion naming the problem.
    with pytest.raises(AssertionError, match=match):
        make()


def test_overdamped_contacts_are_rejected():
    # Proves SimConfig refuses damping at or above critical for a particle pair (γ² >= 4 k m_r with
    # m_r = m/2, i.e. γ >= sqrt(2 k m) ≈ 44.7 for the paper's k and m). There the closed forms have
    # no real ω (contact_duration fails with a bare "math domain error") and, with the attractive
    # tail kept, the overlap only decays towards 0: touching particles never separate again.
    with pytest.raises(AssertionError, match="damping"):
        P.SimConfig(damping=50.0)


# ----------------------------------------------------------------------------------------------------
# 6. The model as a simulator (Appendix D.2)
# ----------------------------------------------------------------------------------------------------

def test_rollout_applies_the_model_to_its_own_output():
    # Proves rollout returns (B, T+1, N, 4), starts at x0 and chains the model's one-step predictions.
    model, x0 = _tiny_model_and_state(n_particles=4, batch=2)
    xs = P.rollout(model, x0, n_steps=3)
    assert xs.shape == (2, 4, 4, 4)
    assert torch.equal(xs[:, 0], x0)
    with torch.no_grad():
        assert torch.allclose(xs[:, 2], model(model(x0)), atol=1e-6)


def test_evaluate_simulator_keys_and_lengths():
    # Proves evaluate_simulator returns per-step lists of length n_steps + 1 (errors start at 0, the
    # truth's energy is the simulator's) and a scalar one-step error, on an untrained tiny model.
    sim = P.SimConfig(n_particles=4, n_steps=8, box_width=5.0, box_height=5.0)
    torch.manual_seed(0)
    model = P.ParticleTransformer(TINY_MODEL, sim)
    result = P.evaluate_simulator(model, n_states=2, n_steps=5, seed=7)
    assert set(result) == {"energy_true", "energy_model", "rollout_position_error", "one_step_position_error"}
    for key in ("energy_true", "energy_model", "rollout_position_error"):
        assert len(result[key]) == 6, key
    assert result["rollout_position_error"][0] == 0.0
    assert result["rollout_position_error"][-1] > 0.0
    assert isinstance(result["one_step_position_error"], float) and result["one_step_position_error"] > 0

    truth = P.simulate_states(sim, 2, seed=7)[:, :6]
    expected_energy = P.total_energy(truth[..., :2], truth[..., 2:], sim).mean(0)
    assert np.allclose(result["energy_true"], expected_energy.numpy(), rtol=1e-6)


def _energy_by_hand(p, v, cfg):
    """Total energy of one state (N, 2) by loops in numpy: ½ m |v|² + m g y, plus ½ k δ² for every
    overlapping pair (once) and every wall a particle overlaps."""
    p, v = np.asarray(p, dtype=np.float64), np.asarray(v, dtype=np.float64)
    r, energy = cfg.diameter / 2, 0.0
    for i in range(len(p)):
        energy += 0.5 * cfg.mass * (v[i] @ v[i]) + cfg.mass * cfg.gravity * p[i, 1]
        for j in range(i + 1, len(p)):
            energy += 0.5 * cfg.stiffness * max(0.0, cfg.diameter - np.linalg.norm(p[i] - p[j])) ** 2
        for depth in (r - p[i, 0], p[i, 0] - (cfg.box_width - r), r - p[i, 1], p[i, 1] - (cfg.box_height - r)):
            energy += 0.5 * cfg.stiffness * max(0.0, depth) ** 2
    return energy


def test_evaluate_simulator_energy_of_a_wrong_model_matches_a_hand_computation(float64):
    # Proves Fig. 7's model curve is the energy of the model's own rollout: a model that predicts no
    # contact acceleration (unembedding zeroed) falls freely, through the floor and other particles,
    # and evaluate_simulator's energy_model equals the energy of the closed-form free fall
    # p_n = p_0 + n Δt v_0 − Δt² g n(n+1)/2 ŷ, v_n = v_0 − n Δt g ŷ computed by hand (it grows:
    # the particles sink ever deeper into the floor), while energy_true stays the simulator's.
    sim = P.SimConfig(n_particles=4, n_steps=8, box_width=5.0, box_height=5.0)
    torch.manual_seed(0)
    model = P.ParticleTransformer(TINY_MODEL, sim)
    with torch.no_grad():
        model.unembed.weight.zero_()
        model.unembed.bias.zero_()
    n_steps = 150
    result = P.evaluate_simulator(model, n_states=2, n_steps=n_steps, seed=7)
    x0 = P.simulate_states(sim, 2, seed=7, n_steps=0)[:, 0]           # the same initial states (B, N, 4)
    down = np.array([0.0, -sim.gravity])
    expected = []
    for n in range(n_steps + 1):
        energies = []
        for b in range(2):
            p0, v0 = x0[b, :, :2].numpy(), x0[b, :, 2:].numpy()
            p = p0 + n * sim.dt * v0 + sim.dt ** 2 * n * (n + 1) / 2 * down
            energies.append(_energy_by_hand(p, v0 + n * sim.dt * down, sim))
        expected.append(np.mean(energies))
    assert np.allclose(result["energy_model"], expected, rtol=1e-9)
    assert expected[-1] > 2 * expected[0]                              # the wrong model gains energy
    assert result["energy_true"][-1] < result["energy_true"][0]        # the truth loses it


def test_evaluate_simulator_honours_n_steps_beyond_trajectory_length():
    # Proves a rollout of n_steps is compared with n_steps of truth even when n_steps exceeds the
    # training trajectory length sim.n_steps (the default n_steps=1000 is used with any sim).
    sim = P.SimConfig(n_particles=4, n_steps=3, box_width=5.0, box_height=5.0)
    torch.manual_seed(0)
    model = P.ParticleTransformer(TINY_MODEL, sim)
    result = P.evaluate_simulator(model, n_states=2, n_steps=5, seed=7)
    assert len(result["rollout_position_error"]) == 6


# ----------------------------------------------------------------------------------------------------
# 7. The local learning coefficient by SGLD (Appendix B)
# ----------------------------------------------------------------------------------------------------

class PowerLoss(torch.nn.Module):
    """A 'model' whose loss is known in closed form: L(w) = Σ_i a_i |w_i − c_i|^{k_i}, minimum at c
    (default 0), starting at w₀ (default c). Its output is that loss for every sample (the inputs are
    ignored), so criterion = mean. Near c the learning coefficient is λ = Σ_i 1/k_i (1/2 per quadratic
    coordinate, 1/4 per quartic)."""

    def __init__(self, coef, powers, w0=None, centre=None):
        super().__init__()
        centre = torch.zeros(len(coef)) if centre is None else torch.tensor(centre)
        self.w = torch.nn.Parameter(centre.clone() if w0 is None else torch.tensor(w0))
        self.register_buffer("centre", centre)
        self.register_buffer("coef", torch.tensor(coef))
        self.register_buffer("powers", torch.tensor(powers))

    def forward(self, x):
        return (self.coef * (self.w - self.centre).abs() ** self.powers).sum() + 0 * x[:, 0]


def _mean_criterion(output, target):
    return output.mean()


DUMMY_DATA = P.dataset_batches(torch.zeros(8, 1), torch.zeros(8), batch_size=2)


# Hyperparameters named by the tests: nβ large against γ (the prior shifts λ̂ by ~γ/(nβ·curvature)),
# ε small against 1/(nβ·curvature) (SGLD's discretisation bias is ~ε·nβ·curvature/4). Chains are many
# and cheap (a scalar model): enough that each test's tolerance is ~3-5 standard errors of λ̂. Measured
# on disjoint seeds (chain c uses seed + c): regular +1.0 ... +2.6 % (se 0.9 %; seeds 0, 1000, ..., 4000),
# quartic −2.2 ... +0.3 % (se 1.5 %), mixed −1.1 ... +0.5 % (se 1.6 %) (seeds 0, 1000, 2000), against
# tolerances of 5 %.
REGULAR = P.LLCConfig(step_size=2e-5, localization=1.0, nbeta=1000.0, steps=3000, burn_in=500, chains=128)


QUARTIC = P.LLCConfig(step_size=1e-4, localization=1.0, nbeta=2000.0, steps=6000, burn_in=1000, chains=256)


# With a quadratic coordinate present ε must also be small against 1/(2nβ): a slower, longer run.
MIXED = P.LLCConfig(step_size=2e-5, localization=1.0, nbeta=1000.0, steps=10_000, burn_in=2000, chains=128)


def test_llc_regular_quadratic_is_half_the_dimension(float64):
    # Proves the estimator recovers λ = d/2 for a non-degenerate minimum, L(w) = Σ a_i w_i², d = 4.
    model = PowerLoss([1.0, 0.5, 2.0, 1.5], [2.0, 2.0, 2.0, 2.0])
    result = P.estimate_llc(model, _mean_criterion, DUMMY_DATA, {"w": None}, REGULAR)
    assert P.llc_health(result).count("healthy") >= 0.97 * REGULAR.chains, P.llc_health(result)      # verdicts' false alarms ~1 %
    assert abs(result.llc - 2.0) < 0.05 * 2.0, result.llc


def test_llc_prior_is_gamma_times_w_minus_w0(float64):
    # Proves eq. (5)'s localising term is +γ(w − w₀) around w₀ and that the loss is evaluated at w, on
    # L(w) = Σ a_i (w_i − c_i)² with w₀ = c ≠ 0 and γ as large as nβ·a (so the prior is no rounding
    # error). Closed form: for u = w − c, eq. (5) reads u' = (1 − ε P_i / 2) u + √ε ξ with precision
    # P_i = γ + 2 nβ a_i, a linear recursion whose stationary variance solves Var = (1 − ε P_i/2)² Var + ε:
    #     Var_i = 1 / (P_i (1 − ε P_i / 4)),   so   E[λ̂] = nβ Σ a_i Var_i = nβ Σ a_i / (P_i (1 − ε P_i / 4)),
    # which tends to nβ Σ a_i / (γ + 2 nβ a_i) as ε → 0 (= d/2 only when γ << nβ a). Here E[λ̂] = 1.497,
    # against 2.135 with the γ term dropped, a random walk with its sign flipped, and a drift to
    # (2nβ a c)/P ≠ c (λ̂ ~ 10² larger) with the prior centred at 0 or the loss taken at w − w₀.
    a, c = [1.0, 0.5, 2.0, 1.5], [1.5, -2.0, 0.7, 3.0]
    cfg = P.LLCConfig(step_size=1e-3, localization=100.0, nbeta=100.0, steps=4200, burn_in=200, chains=16)
    precision = cfg.localization + 2 * cfg.nbeta * torch.tensor(a)
    expected = float(cfg.nbeta * (torch.tensor(a) / (precision * (1 - cfg.step_size * precision / 4))).sum())
    assert expected == pytest.approx(1.497, abs=1e-3)
    result = P.estimate_llc(PowerLoss(a, [2.0] * 4, centre=c), _mean_criterion, DUMMY_DATA, {"w": None}, cfg)
    assert abs(result.llc - expected) < 0.03 * expected, (result.llc, expected)      # standard error 0.7 %


@pytest.mark.parametrize("powers, expected, cfg", [([4.0], 0.25, QUARTIC), ([2.0, 4.0], 0.75, MIXED)])
def test_llc_degenerate_minima(float64, powers, expected, cfg):
    # Proves the estimator sees degeneracy: L = w⁴ has λ = 1/4 and L = w₁² + w₂⁴ has λ = 3/4 (< d/2).
    model = PowerLoss([1.0] * len(powers), powers)
    result = P.estimate_llc(model, _mean_criterion, DUMMY_DATA, {"w": None}, cfg)
    assert abs(result.llc - expected) < 0.05 * expected, (result.llc, result.llc_stderr)


def test_llc_restricted_to_a_subset_of_coordinates(float64):
    # Proves restricting SGLD to some coordinates gives their coefficient: with L = w₁² + w₂⁴,
    # sampling w₂ alone gives 1/4, and sampling w₁ alone gives what the linear recursion of
    # test_llc_prior_is_gamma_times_w_minus_w0 gives for w₁² at QUARTIC's ε (whose discretisation
    # bias, εP/4 = 0.1, is large and known): nβ / (P (1 − εP/4)) with P = γ + 2nβ, 0.5554 (1/2 as ε → 0).
    # Both subsets run batched in one call.
    model = PowerLoss([1.0, 1.0], [2.0, 4.0])
    only_w1, only_w2 = {"w": torch.tensor([True, False])}, {"w": torch.tensor([False, True])}
    r1, r2 = P.estimate_llc(model, _mean_criterion, DUMMY_DATA, [only_w1, only_w2], QUARTIC)
    precision = QUARTIC.localization + 2 * QUARTIC.nbeta
    expected = QUARTIC.nbeta / (precision * (1 - QUARTIC.step_size * precision / 4))
    assert expected == pytest.approx(0.5554, abs=1e-4)
    assert abs(r1.llc - expected) < 0.05 * expected, r1.llc
    assert abs(r2.llc - 0.25) < 0.05 * 0.25, r2.llc
    assert (r1.final_params["w"][:, 1] == 0).all() and (r1.final_params["w"][:, 0] != 0).all()


def _tiny_physics_model(float64=True):
    sim = P.SimConfig(n_particles=6, n_steps=16, box_width=5.0, box_height=5.0)
    torch.manual_seed(0)
    model = P.ParticleTransformer(P.ModelConfig(n_blocks=2, n_heads=2, embed_dim=8), sim)
    return model.double() if float64 else model, sim


SMALL_SGLD = P.LLCConfig(step_size=1e-4, nbeta=100.0, batch_size=4, steps=12, burn_in=6, chains=3, seed=5)


def test_llc_loss_conventions_and_the_ones_the_presets_use():
    # Pins the LLC's L_m: physim.squared_error is Appendix B.1's ℓ = ‖y − f(x, w)‖² summed over a state's
    # 4N outputs and averaged over the minibatch (a loop says so), 4N times F.mse_loss; --full samples
    # with it, the scaled preset with the mean (README: chosen by the traces at each preset's settings).
    # (test_reproduce_end_to_end_and_resume checks that run_llc samples with the preset's convention.)
    import reproduce as R
    g = torch.Generator().manual_seed(0)
    out, target = torch.randn(5, 6, 4, generator=g), torch.randn(5, 6, 4, generator=g)
    by_hand = sum(float(((out[b] - target[b]) ** 2).sum()) for b in range(5)) / 5
    assert float(P.squared_error(out, target)) == pytest.approx(by_hand, rel=1e-6)
    assert float(R.LLC_LOSSES["sum"](out, target)) == pytest.approx(24 * float(R.LLC_LOSSES["mean"](out, target)), rel=1e-6)
    assert (R.FULL.llc_loss, R.SCALED.llc_loss) == ("sum", "mean")
    with pytest.raises(ValueError, match="llc_loss"):
        R.Preset(llc_loss="median")


def test_llc_on_one_head_moves_only_that_head(float64):
    # Proves sampling one head leaves every other parameter bit-identical (and the model untouched)
    # and moves every parameter of that head.
    model, sim = _tiny_physics_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    head = P.head_parameters(model, block=1, head=1)
    assert sum(int(m.sum()) for m in head.values()) == 3 * 4 * 8 + 3 * 4 + 8 * 4   # q,k,v rows, bias, out cols
    data = P.simulator_batches(sim, P.DataConfig(chunk_trajectories=2), SMALL_SGLD.batch_size)
    result = P.estimate_llc(model, F_mse, data, head, SMALL_SGLD)
    for name, mask in head.items():
        sampled, w0 = result.final_params[name], before[name]                    # (C, *shape), (*shape)
        assert torch.equal(sampled[:, ~mask], w0[~mask].expand(SMALL_SGLD.chains, -1))
        assert (sampled[:, mask] != w0[mask]).all()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert result.traces.shape == result.w0_traces.shape == (SMALL_SGLD.chains, SMALL_SGLD.steps)
    # eq. (3) with the paired L_n(w₀): nβ · (mean L_m(w_t) − mean L_m(w₀)) over the post-burn-in steps.
    B = SMALL_SGLD.burn_in
    expected = SMALL_SGLD.nbeta * (result.traces[:, B:].mean(1) - result.w0_traces[:, B:].mean(1))
    assert torch.allclose(torch.tensor(result.chain_llc), expected)
    # L_m(w₀) really is the loss of the unchanged model on that step's minibatch.
    x, y = next(data(SMALL_SGLD.seed + 1))
    with torch.no_grad():
        assert math.isclose(float(result.w0_traces[1, 0]), float(F_mse(model(x), y)), rel_tol=1e-9)


def test_llc_prefix_split_equals_the_whole_model(float64):
    # Proves estimate_llc's prefix path is the plain one: FromBlock(model, l) after its prefix is the
    # model (every l, with the blocks before l computed once), and heads of blocks >= 1 sampled on
    # FromBlock(model, 1) with its prefix give the whole model's traces, L_m(w₀) and λ̂.
    model, sim = _tiny_physics_model()
    x, _ = P.TrainingStream(sim, P.DataConfig(chunk_trajectories=2), 5, seed=0).batch(0)
    with torch.no_grad():
        for block in range(model.cfg.n_blocks + 1):
            split = P.FromBlock(model, block)
            torch.testing.assert_close(split(*split.prefix(x)), model(x), rtol=0, atol=1e-12)
    data = P.simulator_batches(sim, P.DataConfig(chunk_trajectories=2), SMALL_SGLD.batch_size)
    heads = [(1, 0), (1, 1)]
    whole = P.estimate_llc(model, F_mse, data, [P.head_parameters(model, b, h) for b, h in heads], SMALL_SGLD)
    suffix = P.FromBlock(model, 1)
    assert dict(suffix.named_parameters()).keys() == dict(model.named_parameters()).keys()
    split = P.estimate_llc(suffix, F_mse, data, [P.head_parameters(model, b, h) for b, h in heads], SMALL_SGLD,
                           prefix=suffix.prefix)
    for w, s in zip(whole, split):
        torch.testing.assert_close(s.traces, w.traces, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(s.w0_traces, w.w0_traces, rtol=1e-10, atol=1e-12)
        assert s.llc == pytest.approx(w.llc, rel=1e-8) and P.llc_health(s) == P.llc_health(w)
        for name, value in w.final_params.items():
            torch.testing.assert_close(s.final_params[name], value, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("block, head", [(0, 0), (1, 1), (1, 2)])
def test_head_parameters_select_exactly_one_head(float64, block, head):
    # Proves head_parameters(model, l, h) is head h of block l and nothing else, in the fused q, k, v
    # layout of nn.MultiheadAttention (a mask of rows for columns, or an interleaved q/k/v layout, fails):
    # (a) perturbing the masked entries changes head h's attention in block l and no other head's
    #     there, and nothing before block l; perturbing every other entry of the block's attention
    #     changes every head's attention there except head h's;
    # (b) zeroing the masked out-projection columns equals dropping head h's value output by hand.
    sim = P.SimConfig(n_particles=6, n_steps=16, box_width=5.0, box_height=5.0)
    torch.manual_seed(0)
    model = P.ParticleTransformer(P.ModelConfig(n_blocks=2, n_heads=3, embed_dim=12), sim).eval()
    p, v = P.random_initial_state(sim, 2, torch.Generator().manual_seed(0))
    x = torch.cat([p, v], -1)
    masks = P.head_parameters(model, block, head)
    params = dict(model.named_parameters())
    others = [k for k in range(3) if k != head]

    def attention_after(perturb):                                    # perturb: name -> entries to move
        saved = {n: params[n].detach().clone() for n in perturb}
        with torch.no_grad():
            for n, where in perturb.items():
                params[n] += where * torch.randn(params[n].shape, generator=torch.Generator().manual_seed(1))
            attn = model(x, return_attention=True)[1]                # (L, B, H, N, N+1)
            for n in perturb:
                params[n].copy_(saved[n])
        return attn

    with torch.no_grad():
        base = model(x, return_attention=True)[1]
    inside = attention_after(masks)
    torch.testing.assert_close(inside[:block], base[:block], rtol=0, atol=1e-12)
    torch.testing.assert_close(inside[block, :, others], base[block, :, others], rtol=0, atol=1e-12)
    assert (inside[block, :, head] - base[block, :, head]).abs().max() > 1e-3
    outside = attention_after({n: ~m for n, m in masks.items()})
    torch.testing.assert_close(outside[block, :, head], base[block, :, head], rtol=0, atol=1e-12)
    for k in others:
        assert (outside[block, :, k] - base[block, :, k]).abs().max() > 1e-3

    attn_module = model.blocks[block].attn
    h_in = torch.randn(2, 6, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, weights = attn_module(h_in)                               # (B, H, N, N+1)
        v_all = h_in @ attn_module.in_proj.weight[24:].T + attn_module.in_proj.bias[24:]   # values: last third
        heads_out = [weights[:, k, :, :6] @ v_all[..., 4 * k:4 * (k + 1)] for k in range(3)]  # (B, N, E/H) each
        heads_out[head] = torch.zeros_like(heads_out[head])
        expected = attn_module.out_proj(torch.cat(heads_out, -1))
        attn_module.out_proj.weight[masks[f"blocks.{block}.attn.out_proj.weight"]] = 0.0
        torch.testing.assert_close(attn_module(h_in)[0], expected, rtol=0, atol=1e-12)


def F_mse(output, target):
    return torch.nn.functional.mse_loss(output, target)


def test_batched_chains_and_heads_equal_one_at_a_time(float64):
    # Proves the vmap'd chains (and heads) give the numbers of the same chains run one by one with
    # the same seeds: chain c of seed s is chain 0 of seed s + c.
    model, sim = _tiny_physics_model()
    data = P.simulator_batches(sim, P.DataConfig(chunk_trajectories=2), SMALL_SGLD.batch_size)
    heads = [P.head_parameters(model, 1, 0), P.head_parameters(model, 0, 1)]
    batched = P.estimate_llc(model, F_mse, data, heads, SMALL_SGLD)
    for k, head in enumerate(heads):
        for c in range(SMALL_SGLD.chains):
            alone = P.estimate_llc(model, F_mse, data, head,
                                   P.LLCConfig(**{**SMALL_SGLD.__dict__, "chains": 1, "seed": SMALL_SGLD.seed + c}))
            assert torch.allclose(batched[k].traces[c], alone.traces[0], rtol=1e-9, atol=1e-12)
            assert math.isclose(batched[k].chain_llc[c], alone.chain_llc[0], rel_tol=1e-6, abs_tol=1e-9)


def test_compiled_sgld_step_equals_the_eager_one():
    # Proves estimate_llc's compile_step path is the eager one: the same chains (noise and data) give
    # the same traces and λ̂ to float rounding.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x = torch.randn(256, 2)
    data = P.dataset_batches(x, torch.sin(x.sum(1, keepdim=True)), 16)
    subsets = [{"0.weight": None}, {"2.weight": None, "2.bias": None}]
    cfg = P.LLCConfig(step_size=1e-3, nbeta=50.0, batch_size=16, steps=40, burn_in=20, chains=3)
    eager = P.estimate_llc(model, torch.nn.functional.mse_loss, data, subsets, cfg)
    compiled = P.estimate_llc(model, torch.nn.functional.mse_loss, data, subsets, cfg, compile_step=True)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c.traces, e.traces, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(c.w0_traces, e.w0_traces, rtol=1e-4, atol=1e-6)
        assert c.llc == pytest.approx(e.llc, rel=1e-3, abs=1e-4) and P.llc_health(c) == P.llc_health(e)


def test_dataset_batches_are_the_same_whatever_the_block(monkeypatch):
    # Proves drawing minibatch indices a block at a time serves the same minibatches as drawing them
    # one step at a time, with one host-to-device copy (Tensor.to) per block of 256, not per step.
    x, y = torch.arange(1000.0)[:, None], torch.arange(1000.0)
    one = P.dataset_batches(x, y, 8, block=1)(3)
    expected = [next(one) for _ in range(300)]           # across a block boundary
    copies = []
    to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: copies.append(1) or to(self, *a, **k))
    blocked = P.dataset_batches(x, y, 8, block=256)(3)
    for a in expected:
        b = next(blocked)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert len(copies) == 2


def test_mala_acceptance_is_the_metropolis_hastings_ratio_by_hand(float64):
    # Proves the acceptance estimate_llc reports for each step w_t−1 -> w_t is min(1, π(w_t) q(w_t−1 | w_t) /
    # π(w_t−1) q(w_t | w_t−1)) for the tempered posterior π ∝ exp(−nβ L − γ/2 ‖w − w₀‖²) and SGLD's Gaussian
    # proposal q(· | w) = N(w − ε/2 ∇U(w), ε I), recomputed here with scipy from the recorded chain, on
    # L = Σ a_i w_i² plus a minibatch offset, constant in w: the estimator's trapezoid rule for U(w_t) − U(w_t−1)
    # is exact for this quadratic and blind to the offset (devinterp's difference of minibatch losses would see
    # nβ x the offset's noise). Near-zero ε accepts almost every step; ε·P = 3.6 (stable, too hot) rejects many.
    import scipy.stats
    a = torch.tensor([1.0, 0.5])
    offsets = P.dataset_batches(torch.zeros(64, 1), 10 * torch.randn(64, generator=torch.Generator().manual_seed(1)), 2)
    criterion = lambda out, y: out.mean() + y.mean()
    cfg = P.LLCConfig(step_size=2e-3, localization=3.0, nbeta=100.0, steps=30, burn_in=10, chains=2)
    seen = []
    r = P.estimate_llc(PowerLoss(a.tolist(), [2.0, 2.0]), criterion, offsets, {"w": None}, cfg,
                       on_step=lambda s: seen.append(s["delta"]["w"].clone()))
    w = torch.stack([torch.zeros(2, 2)] + seen[:-1]).numpy()                         # (T, C, 2): w_t − w₀
    U = lambda w: cfg.nbeta * (a.numpy() * w ** 2).sum(-1) + cfg.localization / 2 * (w ** 2).sum(-1)
    mean = lambda w: w - cfg.step_size / 2 * (2 * cfg.nbeta * a.numpy() + cfg.localization) * w
    logq = lambda to, fro: scipy.stats.norm.logpdf(to, mean(fro), math.sqrt(cfg.step_size)).sum(-1)
    log_alpha = U(w[:-1]) - U(w[1:]) + logq(w[:-1], w[1:]) - logq(w[1:], w[:-1])    # (T − 1, C)
    assert torch.isnan(r.acceptance[:, 0]).all()
    np.testing.assert_allclose(r.acceptance[:, 1:].numpy(), np.minimum(1, np.exp(log_alpha)).T, rtol=1e-9, atol=1e-12)
    assert 0.1 < r.acceptance[:, 1:].mean() < 0.99                                   # the test sees rejections
    P_max = 2 * cfg.nbeta * 1.0 + cfg.localization
    for eps, low, high in ((1e-3 / P_max, 0.99, 1.0), (3.6 / P_max, 0.0, 0.75)):
        q = P.estimate_llc(PowerLoss(a.tolist(), [2.0, 2.0]), criterion, offsets, {"w": None}, replace(cfg, step_size=eps, steps=200))
        assert low <= float(q.acceptance[:, 1:].mean()) <= high, (eps, q.acceptance.mean())


def test_llc_bad_arguments():
    model, _ = _tiny_physics_model(float64=False)
    with pytest.raises(AssertionError, match="no parameter"):
        P.estimate_llc(model, F_mse, DUMMY_DATA, {"nope": None}, SMALL_SGLD)
    with pytest.raises(AssertionError, match="bool tensor of shape"):
        P.estimate_llc(model, F_mse, DUMMY_DATA, {"unembed.bias": torch.ones(3, dtype=torch.bool)}, SMALL_SGLD)
    with pytest.raises(AssertionError, match="burn_in"):
        P.LLCConfig(steps=10, burn_in=10)
    with pytest.raises(AssertionError, match="no head"):
        P.head_parameters(model, block=5, head=0)


# ----------------------------------------------------------------------------------------------------
# 8. Power-law fits (Appendix D.1)
# ----------------------------------------------------------------------------------------------------

STEPS = np.array(P.checkpoint_steps(P.TrainConfig()), dtype=float)   # the full schedule: 309 checkpoints, 0..64000


def test_fit_power_law_recovers_an_exact_power_law_and_its_window():
    # Proves the fit is of log|c| on log t with natural logs, over [start, end] only, skipping t = 0
    # and the sign of c: Table 5's columns.
    c = -3.0 * np.maximum(STEPS, 1) ** -0.4                               # negative c: |c| is fitted
    c[STEPS > 20000] = 0.5                                               # outside the window: ignored
    fit = P.fit_power_law(STEPS, c, start=1000, end=20000)
    assert fit.exponent == pytest.approx(-0.4, abs=1e-9)
    assert fit.log_constant == pytest.approx(math.log(3.0), abs=1e-9)
    assert fit.r2 == pytest.approx(1.0) and fit.exponent_ci == pytest.approx(0.0, abs=1e-9)
    assert fit.start >= 1000 and fit.end <= 20000 and fit.n_points == ((STEPS >= 1000) & (STEPS <= 20000)).sum()


def test_fit_power_law_interval_has_its_stated_coverage():
    # Proves the 95% interval of the exponent (t distribution, n - 2 dof) covers the true exponent
    # about 95% of the time when the paper's assumption (iid normal errors in log|c|) holds.
    rng = np.random.default_rng(0)
    t = np.geomspace(100, 10000, 12)
    covered = 0
    for _ in range(2000):
        fit = P.fit_power_law(t, 2.0 * t ** -0.3 * np.exp(0.1 * rng.standard_normal(12)))
        covered += abs(fit.exponent + 0.3) <= fit.exponent_ci
    assert 0.935 <= covered / 2000 <= 0.965


# ----------------------------------------------------------------------------------------------------
# 9. Beyond the paper: bootstrap errors, chain health, calibration, regimes and the judge
# ----------------------------------------------------------------------------------------------------

def test_bootstrap_weights_give_the_metrics_of_resampled_states():
    # Proves the bootstrap errors' resamples: with weights row k of bootstrap_weights, both metrics equal
    # the plain metrics recomputed on the states drawn by resample k (duplicates included), and the
    # rows are multinomial counts over n (each sums to 1, entries are multiples of 1/n).
    attn, positions = _random_metric_inputs(S=12)
    weights = P.bootstrap_weights(12, 5, seed=3)                                    # (K, S)
    assert torch.allclose(weights.sum(1), torch.ones(5, dtype=torch.float64))
    counts = (weights * 12).round().long()
    assert torch.allclose(counts.double() / 12, weights)
    score = P.collision_detection_score(attn, positions, weights=weights)          # (K, L, H)
    corr = P.attention_distance_correlation(attn, positions, weights=weights)
    for k in range(5):
        drawn = torch.arange(12).repeat_interleave(counts[k])                      # the resampled states
        torch.testing.assert_close(score[k], P.collision_detection_score(attn[:, drawn], positions[drawn]),
                                   rtol=0, atol=1e-12)
        torch.testing.assert_close(corr[k], P.attention_distance_correlation(attn[:, drawn], positions[drawn]),
                                   rtol=0, atol=1e-12)
    assert not torch.allclose(corr[0], corr[1])


def test_unhealthy_chains_are_flagged_and_kept_in_the_mean(float64):
    # Proves the automatic verdicts: a step size far too large diverges, a chain started away from a
    # minimum goes below L(w₀) (negative), a chain with no burn-in whose loss is still climbing is
    # not stationary, and a stationary chain too hot for the curvature has λ̂ above d = 2 · d/2. Every one of them
    # is flagged and still averaged in: the estimate is the mean of all chains, as the paper reports it
    # (a diverged chain makes it non-finite).
    quadratic = PowerLoss([1.0, 1.0], [2.0, 2.0])
    cfg = P.LLCConfig(step_size=0.01, nbeta=1000.0, steps=200, burn_in=50, chains=2)
    diverged = P.estimate_llc(quadratic, _mean_criterion, DUMMY_DATA, {"w": None}, cfg)
    assert all(h.startswith("diverged") for h in P.llc_health(diverged)) and not math.isfinite(diverged.llc)

    # Just past SGLD's stability limit (ε·(2nβa + γ)/2 = 2.05) the loss grows ~1.1x a step but stays finite.
    runaway_cfg = P.LLCConfig(step_size=4.1 / 2001, nbeta=1000.0, steps=200, burn_in=50, chains=2)
    runaway = P.estimate_llc(quadratic, _mean_criterion, DUMMY_DATA, {"w": None}, runaway_cfg)
    assert all(h == "diverged (loss running away)" for h in P.llc_health(runaway)), P.llc_health(runaway)
    assert torch.isfinite(runaway.traces).all()

    uphill = PowerLoss([1.0], [2.0], w0=[1.0])                                   # w₀ is not a minimum
    negative = P.estimate_llc(uphill, _mean_criterion, DUMMY_DATA, {"w": None}, replace(REGULAR, chains=4))
    assert all(h.startswith("negative") for h in P.llc_health(negative)), P.llc_health(negative)

    many = PowerLoss([1.0] * 50, [2.0] * 50)                                     # loss ≈ its mean: a clean trend
    slow = P.LLCConfig(step_size=1e-7, nbeta=1000.0, steps=2000, burn_in=0, chains=2)
    climbing = P.estimate_llc(many, _mean_criterion, DUMMY_DATA, {"w": None}, slow)
    assert all(h == "not stationary after burn-in" for h in P.llc_health(climbing)), P.llc_health(climbing)

    # Stationary but too hot: at εP = 3.6 the stationary variance is 1/(P (1 − 0.9)), so λ̂ → 10 · d/2.
    hot = P.estimate_llc(quadratic, _mean_criterion, DUMMY_DATA, {"w": None},
                         P.LLCConfig(step_size=3.6 / 2001, nbeta=1000.0, steps=3000, burn_in=500, chains=2))
    assert all(h.startswith("too hot") for h in P.llc_health(hot)), (P.llc_health(hot), hot.chain_llc)

    for result in (runaway, negative, climbing, hot):
        assert result.llc == pytest.approx(np.mean(result.chain_llc), rel=1e-12)
        assert result.llc_stderr == pytest.approx(np.std(result.chain_llc, ddof=1) / math.sqrt(len(result.chain_llc)))
    assert negative.llc < 0


def _chains(excess, acceptance=0.99, dimension=100, cfg=None):
    """An LLCResult whose C chains have these excess losses e_t = L_m(w_t) − L_m(w₀) (C, T), L_m(w₀) = 1."""
    e = torch.as_tensor(np.asarray(excess), dtype=torch.float64)
    cfg = cfg or P.LLCConfig(nbeta=100.0, steps=e.shape[1], burn_in=0, chains=len(e))
    chain_llc = cfg.nbeta * e[:, cfg.burn_in:].mean(1)
    return P.LLCResult(float(chain_llc.mean()), float(chain_llc.std() / math.sqrt(len(e))), chain_llc.tolist(), [1.0] * len(e),
                       1 + e, torch.ones_like(e), torch.full_like(e, acceptance), {}, dimension, cfg)


def _ar1_chains(rho, shape, seed, scale=0.002):
    """Stationary AR(1) draws x_t = ρ x_t−1 + noise with marginal standard deviation `scale`: (C, T)."""
    z = np.random.default_rng(seed).standard_normal(shape) * scale
    x = np.empty(shape)
    x[:, 0] = z[:, 0]
    for t in range(1, shape[1]):
        x[:, t] = rho * x[:, t - 1] + math.sqrt(1 - rho ** 2) * z[:, t]
    return x


def test_effective_sample_size_and_split_rhat_on_known_chains():
    # Proves the two MCMC statistics against their closed forms: independent draws have ESS ≈ M·n, AR(1)
    # chains ESS ≈ M·n (1 − ρ)/(1 + ρ) (each seed within 20 %, their mean within 8 %: measured 0.88-1.09 over
    # 6 seeds); chains drawn alike have split-R̂ ≈ 1, chains whose levels differ by 2 of their standard
    # deviations have R̂ ≈ sqrt(1 + var(the halves' levels)/W).
    ratios = [P.effective_sample_size(_ar1_chains(0.9, (4, 20_000), seed)) / (80_000 * 0.1 / 1.9) for seed in range(5)]
    assert all(0.8 < r < 1.2 for r in ratios) and np.mean(ratios) == pytest.approx(1.0, abs=0.08), ratios
    for seed in range(3):
        assert P.effective_sample_size(_ar1_chains(0.0, (4, 2000), seed)) == pytest.approx(8000, rel=0.1)
        assert P.split_rhat(_ar1_chains(0.5, (4, 2000), seed)) == pytest.approx(1.0, abs=0.01)
    levels = np.array([-3, -1, 1, 3])[:, None] * 0.002
    halves = np.repeat(levels, 2)                                              # the 2M half-chains' levels
    assert P.split_rhat(_ar1_chains(0.0, (4, 4000), 0) + levels) == pytest.approx(math.sqrt(1 + halves.var(ddof=1) / 0.002 ** 2), rel=0.02)


def test_convergence_verdict_passes_equilibrated_chains_and_fails_each_test():
    # Proves each test of the verdict on chains built to fail it (and only the equilibrated ones pass):
    # λ̂ = nβ·mean e = 100 x 0.02 = 2 in each, with AR(1) noise.
    good = 0.02 + _ar1_chains(0.5, (4, 2000), 1)
    ok = P.convergence(_chains(good))
    assert ok["verdict"] == "equilibrated", ok
    assert ok["llc_first_half"] == pytest.approx(2.0, rel=0.02) and abs(ok["drift_z"]) < 3 and ok["acceptance"] == pytest.approx(0.99)
    stuck = P.convergence(_chains(0.02 + _ar1_chains(0.5, (4, 2000), 2) + np.array([[-3], [-1], [1], [3]]) * 0.001))
    sticky = P.convergence(_chains(0.02 + _ar1_chains(0.995, (4, 2000), 3)))          # ESS ≈ 8000 · 0.005/1.995 = 20
    drifting = P.convergence(_chains(np.linspace(0.015, 0.025, 2000) + _ar1_chains(0.5, (4, 2000), 4)))
    too_big_a_step = P.convergence(_chains(good, acceptance=0.8))
    too_hot = P.convergence(_chains(good, dimension=1))                        # λ̂ = 2 > d = 1: chain_health's "too hot"
    assert "split-R̂" in stuck["verdict"] and stuck["rhat"] > 1.3
    assert "ESS" in sticky["verdict"] and sticky["ess"] < 40
    assert "drifts" in drifting["verdict"] and drifting["drift_z"] > 3
    assert too_big_a_step["verdict"] == "not equilibrated: MALA acceptance 0.800 < 0.9"
    just_under = P.convergence(_chains(good, acceptance=0.8996))               # shown rounded down: never "0.90 < 0.9"
    assert just_under["verdict"] == "not equilibrated: MALA acceptance 0.899 < 0.9"
    assert too_hot["verdict"] == "not equilibrated: 4 of 4 chains unhealthy"
    diverged = P.convergence(_chains(np.full((4, 100), np.inf)))
    assert diverged["verdict"].startswith("not equilibrated") and math.isnan(diverged["ess"])


def test_calibrate_llc_selects_where_lambda_stops_depending_on_the_sampler(float64):
    # Proves the selection rule on L = 0.05 (w₁² + w₂²) (nβ = 1000, γ = 1: λ → nβ Σ a/P = 0.990 as ε → 0, and
    # nβ Σ a / (P (1 − εP/4)) at ε). Chains of T = 10 steps have not equilibrated at any ε of the grid (λ̂ still
    # ~ ε·T): the rule must select nothing and say that longer chains are needed. Chains of T = 1000 have: it
    # selects the largest ε at which they pass, 4e-3, whose λ̂ is the closed form's. At 8e-3 the chains are
    # equilibrated too (MALA accepts 0.91) but λ̂ has grown 14 % above its value at 4e-3 (discretisation,
    # εP/4 = 0.2): only the growth test rejects it. At 4.1e-2 (εP > 4) SGLD diverges.
    model = {"m": PowerLoss([0.05, 0.05], [2.0, 2.0])}
    grid = [1e-3, 2e-3, 4e-3, 8e-3, 4.1e-2]
    short = P.calibrate_llc(model, _mean_criterion, DUMMY_DATA, {"w": None},
                            P.LLCConfig(step_size=1e-3, nbeta=1000.0, steps=10, burn_in=5, chains=8), grid)
    assert (short.step_size, short.nbeta) == (None, None) and short.statement.startswith("no probed setting passes")
    assert "closest: ε = " in short.statement and "longer chains" in short.statement and not any(r["passes"] for r in short.rows)
    assert f"closest: ε = {short.closest[0]:g}, nβ = {short.closest[1]:g}," in short.statement
    done = []
    long = P.calibrate_llc(model, _mean_criterion, DUMMY_DATA, {"w": None},
                           P.LLCConfig(step_size=1e-3, nbeta=1000.0, steps=1000, burn_in=250, chains=8), grid,
                           on_cell=lambda i, n: done.append((i, n)))
    assert (long.step_size, long.nbeta) == long.closest == (4e-3, 1000.0) and long.statement.startswith("ε = 0.004, nβ = 1000, T = 1000"), long.statement
    cell = {r["step_size"]: r for r in long.rows}
    P_ = 1.0 + 2 * 1000.0 * 0.05
    assert cell[4e-3]["llc"] == pytest.approx(1000 * 0.1 / (P_ * (1 - 4e-3 * P_ / 4)), abs=4 * cell[4e-3]["llc_stderr"])
    assert cell[8e-3]["verdict"] == "equilibrated" and cell[8e-3]["failed"].startswith("λ̂ grows")
    assert not cell[4.1e-2]["passes"] and "unhealthy" in cell[4.1e-2]["failed"]
    assert cell[1e-3]["failed"].endswith("no smaller ε probed") and done == [(i, 5) for i in range(1, 6)]
    assert cell[4e-3]["llc_over_smaller_step"] == cell[4e-3]["llc_2T"] / cell[2e-3]["llc_2T"]


def test_calibrate_llc_rejects_chains_that_move_on_when_doubled(monkeypatch):
    # Proves the doubling test alone: chains that look equilibrated over their first T steps (every verdict
    # passes, and λ̂ is the same at the smaller ε) but settle 50 % higher over steps T ... 2T are not selected.
    def fake(model, criterion, data, subsets, cfg):
        e = 0.02 + _ar1_chains(0.0, (4, cfg.steps), 7)
        e[:, cfg.steps // 2:] += 0.01
        return [_chains(e, cfg=cfg)]
    monkeypatch.setattr(P, "estimate_llc", fake)
    cal = P.calibrate_llc({"m": None}, None, None, {}, P.LLCConfig(nbeta=100.0, steps=1000, burn_in=200, chains=4), [1e-3, 2e-3])
    cell = {r["step_size"]: r for r in cal.rows}
    assert cell[2e-3]["verdict"] == "equilibrated" and cell[2e-3]["failed"].startswith("doubling T moves λ̂ +"), cell[2e-3]["failed"]
    assert cal.step_size is None and "longer chains than T = 1000" in cal.statement


def test_calibrate_llc_selects_a_sampler_that_no_longer_depends_on_it(monkeypatch):
    # Proves that the doubling and growth tests hold their false alarms over many heads: chains already
    # independent of ε and T (white noise about one λ̂, 9 subsets: 18 such tests in the cell of 2e-3) are
    # selected in >= 30 of 40 draws (35 measured; Bonferroni at 0.05 expects about 95 %, less the convergence
    # verdict's own false alarms). Two standard errors per test, each from the 4 chains' means (t with few
    # degrees of freedom), selected them in 13 of 40.
    rng = np.random.default_rng(11)
    def fake(model, criterion, data, subsets, cfg):
        return [_chains(0.02 + rng.standard_normal((4, cfg.steps)) * 0.002, cfg=cfg) for _ in subsets]
    monkeypatch.setattr(P, "estimate_llc", fake)
    cfg = P.LLCConfig(nbeta=100.0, steps=1000, burn_in=500, chains=4)        # B = T/2, as the medium preset
    picked = [P.calibrate_llc({"m": None}, None, None, [{}] * 9, cfg, [1e-3, 2e-3]).step_size for _ in range(40)]
    assert picked.count(2e-3) >= 30, picked.count(2e-3)


def test_calibrate_llc_does_not_fail_a_right_sampler_whose_chains_share_a_slow_mode(monkeypatch):
    # Proves the dispersion φ: each chain's excess loss carries, beside white minibatch noise, a slow AR(1) mode
    # (τ = 400 steps) too weak to show in the autocorrelation, so the ESS-based llc_mcse misses it while the 4
    # chains' means spread ~1.6x wider (φ ≈ 2.5, as on the medium run's calibration). The chains do not depend
    # on ε or T, so the doubling and growth tests of the cell 2e-3 must raise no alarm in >= 26 of 30 draws
    # (29 and 28 measured on two seeds). With φ = 1 (the MCSE alone) they did in 14 and 13 of 30.
    rng = np.random.default_rng(5)
    def fake(model, criterion, data, subsets, cfg):
        slow = lambda: _ar1_chains(1 - 1 / 400, (4, cfg.steps), int(rng.integers(1 << 30)), scale=0.002 * math.sqrt(0.004))
        return [_chains(0.02 + rng.standard_normal((4, cfg.steps)) * 0.002 + slow(), cfg=cfg) for _ in subsets]
    monkeypatch.setattr(P, "estimate_llc", fake)
    cfg = P.LLCConfig(nbeta=100.0, steps=1000, burn_in=500, chains=4)
    clean, phis = 0, []
    for _ in range(30):
        cell = [r for r in P.calibrate_llc({"m": None}, None, None, [{}] * 9, cfg, [1e-3, 2e-3]).rows if r["step_size"] == 2e-3]
        clean += not any("doubling" in r["failed"] or "grows" in r["failed"] for r in cell)
        phis.append(cell[0]["dispersion"])
    assert clean >= 26 and 1.8 < np.mean(phis) < 3.5, (clean, np.mean(phis))


def test_select_sampler_rejudges_saved_rows_as_calibrate_llc_judged_them(monkeypatch):
    # Proves that select_sampler on calibrate_llc's rows, stripped of its own columns (as calibration.csv is
    # read back), gives the same selection, statement and per-row tests.
    rng = np.random.default_rng(3)
    def fake(model, criterion, data, subsets, cfg):
        return [_chains(0.02 + cfg.step_size + rng.standard_normal((4, cfg.steps)) * 0.002, cfg=cfg) for _ in subsets]
    monkeypatch.setattr(P, "estimate_llc", fake)
    cfg = P.LLCConfig(nbeta=100.0, steps=400, burn_in=200, chains=4)
    cal = P.calibrate_llc({"a": None, "b": None}, None, None, [{}] * 3, cfg, [1e-4, 2e-4, 4e-2])
    own = ("dispersion", "doubling_z", "growth_z", "llc_over_smaller_step", "passes", "failed")
    again = P.select_sampler([{k: v for k, v in r.items() if k not in own} for r in cal.rows], cfg)
    assert (again.step_size, again.statement) == (cal.step_size, cal.statement) and cal.step_size == 2e-4
    assert [(r["passes"], r["failed"]) for r in again.rows] == [(r["passes"], r["failed"]) for r in cal.rows]


def _two_regimes(t):
    """Flat at first, then |c| ∝ t^-0.3 from step 1000, then ∝ t^-0.1 from step 10000 (continuous)."""
    c = 2.0 * np.clip(t, 1000, 10000) ** -0.3
    return np.where(t > 10000, c * (np.maximum(t, 1) / 10000) ** -0.1, c)


@pytest.mark.parametrize("seed", range(3))
def test_regimes_recover_known_exponents_and_breakpoint(seed):
    # Proves find_power_law_regimes finds both power laws of a curve with a transition, at 2% noise:
    # exponents within ±0.03 and the breakpoint within a factor 1.25 of step 10000, and rejects the
    # flat start.
    rng = np.random.default_rng(seed)
    pieces = P.find_power_law_regimes(STEPS, _two_regimes(STEPS) * np.exp(0.02 * rng.standard_normal(len(STEPS))))
    laws = [p for p in pieces if p.is_power_law]
    assert len(laws) == 2, [(p.exponent, p.start, p.end, p.verdict) for p in pieces]
    assert laws[0].exponent == pytest.approx(-0.3, abs=0.03) and laws[1].exponent == pytest.approx(-0.1, abs=0.03)
    assert 8000 <= laws[0].end <= 12500 and 8000 <= laws[1].start <= 12500
    assert not pieces[0].is_power_law and pieces[0].end <= 1250                    # the flat start


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("curve", ["exponential 2k", "exponential 5k", "exponential 20k", "noise"])
def test_no_power_law_at_the_end_of_exponentials_or_noise(curve, seed):
    # Proves exponential decay (any time constant) and pure noise, at 2% iid noise, do not decay as a
    # power law at the end of their development: noise has no resolved piece, and an exponential's last
    # pieces, straight enough each, fit an exponential significantly better as a stretch.
    rng = np.random.default_rng(seed)
    clean = {"exponential 2k": np.exp(-STEPS / 2000), "exponential 5k": np.exp(-STEPS / 5000),
             "exponential 20k": np.exp(-STEPS / 20000), "noise": np.full(len(STEPS), 0.1)}[curve]
    c = clean * np.exp(0.02 * rng.standard_normal(len(STEPS)))
    pieces = P.find_power_law_regimes(STEPS, c)
    end = P.end_of_development(STEPS, c, pieces)
    assert pieces and not end["follows"], (end["why"], [(p.exponent, p.start, p.end) for p in pieces])


# Synthetic runs for the judge, on the full schedule: c(t) on two independent held-out sets, each with AR(1)
# errors of log|c| between checkpoints; the judged curve is c on both (their mean error). ρ = 0.40 was measured
# on our scaled run by the residual method (not the halves); 0.9 is errors as correlated as the issue asks for.
MEASURED_RHO = 0.40


PAPER_LATE_R2 = [r["r2"] for r in __import__("reproduce").paper_table5() if r["end"] == 64000]


def _ar1(n, rho, sigma, rng):
    e = np.empty(n)
    e[0] = rng.standard_normal()
    for k in range(1, n):
        e[k] = rho * e[k - 1] + math.sqrt(1 - rho ** 2) * rng.standard_normal()
    return sigma * e


def _planted(rng, kind):
    """log|c| on STEPS: formation (rising to step T/20), an early decay as t^-0.8, then from t0 in
    [0.25 T, 0.4 T] a late power law t^alpha (alpha in Table 5's late range) to the end of training
    ("late") or to 0.75 T, after which c stops changing ("stops"); noise sized so the late regime has
    an R² of Table 5's late regimes. Returns (log|c| with noise, t0, t1)."""
    T, lt = STEPS[-1], np.log(np.maximum(STEPS, 1))
    alpha, t0, t1, peak = -rng.uniform(0.08, 0.5), T * rng.uniform(0.25, 0.4), T * (1 if kind == "late" else 0.75), T / 20
    y = np.where(STEPS < peak, lt - math.log(peak), -0.8 * (lt - math.log(peak)))
    y = np.where(STEPS < t0, y, -0.8 * math.log(t0 / peak) + alpha * (np.minimum(lt, math.log(t1)) - math.log(t0)))
    regime = np.log(STEPS[(STEPS >= t0) & (STEPS <= t1)])
    r2 = rng.choice(PAPER_LATE_R2)
    return y, math.sqrt(alpha ** 2 * regime.var() * (1 - r2) / r2), t0, t1


def _two_sets(y, sigma, rho, rng):
    """c on two held-out sets (errors of sd sigma·√2 each, AR(1) in t) and on both: (c₁, c₂), c."""
    e1, e2 = (_ar1(len(y), rho, sigma * math.sqrt(2), rng) for _ in range(2))
    return (np.exp(y + e1), np.exp(y + e2)), np.exp(y + (e1 + e2) / 2)


def _judged_run(curves, rho, rng):
    """Measure ρ from the two sets of (log|c|, sigma) curves, judge each curve's end of development."""
    window = STEPS >= STEPS[-1] / 100
    sets = [_two_sets(y, sigma, rho, rng) for y, sigma in curves]
    rho_hat = P.error_correlation(STEPS[window], [(a[window], b[window]) for (a, b), _ in sets])
    return [P.end_of_development(STEPS[window], c[window], P.find_power_law_regimes(STEPS[window], c[window], rho_hat), rho_hat)
            for _, c in sets]


@pytest.mark.parametrize("rho", [0.0, MEASURED_RHO, 0.9])
def test_error_correlation_measures_the_ar1_coefficient_from_two_heldout_sets(rho):
    # Proves error_correlation measures ρ of the errors, not of the curve: 16 planted curves of a run, each
    # on two sets, give ρ within ±0.1 (the two sets' difference holds no trend, whatever the curve does).
    rng = np.random.default_rng(3)
    halves = [_two_sets(y, sigma, rho, rng)[0] for y, sigma, _, _ in (_planted(rng, "late") for _ in range(16))]
    assert P.error_correlation(STEPS, halves) == pytest.approx(rho, abs=0.1)


@pytest.mark.parametrize("rho", [MEASURED_RHO, 0.9])
@pytest.mark.parametrize("kind", ["late", "stops"])
def test_judge_recovers_planted_late_power_laws(kind, rho):
    # Proves the end-of-development judge finds a late power law planted at Table 5's R² with errors
    # correlated as in our runs, and as strongly as 0.9, in >= 85 % of 64 draws (4 runs of 16 heads), whether
    # it lasts to the end of training or c stops changing after it: the judged piece is a decaying power
    # law that overlaps the planted regime (a short last piece fitted to the errors must not decide).
    rng = np.random.default_rng(0)
    found = 0
    for _ in range(4):
        planted = [_planted(rng, kind) for _ in range(16)]
        for end, (_, _, t0, t1) in zip(_judged_run([(y, s) for y, s, _, _ in planted], rho, rng), planted):
            found += end["follows"] and end["piece"].end >= t0 and end["piece"].start <= t1
    assert found >= 0.85 * 64, found


@pytest.mark.parametrize("rho", [MEASURED_RHO, 0.9])
@pytest.mark.parametrize("curve", ["exponential 2k", "exponential 5k", "exponential 20k", "noise", "drift t^-0.03"])
def test_judge_calls_no_exponential_noise_or_drift_a_power_law(curve, rho):
    # Proves exponential decays (time constants 2k, 5k, 20k steps of 64k), flat noise and a slow drift
    # (t^-0.03: |c| changes 13 % over two decades, shallower than every row of Table 5), with 2 % AR(1)
    # errors, are not called power laws in >= 90 % of 64 draws. Without the exponential test on the
    # decaying stretch, every exponential draw would be (R² alone cannot tell them apart).
    rng = np.random.default_rng(1)
    clean = {"exponential 2k": -STEPS / 2000, "exponential 5k": -STEPS / 5000, "exponential 20k": -STEPS / 20000,
             "noise": np.full(len(STEPS), math.log(0.1)), "drift t^-0.03": -0.03 * np.log(np.maximum(STEPS, 1))}[curve]
    called = sum(end["follows"] for _ in range(4) for end in _judged_run([(clean, 0.02)] * 16, rho, rng))
    assert called <= 0.1 * 64, called


@pytest.mark.parametrize("row", [(-0.049, 13696, 64000, 0.788), (-0.784, 4864, 5734, 0.934)])
def test_table5s_shallowest_and_shortest_sections_are_power_laws(row):
    # Proves the definition keeps the paper's own extremes: Table 5's shallowest late section (run 3, head
    # 1-2: t^-0.049 over steps 13 696-64 000, |c| changing 7 %, R² 0.788) and its shortest (run 0, head
    # 1-4: t^-0.784 over 4 864-5 734, a factor 1.18 in t, c flat after), each at its R² and flat before,
    # are found as the decaying power law at the end of development in >= 90 % of 32 draws.
    alpha, t0, t1, r2 = row
    steps = STEPS[STEPS >= STEPS[-1] / 100]
    lt = np.log(steps)
    y = alpha * (np.clip(lt, math.log(t0), math.log(t1)) - math.log(t0))
    regime = lt[(steps >= t0) & (steps <= t1)]
    sigma = math.sqrt(alpha ** 2 * regime.var() * (1 - r2) / r2)
    rng, found = np.random.default_rng(2), 0
    for _ in range(32):
        c = np.exp(y + sigma * rng.standard_normal(len(steps)))
        end = P.end_of_development(steps, c, P.find_power_law_regimes(steps, c))
        found += end["follows"] and end["piece"].start <= t1 and end["piece"].end >= t0
    assert found >= 0.9 * 32, found


def test_a_jump_of_c_is_a_change_but_not_a_power_law():
    # Proves max_exponent: |c| falling tenfold within a factor 1.3 in t (as t^-8.8), flat before and after, is
    # the last change of c, and it is a jump, not a power law at the end of development; Table 5's steepest
    # section (t^-0.846 over 4 397-5 609, run 2, head 1-1) and t^-1.9 over the same steps are power laws.
    steps = STEPS[STEPS >= STEPS[-1] / 100]
    for alpha, t0, t1, follows in ((math.log(0.1) / math.log(1.3), 20000, 26000, False), (-0.846, 4397, 5609, True),
                                   (-1.9, 4397, 5609, True)):
        lt = np.log(steps)
        c = np.exp(alpha * (np.clip(lt, math.log(t0), math.log(t1)) - math.log(t0)) + 0.002 * np.random.default_rng(0).standard_normal(len(steps)))
        end = P.end_of_development(steps, c, P.find_power_law_regimes(steps, c))
        assert end["follows"] == follows and end["piece"].start <= t1 and end["piece"].end >= t0, (alpha, end["why"])
        assert follows or end["why"].startswith("|c| jumps"), end["why"]


def test_a_piece_is_a_power_law_only_above_the_stated_exponent_and_change():
    # Proves the two minimums of the definition at their thresholds, on exact lines (no noise) over steps
    # 1 000-64 000: |exponent| 0.041 is a power law and 0.039 is not (min_exponent 0.04); over 1 000-2 000,
    # t^-0.08 changes |c| by 5.4 % (a power law) and t^-0.07 by 4.7 % (not: min_change 5 %).
    def verdicts(alpha, end):
        t = np.geomspace(1000, end, 40)
        return [p.is_power_law for p in P.find_power_law_regimes(t, t ** alpha)]
    assert verdicts(-0.041, 64000) == [True] and verdicts(-0.039, 64000) == [False]
    assert verdicts(-0.08, 2000) == [True] and verdicts(-0.07, 2000) == [False]
    t = np.geomspace(1000, 64000, 40)
    piece = P.find_power_law_regimes(t, t ** -0.1)[0]
    assert piece.change == pytest.approx(64 ** -0.1 - 1) and piece.change_bound == pytest.approx(piece.change)


def test_regimes_of_a_single_power_law_is_one_piece():
    pieces = P.find_power_law_regimes(STEPS, 0.5 * np.maximum(STEPS, 1) ** -0.5)
    assert len(pieces) == 1 and pieces[0].is_power_law and pieces[0].exponent == pytest.approx(-0.5)


def test_head_classes_follow_the_stated_thresholds():
    assert [P.head_class(s) for s in (0.95, 0.8, 0.79, 0.3, 0.29, 0.0)] == \
           ["true", "true", "partial", "partial", "none", "none"]


# ----------------------------------------------------------------------------------------------------
# 10. The four pieces copy out: each runs alone in a fresh namespace and gives physim's numbers
# ----------------------------------------------------------------------------------------------------

# The names each piece is made of, as README.md lists them: copy these (and physim.py's imports).
PIECES = {
    "simulator": ["SimConfig", "contact_duration", "restitution", "pair_geometry", "wall_overlaps",
                  "contact_acceleration", "simulate", "total_energy", "INIT_CELL", "random_initial_state"],
    "model": ["SimConfig", "ACTIVATIONS", "ModelConfig", "boundary_particles", "mlp", "ParticleAttention", "Block",
              "ParticleTransformer"],
    "estimator": ["LLCConfig", "LLCResult", "estimate_llc", "dataset_batches"],
    "power law": ["PowerLawFit", "_log_log", "fit_power_law"],
}


def _copied(piece: str) -> dict:
    """Exactly the source of the piece's names (read from physim.py), run in a namespace that holds only
    math, zlib and torch (with torch.nn as nn and torch.nn.functional as F), numpy and scipy for the fit,
    and the dataclass decorator: the piece's definitions."""
    import ast
    import dataclasses
    import zlib
    import scipy.stats
    source = open(P.__file__).read()
    nodes = {}
    for node in ast.parse(source).body:
        name = getattr(node, "name", None) or (node.targets[0].id if isinstance(node, ast.Assign) else None)
        if name:
            nodes[name] = ast.get_source_segment(source, node, padded=True)
            if getattr(node, "decorator_list", None):
                nodes[name] = "\n".join("@" + ast.get_source_segment(source, d) for d in node.decorator_list) + "\n" + nodes[name]
    namespace = {"math": math, "zlib": zlib, "torch": torch, "nn": torch.nn, "F": torch.nn.functional,
                 "dataclass": dataclasses.dataclass, **({"np": np, "scipy": scipy} if piece == "power law" else {})}
    exec(compile("from __future__ import annotations\n" + "\n\n".join(nodes[n] for n in PIECES[piece]),
                 f"<{piece}>", "exec"), namespace)
    return namespace


def test_the_simulator_copies_out_as_one_block(float64):
    # Proves the simulator's names alone (no other physim name) draw the same initial states and simulate
    # the same trajectories and energies as physim.
    sim = P.SimConfig(n_particles=12, box_width=8.0, box_height=6.0)
    c = _copied("simulator")
    p, v = c["random_initial_state"](c["SimConfig"](**asdict(sim)), 3, torch.Generator().manual_seed(0))
    q, u = P.random_initial_state(sim, 3, torch.Generator().manual_seed(0))
    assert torch.equal(p, q) and torch.equal(v, u)
    got, expected = c["simulate"](p, v, c["SimConfig"](**asdict(sim)), 80), P.simulate(q, u, sim, 80)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert torch.equal(c["total_energy"](*got, sim), P.total_energy(*expected, sim))
    assert c["restitution"](sim, 0.5) == P.restitution(sim, 0.5)


@pytest.mark.parametrize("scaled_io", [False, True])
def test_the_model_copies_out_as_one_block(scaled_io):
    # Proves the model's names alone build the same network from the same seed, with the same parameter
    # names, next states and attention weights (explicit and fused paths), as physim.
    sim, cfg = P.SimConfig(n_particles=8, box_width=6.0, box_height=5.0), P.ModelConfig(n_blocks=2, n_heads=2, embed_dim=8, scaled_io=scaled_io)
    c = _copied("model")
    torch.manual_seed(0)
    ours = c["ParticleTransformer"](c["ModelConfig"](**asdict(cfg)), c["SimConfig"](**asdict(sim)))
    torch.manual_seed(0)
    theirs = P.ParticleTransformer(cfg, sim)
    assert list(dict(ours.named_parameters())) == list(dict(theirs.named_parameters()))
    x = torch.cat(P.random_initial_state(sim, 2, torch.Generator().manual_seed(1)), -1)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
        for a, b in zip(ours(x, return_attention=True), theirs(x, return_attention=True)):
            assert torch.equal(a, b)


def test_the_llc_estimator_copies_out_as_one_block(float64):
    # Proves estimate_llc with its config and result classes alone (and dataset_batches) gives physim's
    # traces and λ̂ on a small MLP, for two subsets at once.
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x = torch.randn(128, 2)
    c = _copied("estimator")
    subsets = [{"0.weight": None}, {"2.weight": None, "2.bias": None}]
    cfg = dict(step_size=1e-3, nbeta=50.0, batch_size=16, steps=30, burn_in=10, chains=3)
    y = torch.sin(x.sum(1, keepdim=True))
    ours = c["estimate_llc"](mlp, torch.nn.functional.mse_loss, c["dataset_batches"](x, y, 16), subsets,
                             c["LLCConfig"](**cfg))
    theirs = P.estimate_llc(mlp, torch.nn.functional.mse_loss, P.dataset_batches(x, y, 16), subsets, P.LLCConfig(**cfg))
    for a, b in zip(ours, theirs):
        assert torch.equal(a.traces, b.traces) and torch.equal(a.w0_traces, b.w0_traces) and a.llc == b.llc


def test_the_power_law_fit_copies_out_as_one_block():
    # Proves fit_power_law alone (with numpy and scipy) gives physim's Table 5 row.
    t = np.geomspace(100, 64_000, 40)
    c_t = 2.0 * t ** -0.3 * np.exp(0.05 * np.random.default_rng(0).standard_normal(40))
    assert asdict(_copied("power law")["fit_power_law"](t, c_t, 1000, 50_000)) == asdict(P.fit_power_law(t, c_t, 1000, 50_000))


# ----------------------------------------------------------------------------------------------------
# 11. The CUDA path, exercised on the CPU: no host-device round trip per step
# ----------------------------------------------------------------------------------------------------

# Tensor methods that, on a CUDA tensor, make the host wait for the device (a round trip).
SYNCING = ("item", "tolist", "numpy", "cpu", "nonzero", "__bool__", "__float__", "__int__", "__index__", "__format__")


@pytest.fixture
def host_syncs(monkeypatch):
    """Counts, per line of physim.py, the calls of SYNCING methods made there (torch's own internal
    calls are not counted): a Counter {line number: calls}. Host-to-device copies (.to(device)) are
    not counted: on the CPU they cannot be told from no-ops (dataset_batches' are tested apart)."""
    import collections
    import sys
    counts = collections.Counter()
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename == P.__file__:
                counts[sys._getframe(1).f_lineno] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def _per_step_syncs(counts, steps: int) -> dict:
    """The lines of physim.py that synchronised at least once per step: {line: calls}."""
    return {line: n for line, n in counts.items() if n >= steps}


def test_the_detector_sees_a_per_step_sync(host_syncs):
    # Proves the detector below can fail: a physim line that reads a tensor's value on the host
    # (head_class compares it with a threshold: Tensor.__bool__) once a step is caught.
    for step in range(30):
        P.head_class(torch.tensor(0.1 * (step % 10)))
    assert len(_per_step_syncs(host_syncs, 30)) >= 1


def test_hot_loops_make_no_host_sync_per_step(host_syncs, tmp_path):
    # Proves the simulator, the training loop, rollout and SGLD make no host-device round trip per
    # step: no line of physim.py synchronises as often as once a step (syncs at checkpoints and
    # after the loop are fine). On the CPU nothing waits, but the same code runs on CUDA.
    steps = 60
    sim = P.SimConfig(n_particles=6, n_steps=16, box_width=5.0, box_height=5.0)
    p, v = P.random_initial_state(sim, 2, torch.Generator().manual_seed(0))
    P.simulate(p, v, sim, steps)
    assert _per_step_syncs(host_syncs, steps) == {}, "simulate"

    host_syncs.clear()
    train_cfg = P.TrainConfig(steps=steps, batch_size=8, log_checkpoints=2, even_checkpoints=2)
    model = R.train_run(str(tmp_path), sim, TINY_MODEL, train_cfg, P.DataConfig(chunk_trajectories=2,
                                                                            heldout_states=8))
    assert _per_step_syncs(host_syncs, steps) == {}, "train"

    host_syncs.clear()
    P.rollout(model, torch.cat([p, v], -1), steps)
    assert _per_step_syncs(host_syncs, steps) == {}, "rollout"

    for data in (P.simulator_batches(sim, P.DataConfig(chunk_trajectories=2), 4),
                 P.dataset_batches(*P.simulate_states(sim, 2, seed=1)[:, :2].unbind(1), batch_size=4)):
        host_syncs.clear()
        cfg = P.LLCConfig(step_size=1e-4, nbeta=100.0, batch_size=4, steps=steps, burn_in=30, chains=2)
        P.estimate_llc(model, F_mse, data, [P.head_parameters(model, 0, 0), P.head_parameters(model, 1, 1)], cfg)
        assert _per_step_syncs(host_syncs, steps) == {}, "estimate_llc"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_numbers(tmp_path):
    # Proves, where a GPU is present, that the simulator, a short training run with its head metrics
    # (also interrupted and resumed), and SGLD run on CUDA and agree with the CPU (float32 on both,
    # TF32 off; SGLD draws its noise from CUDA generators there, so only its traces' finiteness is checked).
    p, v = P.random_initial_state(TRAIN_SIM, 4, torch.Generator().manual_seed(0))
    on_cpu, on_gpu = P.simulate(p, v, TRAIN_SIM, 50), P.simulate(p.cuda(), v.cuda(), TRAIN_SIM, 50)
    torch.testing.assert_close(on_gpu[0].cpu(), on_cpu[0], rtol=1e-4, atol=1e-4)

    cfg = P.TrainConfig(steps=20, batch_size=8, log_checkpoints=4, even_checkpoints=2)
    R.train_run(str(tmp_path / "cpu"), TRAIN_SIM, TINY_MODEL, cfg, TRAIN_DATA, "cpu")
    model = R.train_run(str(tmp_path / "cuda"), TRAIN_SIM, TINY_MODEL, cfg, TRAIN_DATA, "cuda")
    R.train_run(str(tmp_path / "resumed"), TRAIN_SIM, TINY_MODEL, cfg, TRAIN_DATA, "cuda", stop_at=P.checkpoint_steps(cfg)[2])
    R.train_run(str(tmp_path / "resumed"), TRAIN_SIM, TINY_MODEL, cfg, TRAIN_DATA, "cuda")       # resumes on CUDA
    for other in ("cpu", "resumed"):
        for name, column in (("losses.csv", "heldout_loss"), ("metrics.csv", "collision_score")):
            a, b = read_csv(tmp_path / other / name), read_csv(tmp_path / "cuda" / name)
            assert np.allclose([float(r[column]) for r in a], [float(r[column]) for r in b], rtol=1e-3, atol=1e-4), (other, name)

    data = P.simulator_batches(TRAIN_SIM, P.DataConfig(chunk_trajectories=2), 4, device="cuda")
    results = P.estimate_llc(model, F_mse, data, [P.head_parameters(model, 0, 0), P.head_parameters(model, 1, 1)],
                             P.LLCConfig(step_size=1e-5, nbeta=100.0, batch_size=4, steps=40, burn_in=20, chains=2))
    assert all(torch.isfinite(r.traces).all() and r.traces.device.type == "cpu" for r in results)


# ----------------------------------------------------------------------------------------------------
# 12. reproduce.py: a run's folder, checkpoints and resume
# ----------------------------------------------------------------------------------------------------

def test_short_training_lowers_loss_and_writes_csvs(trained_run):
    # Proves training learns (held-out loss at the end well below step 0, train loss falling) and
    # that metrics.csv / losses.csv hold one row per checkpoint (x layer x head) with the right columns.
    run_dir, _ = trained_run
    schedule = P.checkpoint_steps(TRAIN_CFG)
    L, H = TINY_MODEL.n_blocks, TINY_MODEL.n_heads

    losses = read_csv(os.path.join(run_dir, "losses.csv"))
    assert list(losses[0]) == ["step", "train_loss", "heldout_loss"]
    assert [int(row["step"]) for row in losses] == schedule
    heldout = [float(row["heldout_loss"]) for row in losses]
    train_loss = [float(row["train_loss"]) for row in losses]
    assert math.isnan(train_loss[0])                                 # no training before step 0
    assert heldout[-1] < 0.2 * heldout[0]                            # ~0.03 observed
    assert train_loss[-1] < train_loss[1]

    metrics = read_csv(os.path.join(run_dir, "metrics.csv"))
    assert list(metrics[0]) == ["step", "layer", "head", "collision_score", "collision_score_se", "correlation",
                                "correlation_se", "correlation_first_half", "correlation_second_half"]
    assert len(metrics) == len(schedule) * L * H
    assert [(int(r["step"]), int(r["layer"]), int(r["head"])) for r in metrics] == \
        [(s, l, h) for s in schedule for l in range(L) for h in range(H)]
    for row in metrics:
        assert 0.0 <= float(row["collision_score"]) <= 1.0
        assert -1.0 <= float(row["correlation"]) <= 1.0
        assert float(row["collision_score_se"]) >= 0 and float(row["correlation_se"]) >= 0
    assert max(float(row["correlation_se"]) for row in metrics) > 0

    # disk: two full checkpoints (the latest and the one before), and half-precision weights at every
    # checkpoint step
    assert R.saved_checkpoints(run_dir) == [R.checkpoint_path(run_dir, s) for s in (schedule[-1], schedule[-2])]
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == \
        sorted(os.path.basename(R.checkpoint_path(run_dir, s)) for s in schedule[-2:])
    for step in schedule:
        weights = R.load_torch(R.weights_path(run_dir, step))
        assert weights["step"] == step and all(v.dtype == torch.float16 for v in weights["model"].values())


def test_half_precision_weights_leave_the_analysis_unchanged(trained_run):
    # Proves the analyses that read the kept weights tolerate their half precision: head metrics
    # within 2e-3 of the float32 model's, held-out loss within 1%, and the LLC of a head within 3%.
    run_dir, model = trained_run
    half = R.model_from_checkpoint(R.load_torch(R.weights_path(run_dir, TRAIN_CFG.steps)))
    x, y = P.heldout_set(TRAIN_SIM, TRAIN_DATA)
    resamples = P.bootstrap_weights(len(x), 8)
    m32, m16 = P.head_metrics(model, x, y, resamples), P.head_metrics(half, x, y, resamples)
    for key in ("collision_score", "correlation"):
        torch.testing.assert_close(m16[key], m32[key], atol=2e-3, rtol=0)
    assert m16["heldout_loss"] == pytest.approx(m32["heldout_loss"], rel=1e-2)
    cfg = P.LLCConfig(batch_size=16, steps=60, burn_in=30, chains=2)
    data = P.dataset_batches(x, y, 16)
    llc32, llc16 = (P.estimate_llc(m, F_mse, data, P.head_parameters(m, 1, 0), cfg) for m in (model, half))
    assert np.allclose(llc16.chain_llc, llc32.chain_llc, rtol=0.03), (llc16.chain_llc, llc32.chain_llc)


def test_head_metrics_measure_c_on_each_half_of_the_heldout_set(trained_run):
    # Proves the two independent held-out sets of error_correlation: c on the first and on the second half
    # of the held-out states equals c measured on that half alone.
    _, model = trained_run
    x, y = P.heldout_set(TRAIN_SIM, TRAIN_DATA)
    both, n = P.head_metrics(model, x, y, P.bootstrap_weights(len(x), 4)), len(x) // 2
    for key, part in (("correlation_first_half", slice(0, n)), ("correlation_second_half", slice(n, None))):
        alone = P.head_metrics(model, x[part], y[part], P.bootstrap_weights(n, 4))
        torch.testing.assert_close(both[key], alone["correlation"], rtol=0, atol=1e-6)
    assert not torch.allclose(both["correlation_first_half"], both["correlation_second_half"])


def test_compile_falls_back_to_eager_where_it_fails(tmp_path, monkeypatch, capsys):
    # Proves --compile degrades cleanly: where torch.compile fails, one warning line and the run
    # trains eagerly to the same weights as without the flag.
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(torch, "compile", broken)
    cfg = P.TrainConfig(steps=6, batch_size=8, log_checkpoints=2, even_checkpoints=1)
    eager = R.train_run(str(tmp_path / "eager"), TRAIN_SIM, TINY_MODEL, cfg, TRAIN_DATA)
    fallback = R.train_run(str(tmp_path / "fallback"), TRAIN_SIM, TINY_MODEL, cfg, TRAIN_DATA, compile_model=True)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "torch.compile" in warnings[0]
    for a, b in zip(eager.state_dict().values(), fallback.state_dict().values()):
        assert torch.equal(a, b)


def test_interrupted_run_resumes_bit_identically(trained_run, tmp_path, capsys):
    # Proves an interrupted run (stop_at a checkpoint, then a second call) ends in exactly the same
    # weights and CSVs as the uninterrupted run, also when its latest checkpoint is damaged (the one
    # before is kept for that), that no readable checkpoint is one clear error, and that resuming
    # under another config is refused.
    run_dir, model = trained_run
    resumed_dir = str(tmp_path / "resumed")
    stop = P.checkpoint_steps(TRAIN_CFG)[3]
    assert 0 < stop < TRAIN_CFG.steps

    R.train_run(resumed_dir, TRAIN_SIM, TINY_MODEL, TRAIN_CFG, TRAIN_DATA, stop_at=stop)
    previous = P.checkpoint_steps(TRAIN_CFG)[2]
    assert R.saved_checkpoints(resumed_dir) == [R.checkpoint_path(resumed_dir, s) for s in (stop, previous)]
    assert max(int(r["step"]) for r in read_csv(os.path.join(resumed_dir, "metrics.csv"))) == stop
    # A damaged latest checkpoint (a disk filled while copying) costs one warning naming it: the run
    # resumes from the previous one and still ends bit-identical.
    latest = R.checkpoint_path(resumed_dir, stop)
    with open(latest, "r+b") as f:
        f.truncate(os.path.getsize(latest) // 2)
    capsys.readouterr()

    resumed = R.train_run(resumed_dir, TRAIN_SIM, TINY_MODEL, TRAIN_CFG, TRAIN_DATA)
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and latest in warned[0] and "damaged" in warned[0], warned
    expected, got = model.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    for name in ("metrics.csv", "losses.csv"):
        with open(os.path.join(run_dir, name)) as f1, open(os.path.join(resumed_dir, name)) as f2:
            assert f1.read() == f2.read(), name

    other = P.TrainConfig(steps=100, batch_size=8, lr=2e-3, log_checkpoints=4, even_checkpoints=2)
    with pytest.raises(ValueError, match="different configuration"):
        R.train_run(resumed_dir, TRAIN_SIM, TINY_MODEL, other, TRAIN_DATA)
    for path in R.saved_checkpoints(resumed_dir):
        open(path, "wb").close()                                             # both empty
    with pytest.raises(ValueError, match="no checkpoint of .* can be read"):
        R.train_run(resumed_dir, TRAIN_SIM, TINY_MODEL, TRAIN_CFG, TRAIN_DATA)


def test_checkpoints_load_weights_only_and_rebuild_the_model(trained_run):
    # Proves a checkpoint loads with weights_only=True and model_from_checkpoint rebuilds the exact
    # trained model (same outputs as the model train returned).
    run_dir, model = trained_run
    path = R.saved_checkpoints(run_dir)[0]
    assert path == R.checkpoint_path(run_dir, TRAIN_CFG.steps)
    torch.load(path, weights_only=True)                              # raises if anything is unsafe
    ckpt = R.load_torch(path)
    assert ckpt["step"] == TRAIN_CFG.steps

    rebuilt = R.model_from_checkpoint(ckpt)
    x, _ = P.heldout_set(TRAIN_SIM, TRAIN_DATA)
    with torch.no_grad():
        assert torch.equal(rebuilt(x[:8]), model(x[:8]))
    # and it is not just any model: a fresh one predicts something else
    torch.manual_seed(123)
    fresh = P.ParticleTransformer(TINY_MODEL, TRAIN_SIM).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(x[:8]), model(x[:8]))


@pytest.mark.parametrize("stop_at", [13, 37])   # inside the first noise block of 32 steps, and inside the second
@pytest.mark.parametrize("how", ["interrupt", "crash"])
def test_interrupted_llc_estimate_resumes_from_its_saved_state(monkeypatch, tmp_path, stop_at, how):
    # Proves reproduce's resumable estimate: an estimate stopped after `stop_at` of its 40 steps has its
    # chains saved, by the KeyboardInterrupt handler ("interrupt") or, where the process dies without
    # one ("crash": another error, with a save due after every step), by the periodic save; the next
    # call runs only the 40 - stop_at steps left and gives exactly the uninterrupted traces and λ̂
    # (noise, replayed to its block, data and w − w₀ all continue); the finished state then returns the
    # same at once, without a step. A state saved for other settings is refused in one line naming the
    # file. The data sources start at any minibatch.
    if how == "crash":
        monkeypatch.setattr(R, "LLC_SAVE_SECONDS", -1.0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2 ** 14), torch.nn.Tanh(), torch.nn.Linear(2 ** 14, 1))  # noise blocks of 32, 64 steps
    x = torch.randn(256, 2)
    data = P.dataset_batches(x, torch.sin(x.sum(1, keepdim=True)), 16, block=8)
    wide = torch.randn(64, 2 ** 16)             # 2^20 numbers a minibatch: gathered 4 minibatches at a time, < a block
    for source in (data, P.dataset_batches(wide, wide[:, 0], 16, block=8),
                   P.simulator_batches(TRAIN_SIM, P.DataConfig(chunk_trajectories=1), 4)):
        whole = source(3)
        skipped = [next(whole) for _ in range(stop_at + 1)][-1]
        assert all(torch.equal(a, b) for a, b in zip(next(source(3, stop_at)), skipped))
    subsets = [{"0.weight": None}, {"2.weight": None, "2.bias": None}]
    cfg = P.LLCConfig(step_size=1e-4, nbeta=50.0, batch_size=16, steps=40, burn_in=20, chains=3)
    mse = torch.nn.functional.mse_loss
    whole = P.estimate_llc(model, mse, data, subsets, cfg)
    batches, stop = [], True

    def stopping(seed, start=0):                # chain 0's data source stops the estimate at step stop_at
        for i, b in enumerate(data(seed, start), start):
            if seed == cfg.seed:
                batches.append(i)
                if i == stop_at and stop:
                    raise KeyboardInterrupt if how == "interrupt" else RuntimeError("the node died")
            yield b
    path = str(tmp_path / "state.pt")
    with pytest.raises(KeyboardInterrupt if how == "interrupt" else RuntimeError):
        R.estimate_llc_resumable(model, mse, stopping, subsets, cfg, path)
    assert torch.load(path, weights_only=True)["step"] == stop_at
    with pytest.raises(ValueError, match="state.pt"):
        R.estimate_llc_resumable(model, mse, data, subsets[:1], cfg, path)
    batches.clear()
    stop = False
    resumed = R.estimate_llc_resumable(model, mse, stopping, subsets, cfg, path)
    assert batches == list(range(stop_at, cfg.steps)) and torch.load(path, weights_only=True)["step"] == cfg.steps
    batches.clear()
    again = R.estimate_llc_resumable(model, mse, stopping, subsets, cfg, path)
    assert batches == []
    for w, r, a in zip(whole, resumed, again):
        assert torch.equal(w.traces, r.traces) and torch.equal(w.w0_traces, r.w0_traces)
        assert w.llc == r.llc == a.llc and P.llc_health(w) == P.llc_health(r) == P.llc_health(a)
        assert torch.equal(a.traces, w.traces)
        torch.testing.assert_close(r.acceptance, w.acceptance, rtol=0, atol=0, equal_nan=True)   # MALA's too


def test_llc_heads_are_the_true_heads_then_a_partial_and_a_quiet_control():
    # Proves which heads the LLC stage samples: the n best true heads, the best partial head and the head
    # of the best head's block nearest 0 (each once; not the block-1 head nearer 0); with no true head, the
    # best head stands in.
    score = np.array([[0.9, 0.5, 0.02, 0.95], [0.4, -0.01, 0.85, 0.1]])
    assert R.llc_heads(score, 2) == [(0, 3), (0, 0), (0, 1), (0, 2)]
    assert R.llc_heads(score, 8) == [(0, 3), (0, 0), (1, 2), (0, 1), (0, 2)]
    assert R.llc_heads(score[::-1], 1) == [(1, 3), (1, 1), (1, 2)]
    assert R.llc_heads(np.array([[0.5, 0.02]]), 3) == [(0, 0), (0, 1)]


def test_llc_scope_formed_drops_true_heads_before_they_form_and_keeps_the_controls():
    # Proves --llc-scope: "all" samples every LLC head at every checkpoint; "formed" samples a true head
    # from the first checkpoint at which its score reaches 0.3 (not before), the controls at every one.
    steps = np.array([100, 200, 400])
    score = np.zeros((3, 1, 4))
    score[:, 0, 0] = [0.1, 0.3, 0.9]          # true, forms at step 200
    score[:, 0, 1] = [0.0, 0.29, 0.85]        # true, forms at step 400
    score[:, 0, 2] = [0.1, 0.5, 0.6]          # the partial control
    score[:, 0, 3] = [0.2, 0.0, 0.01]         # the quiet control
    m = R.Metrics(steps, score, score, score, score, np.stack([score, score], 1))
    every = R.Preset(llc_heads=2)
    formed = R.replace(every, llc_scope="formed")
    assert [R.scoped_heads(every, m, s) for s in steps] == [[(0, 0), (0, 1), (0, 2), (0, 3)]] * 3
    assert [R.scoped_heads(formed, m, s) for s in steps] == [[(0, 2), (0, 3)], [(0, 0), (0, 2), (0, 3)],
                                                             [(0, 0), (0, 1), (0, 2), (0, 3)]]
    with pytest.raises(ValueError, match="LLC scope must be one of all, formed"):
        R.Preset(llc_scope="some")


def test_a_folder_from_before_a_setting_existed_reads_it_at_its_default(tmp_path):
    # Proves config.json written before Preset.llc_scope existed reads as the behaviour it had ("all"), and
    # check_config accepts it for the same preset.
    config = asdict(R.SCALED)
    del config["llc_scope"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert R.preset_from_config(str(tmp_path)) == R.SCALED
    R.check_config(R.SCALED, str(tmp_path))


def test_eta_weighs_each_kind_of_work_by_its_own_cost():
    # Proves the training ETA counts what is left of each kind of work at that kind's measured cost:
    # 10 steps of 0.1 s and 1 checkpoint of 3 s done leave 90 steps and 4 checkpoints: 9 + 12 = 21 s
    # (a plain rate of 11 units in 4 s would say 94 units x 0.36 s = 34 s); a kind never timed is unknown.
    clock = R.WorkClock()
    for _ in range(10):
        clock.add("step", 0.1)
    clock.add("checkpoint", 3.0)
    assert clock.eta({"step": 90, "checkpoint": 4}) == pytest.approx(21.0)
    assert clock.eta({"step": 0, "checkpoint": 0}) == 0.0
    assert math.isnan(clock.eta({"step": 1, "data chunk": 2}))


# ----------------------------------------------------------------------------------------------------
# 13. reproduce.py end to end on a tiny preset: interruptions, bad inputs, shards
# ----------------------------------------------------------------------------------------------------

# A tiny preset: everything reproduce.py does, in seconds.
TINY_PRESET_ARGS = dict(sim=TRAIN_SIM, model=TINY_MODEL, data=TRAIN_DATA, rollout_states=2, rollout_steps=10,
                        train=P.TrainConfig(steps=20, batch_size=8, log_checkpoints=8, even_checkpoints=4),
                        llc=P.LLCConfig(batch_size=4, steps=12, burn_in=6, chains=2), llc_checkpoints=2)


def test_reproduce_end_to_end_and_resume(tmp_path, capsys, monkeypatch):
    # Proves the whole pipeline (train, rollout, LLC, figures, tables) runs and writes what the README
    # lists, that the LLC samples with the preset's loss convention, and that re-running into the same
    # folder resumes (nothing is retrained) with equal results.
    import reproduce as R
    preset = R.Preset(runs=2, llc_heads=1, **TINY_PRESET_ARGS)
    out = str(tmp_path / "out")
    criteria, estimate = [], P.estimate_llc
    monkeypatch.setattr(P, "estimate_llc", lambda model, criterion, *a, **k: criteria.append(criterion) or
                        estimate(model, criterion, *a, **k))
    capsys.readouterr()
    shard = R.reproduce(preset, out, "cpu", runs=[1])                    # one shard, as one Slurm task would
    assert criteria and set(criteria) == {R.LLC_LOSSES[preset.llc_loss]} == {P.squared_error}
    assert shard["runs"] == [1] and not os.path.exists(os.path.join(out, "run0"))
    projected = capsys.readouterr().err.splitlines()[0]                 # a fresh start says what to expect first
    assert projected.startswith("projected on this cpu: ") and "for 1 run(s) (training " in projected and "LLC " in projected
    first = R.reproduce(preset, out, "cpu")                              # the other shard; the report merges
    assert first["runs"] == [0, 1] and "projected" not in capsys.readouterr().err      # run 1 had begun
    for name in ("config.json", "final_heads.csv", "summary.json", "figures/collision_scores.png",
                 "figures/energy.png", "figures/attention_run1.png", "figures/correlation_run0.png",
                 "run0/metrics.csv", "run0/losses.csv", "run0/simulator.json", "run1/llc.csv",
                 "REPORT.md", "table5.csv", "regimes.csv", "claims.json", "timings.json",
                 "figures/head_classes.png", "figures/exponents.png", "figures/power_laws_run1.png",
                 "figures/collision_scores_run1.png"):
        assert os.path.exists(os.path.join(out, name)), name
    assert any(n.startswith("moving_particle_run1") for n in os.listdir(os.path.join(out, "figures")))
    assert any(n.startswith("fig1_run1_head") for n in os.listdir(os.path.join(out, "figures")))
    from PIL import Image                                                 # the rollout GIF: a frame every 5 steps
    with Image.open(os.path.join(out, "figures", "rollout_run1.gif")) as gif:
        assert gif.format == "GIF" and gif.n_frames == len(range(0, preset.rollout_steps + 1, 5))
    report = open(os.path.join(out, "REPORT.md")).read()
    assert "(figures/rollout_run0.gif)" in report and "(figures/rollout_run1.gif)" in report
    assert "## The paper's claims, checked" in report and "Table 5" in report
    assert len(read_csv(os.path.join(out, "regimes.csv"))) >= 2 * 2 * 2           # every head has pieces
    assert any(n.startswith("llc_traces_run0") for n in os.listdir(os.path.join(out, "figures")))
    # REPORT.md's numbers are the CSVs': the head counts, every LLC estimate and every Table 5 row
    finals = read_csv(os.path.join(out, "final_heads.csv"))
    count = {c: sum(r["class"] == c for r in finals) for c in ("true", "partial")}
    assert f"Ours: {count['true']} true and {count['partial']} partial of {len(finals)} heads" in report
    for run in (0, 1):
        for r in read_csv(os.path.join(out, f"run{run}", "llc.csv")):
            assert f"| {run} | {r['step']} | {r['layer']}-{r['head']} | {float(r['llc']):.3g} ± " in report, r
    for r in read_csv(os.path.join(out, "table5.csv")):
        assert f"{float(r['exponent']):+.3f} ± {float(r['exponent_ci']):.3f}" in report, r
    stamp = os.path.getmtime(os.path.join(out, "run0", "simulator.json"))
    second = R.reproduce(preset, out, "cpu")
    assert os.path.getmtime(os.path.join(out, "run0", "simulator.json")) == stamp
    assert {k: v for k, v in first.items() if k != "wall_seconds_this_call"} == \
           {k: v for k, v in second.items() if k != "wall_seconds_this_call"}
    with pytest.raises(ValueError, match="different configuration"):                 # training settings: never
        R.check_config(R.Preset(**{**preset.__dict__, "rollout_steps": preset.rollout_steps + 1}), out)
    other = R.Preset(**{**preset.__dict__, "llc_heads": preset.llc_heads + 1})
    with pytest.raises(ValueError, match=r"other LLC settings \(llc_heads\); delete .*llc to re-estimate"):
        R.check_config(other, out)                                   # LLC settings: not while estimates exist ...
    moved = str(tmp_path / "no_llc")
    shutil.copytree(out, moved, ignore=shutil.ignore_patterns("llc"))
    R.check_config(other, moved)                                     # ... but without them config.json takes them
    assert R.preset_from_config(moved) == other and R.preset_from_config(out) == preset
    # --report rebuilds everything from the saved results, without training
    os.remove(os.path.join(out, "REPORT.md"))
    assert R.main(["--report", out, "--device", "cpu"]) == 0
    assert os.path.exists(os.path.join(out, "REPORT.md"))
    assert os.path.getmtime(os.path.join(out, "run0", "simulator.json")) == stamp
    # calibrate probes the preset's ε x CALIBRATION_FACTORS at the run's LLC checkpoints, for its LLC heads,
    # and selects by calibrate_llc's rule, recomputed here from calibration.csv
    capsys.readouterr()
    assert R.main(["calibrate", "--out", out, "--device", "cpu"]) == 0
    record = json.load(open(os.path.join(out, "calibration.json")))
    assert capsys.readouterr().out.strip() == record["statement"]
    rows = read_csv(os.path.join(out, "calibration.csv"))
    grid = sorted({float(r["step_size"]) for r in rows})
    assert grid == pytest.approx([preset.llc.step_size * f for f in R.CALIBRATION_FACTORS])
    assert len(rows) == len(grid) * len({r["step"] for r in rows}) * 2 and os.path.exists(
        os.path.join(out, "figures", "calibration.png"))
    passing = [e for e in grid if all(r["passes"] == "True" for r in rows if float(r["step_size"]) == e)]
    assert record["step_size"] == (pytest.approx(max(passing)) if passing else None)
    # ... or the ε, T and checkpoints it is given
    last = max(int(r["step"]) for r in rows)
    assert R.main(["calibrate", "--out", out, "--device", "cpu", "--step-sizes", "1e-3,2e-3", "--llc-steps", "12",
                   "--checkpoints", str(last)]) == 0
    rows, record = read_csv(os.path.join(out, "calibration.csv")), json.load(open(os.path.join(out, "calibration.json")))
    assert {(float(r["step_size"]), int(r["step"])) for r in rows} == {(1e-3, last), (2e-3, last)} and record["chain_steps"] == 12
    # --report judges the saved chains again by this code's rule (select_sampler): a tampered verdict is restored
    R.write_csv(os.path.join(out, "calibration.csv"), [{**r, "passes": "x", "doubling_z": "9"} for r in rows])
    again = R.rejudge_calibration(out, preset)
    assert read_csv(os.path.join(out, "calibration.csv")) == rows and json.load(open(os.path.join(out, "calibration.json"))) == record
    assert again.statement == record["statement"]
    R.write_csv(os.path.join(out, "calibration.csv"), [{**r, "llc": "?"} for r in rows])
    capsys.readouterr()
    assert R.main(["--report", out, "--device", "cpu"]) == 2 and "calibration.csv is damaged" in _one_error_line(capsys)
    os.remove(os.path.join(out, "calibration.csv"))
    for bad in (["--checkpoints", "3"], ["--step-sizes", "1e-3,x"], ["--step-sizes", "-1"], ["--llc-steps", "2"]):
        capsys.readouterr()
        assert R.main(["calibrate", "--out", out, "--device", "cpu"] + bad) == 2
        assert _one_error_line(capsys).startswith("error: --"), bad
    assert R.main(["--runs", "0,7", "--out", str(tmp_path / "new")]) == 2
    assert "run 7 does not exist" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "new" / "config.json")          # refused before anything is written
    assert R.main(["--report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "config.json" in err[0]


@pytest.fixture(scope="module")
def finished_tiny_run(tmp_path_factory):
    """A finished run of the tiny preset (as `python reproduce.py` with R.SCALED = it), for the tests
    that damage its files or interrupt it."""
    import reproduce as R
    preset = R.Preset(runs=1, llc_heads=1, **TINY_PRESET_ARGS)
    out = str(tmp_path_factory.mktemp("finished") / "out")
    R.reproduce(preset, out, "cpu")
    return preset, out


def _assert_same_results(done: str, out: str) -> None:
    """The results folder `out` ends with the numbers of the finished run `done`, file for file."""
    for name in ("run0/metrics.csv", "run0/losses.csv", "run0/llc.csv", "final_heads.csv", "claims.json"):
        with open(os.path.join(done, name)) as f1, open(os.path.join(out, name)) as f2:
            assert f1.read() == f2.read(), name


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def _last_line(capsys) -> str:
    """The last line on stderr, after the progress lines of a run; and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.replace("\r", "\n").strip().splitlines()[-1]


@pytest.mark.parametrize("name", ["config.json", "timings.json", "run0/metrics.csv", "run0/losses.csv",
                                  "run0/llc.csv", "run0/simulator.json", "run0/checkpoints"])
def test_a_damaged_file_is_one_error_line_naming_it(finished_tiny_run, tmp_path, capsys, name):
    # Proves every file --report reads back, when damaged (cut in half, as by a full disk), ends the
    # call with one "error:" line that names it, exit code 2, no traceback. (A damaged latest checkpoint
    # alone is recovered from: test_interrupted_run_resumes_bit_identically; here both are damaged.)
    import reproduce as R
    out = str(tmp_path / "out")
    shutil.copytree(finished_tiny_run[1], out)
    paths = sorted(glob.glob(os.path.join(out, name, "*.pt"))) or [os.path.join(out, name)]
    for path in paths:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    capsys.readouterr()
    assert R.main(["--report", out, "--device", "cpu"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("error:") and os.path.join(out, name) in line, line


def test_bad_output_folders_and_unused_flags_are_one_error_line(tmp_path, capsys):
    # Proves an --out that is a file, and flags a command does not use, end with one line and exit 2.
    import reproduce as R
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert R.main(["--out", str(a_file)]) == 2
    assert "is a file, not a folder" in _one_error_line(capsys)
    for argv, flag in ((["bench", "--runs", "0"], "--runs"), (["bench", "--full"], "--full"),
                       (["calibrate", "--compile"], "--compile"), (["--llc-steps", "10"], "--llc-steps")):
        assert R.main(argv + ["--out", str(tmp_path / "x")]) == 2
        line = _one_error_line(capsys)
        assert line.startswith("error:") and f"does not use {flag}" in line, line
    assert R.main(["--full", "--medium", "--out", str(tmp_path / "x")]) == 2
    assert "--full and --medium" in _one_error_line(capsys)


def test_reproduce_bad_arguments_give_one_error_line(capsys):
    # Proves a bad flag value ends with one clear line and a non-zero exit, not a traceback.
    import reproduce as R
    with pytest.raises(SystemExit):
        R.main(["--device", "tpu"])
    assert "invalid choice" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert R.main(["--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and "CUDA" in err[0]


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_stop_with_one_line_and_the_run_resumes(finished_tiny_run, tmp_path, capsys,
                                                                   monkeypatch, how):
    # Proves Ctrl-C (KeyboardInterrupt) or a scheduler's SIGTERM during training prints one line
    # naming the step and run, exits 130, and that re-running the same command ends with the numbers
    # of an uninterrupted run; the same in the LLC stage.
    import signal
    import reproduce as R
    preset, done = finished_tiny_run
    monkeypatch.setattr(R, "SCALED", preset)
    out = str(tmp_path / "out")
    step, calls = P.training_step, []

    def interrupted_at_7(*a, **k):
        calls.append(1)
        if len(calls) == 8:                                  # during step 7 (steps count from 0)
            if how == "ctrl-c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
        return step(*a, **k)
    monkeypatch.setattr(P, "training_step", interrupted_at_7)
    capsys.readouterr()
    assert R.main(["--out", out, "--device", "cpu"]) == 130
    assert _last_line(capsys) == "interrupted at step 7 of run 0; re-run the same command to resume"
    monkeypatch.setattr(P, "training_step", step)
    estimate, estimates = P.estimate_llc, []

    def interrupted_llc(*a, **k):
        estimates.append(1)
        if len(estimates) == 2:
            raise KeyboardInterrupt
        return estimate(*a, **k)
    monkeypatch.setattr(P, "estimate_llc", interrupted_llc)
    assert R.main(["--out", out, "--device", "cpu"]) == 130
    assert _last_line(capsys) == "interrupted in the LLC stage of run 0; re-run the same command to resume"
    monkeypatch.setattr(P, "estimate_llc", estimate)
    assert R.main(["--out", out, "--device", "cpu"]) == 0
    _assert_same_results(done, out)


KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import physim as P, reproduce as R, test_physim as T
R.PROJECT_FIRST = False
R.SCALED = R.Preset(runs=1, llc_heads=1, **T.TINY_PRESET_ARGS)
where, calls = os.environ.get("KILL_AT"), []

def die(original, n):                        # kill -9 ourselves on the n-th call
    def call(*a, **k):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*a, **k)
    return call

def cut_short(path, write):                  # killed while writing the 4th checkpoint: half a file
    if path.endswith(".pt") and "checkpoints" in path and len(calls) == 3:
        write(path + ".tmp")
        with open(path + ".tmp", "r+b") as f:
            f.truncate(os.path.getsize(path + ".tmp") // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    if path.endswith(".pt") and "checkpoints" in path:
        calls.append(1)
    return write_atomically(path, write)

if where == "training":
    P.training_step = die(P.training_step, 8)
elif where == "checkpoint write":
    write_atomically, R._write = R._write, cut_short
elif where == "LLC":
    P.estimate_llc = die(P.estimate_llc, 2)
sys.exit(R.main(["--out", sys.argv[1], "--device", "cpu"]))
"""


@pytest.mark.parametrize("where", ["training", "checkpoint write", "LLC"])
def test_kill_9_at_any_moment_leaves_a_folder_that_resumes(finished_tiny_run, tmp_path, where):
    # Proves a real `reproduce.py` process killed with SIGKILL (no handler runs) during training,
    # in the middle of writing a checkpoint, or during the LLC stage leaves a folder from which the
    # same command resumes and ends with the files of an uninterrupted run.
    import subprocess
    import sys
    _, done = finished_tiny_run
    out = str(tmp_path / "out")
    script = KILLED_RUN.format(repo=os.path.dirname(os.path.abspath(__file__)))
    killed = subprocess.run([sys.executable, "-c", script, out], env={**os.environ, "KILL_AT": where},
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = subprocess.run([sys.executable, "-c", script, out], env={**os.environ, "KILL_AT": ""},
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_results(done, out)


STOPPED_RUN = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
import physim as P, reproduce as R, test_physim as T
R.PROJECT_FIRST = False
R.SCALED = R.Preset(runs=1, llc_heads=1, **T.TINY_PRESET_ARGS)
where, calls, step, batches = os.environ.get("STOP_AT"), [], P.training_step, P.simulator_batches

def usr1_in_step_8(*a, **k):
    calls.append(1)
    if len(calls) == 8:
        os.kill(os.getpid(), signal.SIGUSR1)
    return step(*a, **k)

def slow_step(*a, **k):                      # 20 steps take 6 s: a 2 s limit stops training midway
    time.sleep(0.3)
    return step(*a, **k)

def usr1_mid_estimate(*a, **k):              # SIGUSR1 as chain 0 of the second estimate (12 steps each) reads step 5
    source = batches(*a, **k)
    def stream(seed, start=0):
        for i, b in enumerate(source(seed, start), start):
            if seed == R.SCALED.llc.seed:
                calls.append(i)
                if len(calls) == 12 + 6:
                    os.kill(os.getpid(), signal.SIGUSR1)
            yield b
    return stream

P.training_step = {{"SIGUSR1 in training": usr1_in_step_8, "--time-limit": slow_step}}.get(where, step)
P.simulator_batches = usr1_mid_estimate if where == "SIGUSR1 mid-estimate" else batches
sys.exit(R.main(["--out", sys.argv[1], "--device", "cpu"] + sys.argv[2:]))
"""


@pytest.mark.parametrize("where", ["SIGUSR1 in training", "SIGUSR1 mid-estimate", "--time-limit"])
def test_sigusr1_or_time_limit_stop_a_real_run_that_resumes(finished_tiny_run, tmp_path, where):
    # Proves a real `reproduce.py` process sent SIGUSR1 (Slurm's warning before a wall limit) during
    # training or in the middle of an LLC estimate, or reaching its --time-limit, stops with one line
    # saying so and exit status 75; midway through an estimate it has saved the chains (5 of 12 steps
    # done); and the same command then ends with the files of an uninterrupted run.
    import subprocess
    import sys
    _, done = finished_tiny_run
    out = str(tmp_path / "out")
    script = STOPPED_RUN.format(repo=os.path.dirname(os.path.abspath(__file__)))
    limit = ["--time-limit", "2s"] if where == "--time-limit" else []
    stopped = subprocess.run([sys.executable, "-c", script, out] + limit, env={**os.environ, "STOP_AT": where},
                             capture_output=True, text=True)
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    last = stopped.stderr.replace("\r", "\n").strip().splitlines()[-1]
    expected = {"SIGUSR1 in training": "stopped by SIGUSR1 at step 7 of run 0",
                "SIGUSR1 mid-estimate": "stopped by SIGUSR1 in the LLC stage of run 0",
                "--time-limit": "stopped by --time-limit 2s"}[where]   # at a step, unless the limit came first
    assert last.startswith(expected) and last.endswith("re-run the same command to resume"), last
    if where == "SIGUSR1 mid-estimate":
        states = glob.glob(os.path.join(out, "run0", "llc", "*.pt"))
        assert len(states) == 1 and torch.load(states[0], weights_only=True)["step"] == 5
    resumed = subprocess.run([sys.executable, "-c", script, out, "--time-limit", "1h"], env={**os.environ, "STOP_AT": ""},
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not glob.glob(os.path.join(out, "run0", "llc", "*.pt"))
    _assert_same_results(done, out)


def test_time_limit_durations():
    # Proves --time-limit reads the forms its help names, and refuses others in one line.
    import reproduce as R
    assert [R.parse_duration(t) for t in ("3h50m", "90m", "45s", "1h2m3s", "3:50:00")] == [13800, 5400, 45, 3723, 13800]
    for bad in ("", "3x", "h", "0s", "1:2"):
        with pytest.raises(ValueError, match="--time-limit"):
            R.parse_duration(bad)


def test_run_llc_batches_all_heads_after_a_checkpoint_with_fewer(finished_tiny_run, tmp_path, monkeypatch):
    # Proves run_llc batches every head of a checkpoint in one call even after a checkpoint that had fewer
    # (--llc-scope formed estimates the controls alone before the heads form): only a lack of memory
    # (llc_of_heads returning a smaller group) makes the later groups smaller.
    import reproduce as R
    preset, done = finished_tiny_run
    out = str(tmp_path / "out")
    shutil.copytree(done, out, ignore=shutil.ignore_patterns("llc", "llc.csv"))
    heads = R.llc_heads(R.read_metrics(R.run_dir(out, 0)).score[-1], 4)
    scoped = iter([heads[-1:], heads])
    monkeypatch.setattr(R, "scoped_heads", lambda p, m, step: next(scoped))
    calls, real = [], R.llc_of_heads
    monkeypatch.setattr(R, "llc_of_heads", lambda model, criterion, data, heads, cfg, group, **k: (
        calls.append((len(heads), group)) or real(model, criterion, data, heads, cfg, group, **k)))
    R.run_llc(R.replace(preset, llc_heads=4), R.run_dir(out, 0), "cpu", label=None)
    assert len(heads) > 1 and calls == [(1, 1), (len(heads), len(heads))], calls


def test_llc_shards_into_one_folder_equal_one_call_and_resume(finished_tiny_run, tmp_path, capsys, monkeypatch):
    # Proves `--llc-shard I/N`: two shards into one trained folder make the LLC files of one call
    # (every estimate and llc.csv), and a shard interrupted after its first estimate is not redone.
    import reproduce as R
    preset, done = finished_tiny_run                                   # 2 LLC checkpoints: 2 estimates
    monkeypatch.setattr(R, "SCALED", preset)
    out = str(tmp_path / "out")
    shutil.copytree(done, out, ignore=shutil.ignore_patterns("llc", "llc.csv", "config.json"))
    R.check_config(preset, out)
    whole = str(tmp_path / "whole")
    shutil.copytree(out, whole)
    R.run_llc(preset, R.run_dir(whole, 0), "cpu", label=None)                # one call does them all
    estimate, calls = P.estimate_llc, []

    def counted(*a, **k):
        calls.append(1)
        if interrupt_at == len(calls):
            raise KeyboardInterrupt
        return estimate(*a, **k)
    monkeypatch.setattr(P, "estimate_llc", counted)
    interrupt_at = 2
    assert R.main(["--llc-shard", "1/1", "--out", out, "--device", "cpu"]) == 130   # after its first estimate
    assert len(os.listdir(os.path.join(out, "run0", "llc"))) == 1 and not os.path.exists(os.path.join(out, "run0", "llc.csv"))
    interrupt_at, calls[:] = 0, []
    assert R.main(["--llc-shard", "1/2", "--out", out, "--device", "cpu"]) == 0
    assert len(calls) == 0                                              # its estimate was finished: not redone
    assert not os.path.exists(os.path.join(out, "run0", "llc.csv"))     # shard 2's estimate is missing
    assert R.main(["--llc-shard", "2/2", "--out", out, "--device", "cpu"]) == 0
    assert len(calls) == 1
    names = sorted(os.listdir(os.path.join(whole, "run0", "llc")))
    assert sorted(os.listdir(os.path.join(out, "run0", "llc"))) == names and len(names) == 2
    for name in names:
        a, b = (json.load(open(os.path.join(d, "run0", "llc", name))) for d in (whole, out))
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    assert open(os.path.join(whole, "run0", "llc.csv")).read() == open(os.path.join(out, "run0", "llc.csv")).read()
    assert R.main(["--report", out, "--device", "cpu"]) == 0
    capsys.readouterr()
    for bad in ("0/2", "3/2", "x"):
        assert R.main(["--llc-shard", bad, "--out", out]) == 2
        assert "--llc-shard" in _one_error_line(capsys)


def test_no_llc_then_llc_shards_then_report_equal_one_call(finished_tiny_run, tmp_path, capsys, monkeypatch):
    # Proves the cluster recipe of the README: a `--no-llc` call trains and rolls out but estimates no
    # LLC and writes no report; `--llc-shard 1/1` and `--report` then end with the files of one call.
    import reproduce as R
    preset, done = finished_tiny_run
    monkeypatch.setattr(R, "SCALED", preset)
    out = str(tmp_path / "out")
    assert R.main(["--no-llc", "--out", out, "--device", "cpu"]) == 0
    assert os.path.exists(os.path.join(out, "run0", "simulator.json"))
    assert not os.path.exists(os.path.join(out, "run0", "llc")) and not os.path.exists(os.path.join(out, "REPORT.md"))
    assert R.main(["--llc-shard", "1/1", "--out", out, "--device", "cpu"]) == 0
    assert R.main(["--report", out, "--device", "cpu"]) == 0
    _assert_same_results(done, out)
    capsys.readouterr()
    assert R.main(["--no-llc", "--report", out]) == 2
    assert "--no-llc" in _one_error_line(capsys)


def test_seeds_add_runs_to_a_folder(finished_tiny_run, tmp_path, capsys, monkeypatch):
    # Proves --seeds N: a folder holding the preset's one run grows to N runs (seed k for run k; the
    # other settings must match), `--runs` picks among them, and the report covers every finished run.
    import reproduce as R
    preset, done = finished_tiny_run
    monkeypatch.setattr(R, "SCALED", preset)
    out = str(tmp_path / "out")
    shutil.copytree(done, out)
    assert R.main(["--seeds", "2", "--runs", "1", "--out", out, "--device", "cpu"]) == 0
    assert json.load(open(os.path.join(out, "config.json")))["runs"] == 2
    assert open(os.path.join(out, "run0", "metrics.csv")).read() == open(os.path.join(done, "run0", "metrics.csv")).read()
    assert open(os.path.join(out, "run1", "metrics.csv")).read() != open(os.path.join(done, "run0", "metrics.csv")).read()
    assert {int(r["run"]) for r in csv.DictReader(open(os.path.join(out, "final_heads.csv")))} == {0, 1}
    assert R.main(["--out", out, "--device", "cpu"]) == 0                  # the folder's 2 runs: all done
    assert json.load(open(os.path.join(out, "config.json")))["runs"] == 2
    assert {int(r["run"]) for r in csv.DictReader(open(os.path.join(out, "final_heads.csv")))} == {0, 1}
    capsys.readouterr()
    for argv in (["--seeds", "0"], ["--seeds", "2", "--report", out], ["--seeds", "2", "--llc-shard", "1/2"]):
        assert R.main(argv + ["--out", out]) == 2
        assert "--seeds" in _one_error_line(capsys)


def test_llc_of_heads_retries_in_smaller_groups_with_the_same_numbers(float64, monkeypatch, capsys):
    # Proves that where all heads batched run out of device memory, run_llc's estimates are made in
    # smaller groups of heads and come out the same; a single head that does not fit is one clear error.
    import reproduce as R
    model, sim = _tiny_physics_model()
    data = P.simulator_batches(sim, P.DataConfig(chunk_trajectories=2), SMALL_SGLD.batch_size)
    heads = [(0, 0), (0, 1), (1, 0), (1, 1)]
    together, group = R.llc_of_heads(model, F_mse, data, heads, SMALL_SGLD, group=4)
    assert group == 4
    estimate = R.estimate_llc_resumable

    def small_device(model, criterion, data, subsets, cfg, state_path=None, label=None, **kwargs):
        if len(subsets) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return estimate(model, criterion, data, subsets, cfg, state_path, label, **kwargs)
    monkeypatch.setattr(R, "estimate_llc_resumable", small_device)
    limit = 2
    grouped, group = R.llc_of_heads(model, F_mse, data, heads, SMALL_SGLD, group=4)
    assert group == 2 and "retrying with 2 heads batched" in capsys.readouterr().err
    for a, b in zip(together, grouped):      # equal to rounding: the second group's prefix ends after block 0
        assert a.chain_llc == pytest.approx(b.chain_llc, rel=1e-9)
        torch.testing.assert_close(a.traces, b.traces, rtol=1e-12, atol=1e-14)
    limit = 0
    with pytest.raises(ValueError, match="single head"):
        R.llc_of_heads(model, F_mse, data, heads, SMALL_SGLD, group=4)


def test_moved_particle_attention_equals_moving_it_by_hand():
    # Proves Figs. 13-15's helper returns, for each place, the moved particle's attention row in
    # the state with that particle moved there.
    model, x = _tiny_model_and_state(n_particles=6, batch=1)
    places = torch.tensor([[1.0, 1.0], [2.5, 3.0], [4.0, 0.8]])
    got = R.moved_particle_attention(model, x[0], 2, places)                     # (L, G, H, N+1)
    for g, place in enumerate(places):
        moved = x[0].clone()
        moved[2, :2] = place
        _, attn = model(moved[None], return_attention=True)                      # (L, 1, H, N, N+1)
        torch.testing.assert_close(got[:, g], attn[:, 0, :, 2])


# ----------------------------------------------------------------------------------------------------
# 14. reproduce.py: the analysis and each claim's verdict at its thresholds
# ----------------------------------------------------------------------------------------------------

def test_power_law_analysis_classes_heads_by_final_score_and_fits_their_curves(tmp_path):
    # Proves the report's analysis on a metrics table whose answer is known: each head's class comes
    # from its *final* score (not its first or best), its pieces from |c(t)| on the checkpoints from
    # 1 % of training on, and regimes.csv lists every piece. Head 1-0 forms late (0 -> 0.95) with
    # c = -2 t^-0.3; head 1-1 was a collision head early but ends at 0.05, with a flat noisy c; head
    # 0-0 peaks at 0.9 and ends partial at 0.4, with c decaying exponentially; head 0-1 never detects
    # collisions and its |c| rises as t^0.5. Only head 1-0 decays as a power law at the end of its development.
    import reproduce as R
    steps = np.array(P.checkpoint_steps(P.TrainConfig(steps=20_000, log_checkpoints=32, even_checkpoints=80)))
    t, u = np.maximum(steps, 1).astype(float), steps / steps[-1]
    rng = np.random.default_rng(0)
    score, corr = np.zeros((len(steps), 2, 2)), np.zeros((len(steps), 2, 2))       # (T, L, H)
    score[:, 0, 0], corr[:, 0, 0] = np.where(u < 0.5, 1.8 * u, 0.9 - (u - 0.5)), np.exp(-t / 5000)
    corr[:, 0, 1] = 0.01 * t ** 0.5
    score[:, 1, 0], corr[:, 1, 0] = 0.95 * u, -2 * t ** -0.3
    score[:, 1, 1], corr[:, 1, 1] = 0.9 - 0.85 * u, 0.1 * np.exp(0.02 * rng.standard_normal(len(t)))
    se = np.full_like(corr, 0.01)
    heads = R.power_law_analysis({3: R.Metrics(steps, score, se, corr, se, np.stack([corr, corr], 1))}, str(tmp_path))
    by_head = {(h["layer"], h["head"]): h for h in heads}
    assert {k: (h["class"], round(h["score"], 2)) for k, h in by_head.items()} == \
        {(0, 0): ("partial", 0.4), (0, 1): ("none", 0.0), (1, 0): ("true", 0.95), (1, 1): ("none", 0.05)}
    assert all(h["run"] == 3 and h["t"][0] >= 200 and h["t"][0] == steps[steps >= 200][0] for h in heads)
    assert [(p.is_power_law, round(p.exponent, 6)) for p in by_head[1, 0]["pieces"]] == [(True, -0.3)]
    assert [(p.is_power_law, round(p.exponent, 6)) for p in by_head[0, 1]["pieces"]] == [(True, 0.5)]
    assert not any(p.is_power_law for p in by_head[1, 1]["pieces"])              # flat noise: nothing resolved
    assert {k: h["end"]["follows"] for k, h in by_head.items()} == \
        {(0, 0): False, (0, 1): False, (1, 0): True, (1, 1): False}                # exponential, rising, law, noise
    rows = read_csv(tmp_path / "regimes.csv")
    assert len(rows) == sum(len(h["pieces"]) for h in heads)
    assert {(r["layer"], r["head"], r["class"]) for r in rows} == {("0", "0", "partial"), ("0", "1", "none"),
                                                                  ("1", "0", "true"), ("1", "1", "none")}


def _head(run, layer, head, cls, *exponents):
    """A head for the claims judge: its class, one R² 0.9 power-law piece per exponent over steps
    1000-2000, 2000-3000, ..., and the last piece as the end of its development (a power law there
    if it decays)."""
    pieces = [P.Regime(e, 0.01, 0.0, 0.9, 1000.0 * (i + 1), 1000.0 * (i + 2), 10, e, 0.01, 0.5, 0.5)
              for i, e in enumerate(exponents)]
    end = {"piece": pieces[-1] if pieces else None, "follows": bool(pieces) and exponents[-1] < 0,
           "why": "", "stretch_exponential_p": 0.5}
    return {"run": run, "layer": layer, "head": head, "class": cls, "score": 0.9, "pieces": pieces, "end": end}


STABLE = {0: {"energy_model": [10.0, 9.0], "energy_true": [10.0, 9.0]}}


def _verdicts(heads, llc=(), sims=STABLE, runs=(0,)):
    import reproduce as R
    return {c["claim"].split(" (")[0]: c["verdict"] for c in R.check_claims(heads, list(llc), sims, list(runs))}


def _llc(layer, head, *values, equilibrated=True):
    """LLC estimates of run 0's head at steps 1200, 1400, ... (inside the first piece of _head)."""
    return [{"run": 0, "layer": layer, "head": head, "step": 1200 + 200 * i, "llc": v, "equilibrated": equilibrated}
            for i, v in enumerate(values)]


POWER_LAWS = "Collision-detection heads follow power laws"


NO_OTHER = "No other head follows a power law"


BLOCK_0 = "No collision-detection head in the first block"


MIXED_RUNS = "Every run develops both true and partial collision-detection heads"


PLATEAU = "The LLC plateaus while c(t) is in a power-law regime, in most cases, and not in heads without one"


STABLE_SIM = "The trained model is a stable simulator whose energy evolves as the truth's"


@pytest.mark.parametrize("decaying, others, expected", [
    (0, 0, "not checkable"),                                        # no collision head at all
    (4, 1, "supported"), (3, 1, "partly supported"),               # 80 % | 75 %
    (1, 1, "partly supported"), (2, 3, "not supported"),           # 50 % | 40 %
])
def test_claim_power_laws_threshold(decaying, others, expected):
    # Proves "collision heads follow power laws": supported when >= 80 % of collision heads have a
    # decaying regime, partly at >= 50 %, else not; not checkable without collision heads. The heads
    # that do not decay here rise (a positive exponent), which does not count.
    heads = [_head(0, 1, i, "true", -0.3) for i in range(decaying)]
    heads += [_head(0, 2, i, "partial", +0.4) for i in range(others if decaying else 0)]
    assert _verdicts(heads)[POWER_LAWS] == expected


@pytest.mark.parametrize("decaying, quiet, expected", [
    (0, 10, "supported"), (1, 10, "partly supported"), (2, 10, "not supported"), (0, 0, "not checkable")])
def test_claim_no_other_head_threshold(decaying, quiet, expected):
    # Proves "no other head follows a power law": supported at 0 decaying quiet heads, partly at <= 10 %
    # of them (1 of 10), not at 2 of 10; not checkable when every head detects collisions.
    heads = [_head(0, 1, 0, "true", -0.3)]
    heads += [_head(0, 2, i, "none", -0.2 if i < decaying else 0.3) for i in range(quiet)]
    assert _verdicts(heads)[NO_OTHER] == expected


def test_claim_block_0_and_mixed_runs():
    # Proves "no collision head in block 0" fails on one partial head there, and "every run has true
    # and partial heads" is supported, partly supported or not as 2, 1 or 0 of 2 runs have both.
    both = [_head(0, 1, 0, "true", -0.3), _head(0, 2, 0, "partial", -0.3), _head(1, 1, 0, "true", -0.3),
            _head(1, 2, 1, "partial", -0.3)]
    sims = {0: STABLE[0], 1: STABLE[0]}
    assert _verdicts(both, sims=sims, runs=(0, 1))[BLOCK_0] == "supported"
    assert _verdicts(both + [_head(1, 0, 3, "partial")], sims=sims, runs=(0, 1))[BLOCK_0] == "not supported"
    assert _verdicts(both, sims=sims, runs=(0, 1))[MIXED_RUNS] == "supported"
    assert _verdicts(both[:3], sims=sims, runs=(0, 1))[MIXED_RUNS] == "partly supported"
    assert _verdicts([both[0], both[2]], sims=sims, runs=(0, 1))[MIXED_RUNS] == "not supported"


@pytest.mark.parametrize("first, second, quiet, expected", [
    ((3.5, 4.5), (2.0, 2.0), (1.0, 2.0), "supported"),              # spread 1.0 = 25 % of 4.0; the control is not flat
    ((3.5, 4.5), (2.0, 2.0), (2.0, 2.0), "partly supported"),       # no contrast: the control plateaus too
    ((3.5, 4.5), (2.0, 2.0), (), "partly supported"),               # no control measured
    ((3.5, 4.6), (2.0, 2.0), (1.0, 2.0), "partly supported"),       # 1.1 = 27 % of 4.05: 1 of 2 is not most
    ((3.5, 4.6), (2.0, 3.0), (1.0, 2.0), "not supported"),          # and 1.0 = 40 % of 2.5
    ((2.0,), (1.0,), (1.0, 2.0), "not checkable"),                  # one estimate per regime
])
def test_claim_llc_plateau_threshold(first, second, quiet, expected):
    # Proves "the LLC plateaus in a power-law regime" as §3 and §3.3 put it: a regime with >= 2 equilibrated
    # LLC estimates inside is flat when their spread is <= 25 % of their mean; supported when most (more than
    # half) of such regimes are flat and the quiet heads' LLC over the same steps is flat less often (the
    # control); partly when some are flat; not checkable when no regime holds 2 estimates. Estimates outside
    # the regime do not count, nor do estimates that are not equilibrated.
    heads = [_head(0, 1, 0, "true", -0.3), _head(0, 1, 1, "true", -0.3), _head(0, 0, 2, "none")]
    llc = _llc(1, 0, *first) + _llc(1, 1, *second) + _llc(0, 2, *quiet)
    llc += [{"run": 0, "layer": 1, "head": 0, "step": 5000, "llc": 99.0, "equilibrated": True}]   # after the regime
    assert _verdicts(heads, llc)[PLATEAU] == expected
    unequilibrated = [{**r, "step": r["step"] + 100, "llc": 50.0, "equilibrated": False} for r in llc]
    assert _verdicts(heads, llc + unequilibrated)[PLATEAU] == expected


SIMULTANEOUS = "Collision detection emerges, c enters a power law and the LLC plateaus simultaneously, in most cases"


POWER_LAW_FIRST = "The power law becomes clear before the LLC plateaus"


TRANSITION = "A partial head becomes a true head at a breakpoint: the exponent changes sharply and the LLC rises to a higher plateau"


def _developing(head, emerges, *exponents, true_at=None):
    """_head with a score curve: 0 until `emerges`, 0.5 from there, 0.9 from `true_at` (if given)."""
    h = _head(0, 1, head, "true" if true_at else "partial", *exponents)
    h["t"] = np.arange(500.0, 4001.0, 100.0)
    h["score_t"] = np.where(h["t"] >= emerges, 0.5, 0.0) + np.where(h["t"] >= (true_at or 1e9), 0.4, 0.0)
    return h


def _llc_at(head, *points, equilibrated=True):
    return [{"run": 0, "layer": 1, "head": head, "step": s, "llc": v, "equilibrated": equilibrated} for s, v in points]


@pytest.mark.parametrize("emerge, expected", [((1000, 1000), "supported"), ((1000, 2000), "supported"),
                                              ((1000, 2100), "partly supported"), ((2100, 3000), "not supported")])
def test_claim_simultaneous_emergence_power_law_and_plateau(emerge, expected):
    # Proves §3's simultaneity: each head's power law starts at 1000 and its LLC plateaus from 1200 (two flat
    # equilibrated estimates); the head counts if its emergence (score >= 0.3) lies within a factor 2 of both,
    # and the claim needs more than half of the heads (1 of 2 is partly). No plateau: not checkable.
    heads = [_developing(k, e, -0.3) for k, e in enumerate(emerge)]
    llc = [r for k in range(2) for r in _llc_at(k, (1200, 2.0), (1400, 2.1))]
    assert _verdicts(heads, llc)[SIMULTANEOUS] == expected
    assert _verdicts(heads, _llc_at(0, (1200, 2.0)))[SIMULTANEOUS] == "not checkable"
    assert _verdicts(heads, [{**r, "equilibrated": False} for r in llc])[SIMULTANEOUS] == "not checkable"


def test_claim_power_law_before_the_llc_plateau():
    # Proves §4.3's order: the power law from step 1000 against a plateau from 1200 (before: supported) or
    # from 600 (after: not supported); 1 of 2 heads is partly.
    heads = [_developing(0, 1000, -0.3), _developing(1, 1000, -0.3)]
    late = [r for k in range(2) for r in _llc_at(k, (1200, 2.0), (1400, 2.0))]
    early = [r for k in range(2) for r in _llc_at(k, (600, 2.0), (1200, 2.0), (1400, 2.0))]
    assert _verdicts(heads, late)[POWER_LAW_FIRST] == "supported"
    assert _verdicts(heads, early)[POWER_LAW_FIRST] == "not supported"
    assert _verdicts(heads, late[:2] + early[3:])[POWER_LAW_FIRST] == "partly supported"
    assert _verdicts(heads, [])[POWER_LAW_FIRST] == "not checkable"


@pytest.mark.parametrize("exponents, after, quiet_after, expected", [
    ((-0.8, -0.2), 4.0, None, "supported"),           # sharp (0.6 > the two 0.01 intervals), LLC 2 -> 4
    ((-0.8, -0.2), 4.0, 3.0, "supported"),            # ... and the quiet control rises less (2 -> 3)
    ((-0.8, -0.2), 4.0, 4.5, "partly supported"),     # ... but the control rises as much: not the head's own
    ((-0.8, -0.2), 1.0, None, "partly supported"),    # sharp, but the LLC falls
    ((-0.30, -0.31), 4.0, None, "not supported"),     # a change of 0.01 within the intervals
])
def test_claim_transition_from_partial_to_true(exponents, after, quiet_after, expected):
    # Proves §3.3's transition found automatically: a head partial at the end of one power-law piece (step
    # 2000, score 0.5) and true at the end of the next (3000, score 0.9), with the exponent's change beyond
    # the sum of the two 95 % intervals and the equilibrated LLC higher in the second piece, by more than a
    # quiet head's LLC at the same checkpoints where one is measured. A head that stays partial has no transition.
    head, quiet = _developing(0, 600, *exponents, true_at=2500), _head(0, 1, 5, "none")
    llc = _llc_at(0, (1200, 2.0), (1400, 2.0), (2200, after), (2400, after))
    if quiet_after is not None:
        llc += _llc_at(5, (1200, 2.0), (1400, 2.0), (2200, quiet_after), (2400, quiet_after))
    assert _verdicts([head, quiet], llc)[TRANSITION] == expected
    assert _verdicts([_developing(0, 600, *exponents), quiet], llc)[TRANSITION] == "not supported"


@pytest.mark.parametrize("runs, expected", [
    (((0.0, 0.0), (25.0, 0.0)), "supported"),                       # gains 0 and 25 % of the 100 released; no gap
    (((0.0, 25.0), (25.0, 0.0)), "supported"),                      # a mean gap of 25 %
    (((0.0, 0.0), (25.5, 0.0)), "partly supported"),                # run 1 gains 25.5 %
    (((0.0, 0.0), (0.0, 26.0)), "partly supported"),                # run 1 drifts from the truth by 26 % on average
    (((30.0, 0.0), (0.0, 40.0)), "not supported"),                  # no run does both
])
def test_claim_stable_simulator_threshold(runs, expected):
    # Proves D.2's two parts, in energy differences (so the potential's zero cannot matter): each run's
    # largest energy gain over its start, and its mean distance from the truth's curve, over the energy
    # the truth releases (1000 -> 900 here); supported where every run keeps both <= 25 %, partly where
    # some run does. Shifting every energy by 1e4 (another zero) changes nothing.
    def sim(gain, gap, shift=0.0):
        truth = np.linspace(1000.0, 900.0, 11)
        model = truth.copy()
        model[1:] += gap * 11 / 10                                  # a mean distance of `gap` over the 11 steps
        if gain:
            model[5] = 1000.0 + gain                                # one step `gain` above the start
        return {"energy_model": (model + shift).tolist(), "energy_true": (truth + shift).tolist()}
    for shift in (0.0, 1e4):
        sims = {r: sim(*g, shift) for r, g in enumerate(runs)}
        heads = [_head(r, 1, 0, "true", -0.3) for r in sims]
        assert _verdicts(heads, sims=sims, runs=sims)[STABLE_SIM] == expected


# ----------------------------------------------------------------------------------------------------
# 15. reproduce.py bench and the projection
# ----------------------------------------------------------------------------------------------------

def physim_fused_is_restored() -> bool:
    return P.ParticleAttention.fused is True


def test_projection_counts_the_units_a_run_makes(tmp_path, monkeypatch):
    # Proves the projected wall time multiplies each stage's unit cost by the number of units a real
    # run makes: training steps, checkpoints, held-out sets, rollouts and (head, checkpoint) LLC
    # estimates, counted while reproduce() runs the same preset (whose runs pick llc_heads + 1 heads).
    import collections
    import reproduce as R
    preset = R.Preset(runs=2, llc_heads=1, **TINY_PRESET_ARGS)
    made = collections.Counter()
    for name in ("training_step", "head_metrics", "heldout_set", "evaluate_simulator", "estimate_llc"):
        def counted(*args, _original=getattr(P, name), _name=name, **kwargs):
            made[_name] += len(args[3]) if _name == "estimate_llc" else 1     # estimate_llc: heads
            return _original(*args, **kwargs)
        monkeypatch.setattr(P, name, counted)
    R.reproduce(preset, str(tmp_path), "cpu")
    monkeypatch.undo()                                   # the projection's own calls are not counted
    rows = R.projected_time(preset, "cpu", "tiny")
    assert [r["units"] for r in rows[:-1]] == [made["training_step"], made["head_metrics"], made["heldout_set"],
                                               made["evaluate_simulator"], made["estimate_llc"]]
    assert all(r["unit seconds"] > 0 for r in rows[:-1])
    assert rows[-1]["seconds"] == pytest.approx(sum(r["seconds"] for r in rows[:-1]), abs=0.1)


def test_bench_writes_its_ratios_and_the_projection(tmp_path, monkeypatch, capsys):
    # Proves `reproduce.py bench` measures every comparison and writes bench.csv and projection.csv
    # (on tiny stand-ins for the scaled and full presets, to keep the test short).
    import reproduce as R
    monkeypatch.setattr(R, "SCALED", R.Preset(runs=1, llc_heads=1, **TINY_PRESET_ARGS))
    monkeypatch.setattr(R, "FULL", R.Preset(runs=2, llc_heads=1, **TINY_PRESET_ARGS))
    monkeypatch.setattr(torch, "compile", lambda *a, **k: 1 / 0)       # the eager fallback: no compile time here
    monkeypatch.setattr(R, "TINY_MLP_STEPS", 20)
    threads = torch.get_num_threads()
    assert R.main(["bench", "--device", "cpu", "--out", str(tmp_path)]) == 0
    bench = read_csv(tmp_path / "bench.csv")
    assert len(bench) == 10 and physim_fused_is_restored() and torch.get_num_threads() == threads
    assert bench[-3]["threads"] == bench[-2]["threads"] == bench[-1]["threads"] == "1"   # one thread, as issue 13's
    for r in bench:                       # the speedup is the ratio of the two rates measured (rounded)
        ratio = float(r["ours steps/s"]) / float(r["baseline steps/s"])
        assert float(r["speedup"]) == pytest.approx(ratio, rel=0.02, abs=0.01), r
    projection = read_csv(tmp_path / "projection.csv")
    assert [r["preset"] for r in projection if r["stage"] == "total"] == ["scaled", "full"]
    assert "Projected wall time" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# 16. docs/tour.md: every snippet of the tour runs and prints what the page shows
# ----------------------------------------------------------------------------------------------------

def _tour_snippets():
    import re
    text = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs", "tour.md")).read()
    return re.findall(r"```python\n(.*?)```\s*```text\n(.*?)```", text, re.S)


@pytest.mark.parametrize("code, shown", _tour_snippets(), ids=[f"snippet {i + 1}" for i in range(len(_tour_snippets()))])
def test_the_tour_snippet_prints_what_the_page_shows(code, shown):
    # Proves docs/tour.md cannot go stale: each block, in a fresh namespace, prints exactly its text block.
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<docs/tour.md>", "exec"), {"__name__": "__tour__"})
    assert out.getvalue().strip() == shown.strip()
