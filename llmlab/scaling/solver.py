"""The solver behind every scaling-law fit: L-BFGS from many starts, in one jit.

Why this shape:
- The objective (Hoffmann et al. 2022) is sum_i w_i Huber_delta(pred_log_i - log L_i)
  with delta = 1e-3: nearly an L1 loss whose value is tiny (~1e-3), so optimisers
  with absolute stopping tolerances stop early and report the exponents of
  wherever they stopped (Besiroglu et al. 2024 found this in Hoffmann's fit).
  Stopping here is relative to the objective, with a generous evaluation cap.
- Every start of every data set (group) is a lane: lanes advance in lockstep
  in one `lax.while_loop`, all in a single jitted call. Bootstrap replicates
  differ only by per-point weights, so they share one program.
- Directions come from dense BFGS (`bfgs`, an optax.GradientTransformation
  like optax.lbfgs with `linesearch=None`); the linesearch is flattened into
  the lane's loop, one objective evaluation per loop step, and the lane carries
  its value and gradient (the job optax.value_and_grad_from_state does in the
  unflattened loop). optax.lbfgs's own zoom linesearch is a `while_loop` nested
  in each update: in lockstep every lane waits for the slowest lane's
  linesearch at every iteration (on the Chinchilla grid 11% of iterations hit
  its 30-step cap) and batched `lax.cond` evaluates both branches of each step,
  so an iteration costs up to 60 evaluations of the whole batch instead of ~2.
- The objective of all lanes is one batched function of their parameters
  (`_dense` or `_blocks`). Dense: every group sees all N points (weight 0 =
  left out). Blocks (`ragged=True`): each group's points are packed into
  blocks of `BLOCK` points, so a group of 10 points does not pay for the 500
  of the largest group; a backtest's cells use a quarter of a family's rows.
- With many starts, all of them run to a loose tolerance (`SCREEN`, capped), and
  the best `keep` per group continue to the tight one (`POLISH`).
- Fitting runs in float64 inside `jax.enable_x64(True)`, which restores the
  previous setting on exit: the same process trains float32 models afterwards.
"""

import functools
import itertools
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llmlab.scaling import forms as forms_lib

DELTA = 1e-3
TINY = 1e-12  # floor of the objective scale, so an exact (zero-loss) fit still stops
# Points per block of the ragged layout (padding <= 63 per group), and
# (block, lane) items evaluated together (see `_blocks`). Larger blocks and
# chunks spread the per-item gather and scatter over more points: on
# benchmarks/backtest_speed.py's grid 64 x 4096 took 6 s where 16 x 1024 took
# 10-11 s; 96 or 128 points per block gained nothing more.
BLOCK = 64
CHUNK = 4096
SMALL = 256  # items per step once fewer than CHUNK run (see `_blocks`)


class Tol(NamedTuple):
  """A lane stops when |grad| <= gtol * scale, or an accepted step lowered the
  objective by <= ftol * scale (scale = max(objective, TINY)), or after max_evals."""
  gtol: float
  ftol: float
  max_evals: int


SCREEN = Tol(gtol=1e-5, ftol=1e-8, max_evals=60)
POLISH = Tol(gtol=1e-9, ftol=1e-13, max_evals=5000)


def huber(r, delta):
  return jnp.where(jnp.abs(r) <= delta, 0.5 * r * r, delta * (jnp.abs(r) - 0.5 * delta))


def objective(form: forms_lib.Form, theta_P, x, log_loss_N, weight_N, delta):
  """Weighted sum of Huber losses of log-loss residuals (weight 0 = padding)."""
  r_N = form.log_loss(form.named(theta_P), x) - log_loss_N
  return jnp.sum(jnp.where(weight_N > 0, weight_N * huber(r_N, delta), 0.0))


# ----------------------------------------------------------------------------
# Lanes: one start each, advanced one objective evaluation per loop step.


class BFGSState(NamedTuple):
  count: jax.Array  # directions given since the last (re)start
  params: jax.Array  # where the last direction was asked for
  grad: jax.Array  # and the gradient there
  h: jax.Array  # P x P inverse-Hessian estimate


def bfgs() -> optax.GradientTransformation:
  """Dense BFGS directions (Nocedal & Wright 2006, eq. 6.17; the first pair
  scales the identity, eq. 6.20), with optax.lbfgs's interface and first step
  (-g, capped at unit length). Hand-written because optax has only the
  limited-memory form: a law has 3-10 parameters, so the whole inverse Hessian
  is a few dozen numbers, and updating it is a handful of fused ops per lane,
  where optax.lbfgs's ring buffer of 10 pairs cost ~1.6 CPU-us per lane and
  step, a third of a backtest's screen. Curvature pairs with s.y <= 0 are the
  caller's to handle (`_lane_advance` restarts the lane)."""

  def init(params):
    p = params.shape[-1]
    zeros = jnp.zeros_like(params)
    return BFGSState(jnp.asarray(0, jnp.int32), zeros, zeros, jnp.eye(p, dtype=params.dtype))

  def update(g, state, params):
    s, y = params - state.params, g - state.grad
    sy, yy = jnp.vdot(s, y), jnp.vdot(y, y)
    pair = (state.count > 0) & (sy > 0)
    eye = jnp.eye(g.shape[-1], dtype=g.dtype)
    h = jnp.where((state.count == 1) & pair & (yy > 0), (sy / jnp.where(yy > 0, yy, 1.0)) * eye,
                  state.h)
    rho = 1.0 / jnp.where(pair, sy, 1.0)
    hy = h @ y
    h_new = (h - rho * (jnp.outer(s, hy) + jnp.outer(hy, s))
             + (rho * rho * jnp.vdot(y, hy) + rho) * jnp.outer(s, s))
    h = jnp.where(pair, h_new, h)
    first = -g * jnp.minimum(1.0, 1.0 / jnp.linalg.norm(g))
    d = jnp.where(state.count > 0, -(h @ g), first)
    return d, BFGSState(state.count + 1, params, g, h)

  return optax.GradientTransformation(init, update)


def _lane_init(opt, u_P, f, g_P):
  state = opt.init(u_P)
  d, state = opt.update(g_P, state, u_P)
  return dict(theta=u_P, f=jnp.where(jnp.isfinite(f), f, jnp.inf), g=g_P, d=d,
              t=jnp.ones_like(f), trials=jnp.asarray(0), fresh=jnp.asarray(True),
              opt=state, evals=jnp.asarray(1), done=jnp.asarray(False),
              converged=jnp.asarray(False))


def _lane_advance(opt, tol: Tol, c1, max_trials, lane, theta_t, f_t, g_t):
  """One linesearch trial of one lane, given the objective at its trial point.

  An accepted trial (Armijo) moves the lane and asks `opt` (`bfgs`) for the next
  direction; a rejected one shrinks the step by safeguarded quadratic
  interpolation. When the curvature s.y of an accepted step is not positive, or
  the linesearch fails, the curvature memory is reset (scaled steepest descent); a
  lane that cannot descend even from a fresh memory is finished.
  """
  theta, f, g, d, t = lane["theta"], lane["f"], lane["g"], lane["d"], lane["t"]
  slope = jnp.vdot(g, d)
  descent = slope < 0
  ok = jnp.isfinite(f_t) & jnp.all(jnp.isfinite(g_t))
  accept = ok & descent & (f_t <= f + c1 * t * slope)

  denom = 2.0 * (f_t - f - slope * t)
  t_quad = jnp.where(ok & (denom > 0), -slope * t * t / denom, 0.1 * t)
  t_shrunk = jnp.clip(t_quad, 0.1 * t, 0.5 * t)
  restart = ~accept & ((lane["trials"] + 1 >= max_trials) | ~descent)

  s_P, y_P = theta_t - theta, g_t - g
  curvature_ok = jnp.vdot(s_P, y_P) > 1e-12 * jnp.linalg.norm(s_P) * jnp.linalg.norm(y_P)
  reset = restart | (accept & ~curvature_ok)
  theta_at = jnp.where(accept, theta_t, theta)
  g_at = jnp.where(accept, g_t, g)
  state = jax.tree.map(lambda fresh, old: jnp.where(reset, fresh, old),
                       opt.init(theta_at), lane["opt"])
  d_new, state = opt.update(g_at, state, theta_at)
  moved = accept | restart

  scale = jnp.maximum(jnp.abs(f_t), TINY)
  # No descent even along the steepest direction: a minimum to working precision.
  stuck = restart & lane["fresh"]
  converged = stuck | (accept & ((jnp.linalg.norm(g_t) <= tol.gtol * scale) |
                                 (f - f_t <= tol.ftol * scale)))
  evals = lane["evals"] + 1
  return dict(
      theta=theta_at, f=jnp.where(accept, f_t, f), g=g_at,
      d=jnp.where(moved, d_new, d), t=jnp.where(moved, 1.0, t_shrunk),
      trials=jnp.where(moved, 0, lane["trials"] + 1),
      fresh=jnp.where(moved, reset, lane["fresh"]),
      opt=jax.tree.map(lambda u, v: jnp.where(moved, u, v), state, lane["opt"]),
      evals=evals, converged=converged,
      done=converged | (evals >= tol.max_evals) | ~jnp.isfinite(f))


def _per_lane(fn):
  """fn of one lane, mapped over the G x K lanes."""
  return jax.vmap(jax.vmap(fn))


def _run(value_and_grad, opt, tol: Tol, lanes, c1=1e-4, max_trials=30):
  """Advance every lane until all have stopped (see `Tol`); stopped lanes hold."""
  lanes = dict(lanes, done=~jnp.isfinite(lanes["f"]), converged=jnp.zeros_like(lanes["done"]),
               evals=jnp.zeros_like(lanes["evals"]))
  advance = _per_lane(functools.partial(_lane_advance, opt, tol, c1, max_trials))

  def step(lanes):
    theta_t = lanes["theta"] + lanes["t"][..., None] * lanes["d"]
    f_t, g_t = value_and_grad(theta_t, ~lanes["done"])
    new = advance(lanes, theta_t, f_t, g_t)
    done = lanes["done"]
    return jax.tree.map(
        lambda n, o: jnp.where(done.reshape(done.shape + (1,) * (n.ndim - done.ndim)), o, n),
        new, lanes)

  return jax.lax.while_loop(lambda c: ~jnp.all(c["done"]), step, lanes)


def _best(lanes, k: int):
  """The k lanes of each group with the lowest objective (NaN last)."""
  f = jnp.where(jnp.isnan(lanes["f"]), jnp.inf, lanes["f"])
  idx_Gxk = jax.lax.top_k(-f, k)[1]
  return jax.tree.map(lambda a: jax.vmap(lambda a_g, i_k: a_g[i_k])(a, idx_Gxk), lanes)


# ----------------------------------------------------------------------------
# The objective of all lanes at once: u (G x K x P) -> f (G x K), grad (G x K x P).


def _theta(u_GxKxP, shift, scale):
  """theta = shift + scale @ u, with one affine map shared or one per group."""
  if shift.ndim == 1:
    return shift + jnp.einsum("pq,gkq->gkp", scale, u_GxKxP)
  return shift[:, None] + jnp.einsum("gpq,gkq->gkp", scale, u_GxKxP)


def _dense(form, data, dtype):
  """Every group sees all points; x shared by the groups (1-D) or one per group."""
  x, log_loss, weight, delta = jax.tree.map(lambda a: a.astype(dtype), data["points"])
  shift, scale = (a.astype(dtype) for a in data["affine"])
  x_axis = None if all(v.ndim == 1 for v in x.values()) else 0
  lane = jax.value_and_grad(
      lambda theta_P, x, l, w: objective(form, theta_P, x, l, w, delta))
  per_group = jax.vmap(jax.vmap(lane, in_axes=(0, None, None, None)),
                       in_axes=(0, x_axis, 0, 0))

  def value_and_grad(u_GxKxP, active_GxK=None):
    del active_GxK  # every lane is evaluated; stopped lanes ignore theirs
    theta, pullback = jax.vjp(lambda u: _theta(u, shift, scale), u_GxKxP)
    f, g_theta = per_group(theta, x, log_loss, weight)
    return f, pullback(g_theta)[0]

  return value_and_grad


def _blocks(form, data, dtype):
  """Each group's points packed into blocks (nb x BLOCK, sorted by group).
  Only the lanes still running are evaluated: the (block, lane) items of
  running lanes are compacted to the front (`jnp.nonzero`), evaluated CHUNK
  at a time in a loop whose trip count is their number, and each group's
  items summed. In lockstep, lanes that stopped early would otherwise cost as
  much as running ones: in a backtest's polish the median lane stops after
  ~70 of the 2,000 evaluations the slowest lane runs. The last running
  items go SMALL at a time, so that tail does not pay for whole chunks."""
  x, log_loss, weight, delta = jax.tree.map(lambda a: a.astype(dtype), data["points"])
  group_nb = data["group"]
  shift, scale = (a.astype(dtype) for a in data["affine"])
  item = jax.vmap(jax.value_and_grad(
      lambda th, x, l, w: objective(form, th, x, l, w, delta)))

  def value_and_grad(u_GxKxP, active_GxK=None):
    g_count, k_count, p_count = u_GxKxP.shape
    theta, pullback = jax.vjp(lambda u: _theta(u, shift, scale), u_GxKxP)
    if active_GxK is None:
      active_GxK = jnp.ones((g_count, k_count), bool)
    n_items = group_nb.shape[0] * k_count
    # No CHUNK loop where every item fits in one chunk: XLA turns a loop of
    # at most one trip into straight-line code, and would evaluate a whole
    # CHUNK of items at every step, live or not (a backtest's polish of a
    # small family: 4x slower).
    big = CHUNK if n_items > CHUNK else SMALL
    padded = -(-n_items // big) * big
    live = active_GxK[group_nb].reshape(-1)
    n_live = jnp.sum(live)
    order = jnp.nonzero(live, size=padded, fill_value=0)[0]

    def chunk(size, start, acc):
      f_acc, g_acc = acc
      at = jax.lax.dynamic_slice(order, (start,), (size,))
      valid = start + jnp.arange(size) < n_live
      b, k = at // k_count, at % k_count
      f, g = item(theta[group_nb[b], k], jax.tree.map(lambda a: a[b], x),
                  log_loss[b], weight[b])
      lane = jnp.where(valid, group_nb[b] * k_count + k, n_lanes)  # out of range: dropped
      return (f_acc.at[lane].add(f, mode="drop"), g_acc.at[lane].add(g, mode="drop"))

    n_lanes = g_count * k_count
    acc = (jnp.zeros(n_lanes, dtype), jnp.zeros((n_lanes, p_count), dtype))
    n_full = 0
    if big == CHUNK:
      n_full = n_live // CHUNK
      acc = jax.lax.fori_loop(0, n_full, lambda c, a: chunk(CHUNK, c * CHUNK, a), acc)
    n_small = -(-(n_live - n_full * CHUNK) // SMALL)
    f_items, g_items = jax.lax.fori_loop(
        0, n_small, lambda c, a: chunk(SMALL, n_full * CHUNK + c * SMALL, a), acc)
    return (f_items.reshape(g_count, k_count),
            pullback(g_items.reshape(g_count, k_count, p_count))[0])

  return value_and_grad


@functools.partial(jax.jit, static_argnames=("form_name", "layout", "screen", "polish",
                                             "keep", "fast"))
def _solve(u0_GxKxP, data, *, form_name: str, layout: str, screen: Tol, polish: Tol,
           keep: int, fast: bool):
  """Every group and start in one call: K starts screened, the best `keep`
  of each group polished.

  fast: the screen runs in float32 (1.5x cheaper per evaluation than float64
  on XLA:CPU); the best `keep` lanes continue, their BFGS memory too, in a
  float64 polish, which decides the result. Every start runs the whole
  screen: successive halving (Jamieson & Talwalkar 2016; three rounds
  64 -> 32 -> 16) cost ~15% less on benchmarks/backtest_speed.py's grid, but
  dropped the best basin of the full cells of a 10-parameter law
  (`data_repeat` on datablations_c4: objective 0.0317 vs 0.0247), and its
  geometric schedule a borrowed-parameter fit's in tests/test_backtest.py.
  """
  form = forms_lib.get_form(form_name)
  opt = bfgs()
  make = {"dense": _dense, "blocks": _blocks}[layout]
  precise = make(form, data, u0_GxKxP.dtype)
  vg = make(form, data, jnp.float32) if fast else precise
  u0 = u0_GxKxP.astype(jnp.float32) if fast else u0_GxKxP
  f, g = vg(u0)
  lanes = _per_lane(functools.partial(_lane_init, opt))(u0, f, g)
  n_starts = u0.shape[1]
  if keep < n_starts:
    lanes = _best(_run(vg, opt, screen, lanes), keep)
  if fast:  # the screened lanes, memory and all, continue in float64
    lanes = jax.tree.map(lambda a: a.astype(u0_GxKxP.dtype)
                         if a.dtype == jnp.float32 else a, lanes)
    f, g = precise(lanes["theta"])
    lanes = dict(lanes, f=jnp.where(jnp.isfinite(f), f, jnp.inf), g=g)
  lanes = _run(precise, opt, polish, lanes)
  shift, scale = data["affine"]
  return _theta(lanes["theta"], shift, scale), lanes["f"], lanes["evals"], lanes["converged"]


# ----------------------------------------------------------------------------
# Layouts of the points.


def bucket(n: int) -> int:
  """Padded size (next power of two, >= 8; above 256 the next multiple of
  64, where doubling would double the work): data sets of similar size
  share a compiled program instead of each paying for compilation."""
  if n > 256:
    return -(-int(n) // 64) * 64
  return max(8, 1 << (int(n) - 1).bit_length())


def _pad(a) -> np.ndarray:
  """Zeros appended along the last axis up to its bucket. Forms read zero
  inputs safely (log inputs: N = 1; curve drop blocks: no drop)."""
  a = np.asarray(a, np.float64)
  n = a.shape[-1]
  return np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, bucket(n) - n)])


def _pack(weight_GxN, x, log_loss_GxN):
  """The points of weight > 0 of every group, in blocks of BLOCK (padded with
  weight 0), the blocks sorted by group; the block count is bucketed."""
  weight_GxN, log_loss_GxN = np.asarray(weight_GxN), np.asarray(log_loss_GxN)
  rows, group = [], []
  for g, w in enumerate(weight_GxN):
    idx = np.flatnonzero(w > 0)
    n_blocks = max(1, -(-len(idx) // BLOCK))
    rows.append(np.pad(idx, (0, n_blocks * BLOCK - len(idx)), constant_values=-1))
    group += [g] * n_blocks
  n_blocks = len(group)
  pad = bucket(n_blocks) - n_blocks
  group = np.asarray(group + [len(weight_GxN) - 1] * pad, np.int32)
  rows = np.concatenate(rows + [np.full(pad * BLOCK, -1)]).reshape(-1, BLOCK)
  real = rows >= 0
  g_of = group[:, None].repeat(BLOCK, 1)
  take = lambda a: np.where(real, (a[g_of, np.maximum(rows, 0)] if a.ndim == 2
                                   else a[np.maximum(rows, 0)]), 0.0)
  return dict(weight=take(weight_GxN), x={k: take(np.asarray(v)) for k, v in x.items()},
              log_loss=take(log_loss_GxN), group=group)


def minimize(form: forms_lib.Form, theta0_GxKxP, weight_GxN, x, log_loss_GxN, *,
             delta=DELTA, keep: int = 32, screen: Tol = SCREEN, polish: Tol = POLISH,
             affine=None, fast: bool = False, ragged: bool = False):
  """Fits G data sets from K starts each.

  x: the form's inputs, shared by all groups ({name: 1-D array}) or per group
  ({name: G x N}). Points of weight 0 are left out of a group's fit.

  affine: optional (shift_P, scale_PxP), or one per group (shift_GxP,
  scale_GxPxP); the search runs in u, theta = shift + scale @ u (a
  preconditioner, see `whitening` and `centring`; a zero column holds a
  parameter at its shift, see `fixing`). Returns numpy (theta_GxkxP,
  objective_Gxk, evals_Gxk, converged_Gxk) for the k = min(keep, K) polished
  starts of each group.
  fast: a float32 screen, then a float64 polish (see
  `_solve`). ragged: pack each group's own points into blocks instead of
  evaluating every group on all N points (worth it when groups use few of
  the points; curve forms are not supported).
  """
  theta0_GxKxP = np.asarray(theta0_GxKxP, np.float64)
  if ragged and theta0_GxKxP.shape[:2] == (1, 1):
    # XLA:CPU fails a check (hlo_casting_utils: a reshape taken for a
    # constant) compiling the blocks layout for one lane; two copies of the
    # start, both polished, give that lane's result.
    out = minimize(form, np.repeat(theta0_GxKxP, 2, axis=1), weight_GxN, x,
                   log_loss_GxN, delta=delta, keep=2, screen=screen,
                   polish=polish, affine=affine, fast=fast, ragged=True)
    return tuple(o[:, :1] for o in out)
  p = theta0_GxKxP.shape[-1]
  shift_P, scale_PxP = (np.zeros(p), np.eye(p)) if affine is None else affine
  shift_P, scale_PxP = np.asarray(shift_P, np.float64), np.asarray(scale_PxP, np.float64)
  per_group = shift_P.ndim == 2
  inv = np.linalg.pinv(scale_PxP)
  centred = theta0_GxKxP - (shift_P[:, None] if per_group else shift_P)
  u0_GxKxP = np.einsum("gpq,gkq->gkp" if per_group else "pq,gkq->gkp", inv, centred)
  keep = min(int(keep), theta0_GxKxP.shape[1])
  if ragged and form.curve:
    raise ValueError(f"curve form {form.name!r} cannot be fitted ragged")
  with jax.enable_x64(True):
    f64 = lambda a: jnp.asarray(a, jnp.float64)
    if ragged:
      packed = _pack(weight_GxN, x, log_loss_GxN)
      points = ({k: f64(v) for k, v in packed["x"].items()}, f64(packed["log_loss"]),
                f64(packed["weight"]), f64(delta))
      data = dict(points=points, group=jnp.asarray(packed["group"]))
    else:
      points = ({k: f64(_pad(v)) for k, v in x.items()}, f64(_pad(log_loss_GxN)),
                f64(_pad(weight_GxN)), f64(delta))
      data = dict(points=points)
    data["affine"] = (f64(shift_P), f64(scale_PxP))
    out = _solve(f64(u0_GxKxP), data, form_name=form.name,
                 layout="blocks" if ragged else "dense", screen=screen, polish=polish,
                 keep=keep, fast=fast)
    return tuple(np.asarray(o) for o in out)


# ----------------------------------------------------------------------------
# Preconditioners: affine maps theta = shift + scale @ u.


def fixing(form: forms_lib.Form, fixed_G: list[Mapping[str, float]]):
  """Per-group affine maps (see `minimize`) that hold each group's `fixed`
  parameters ({log-space name: value}) at their values and leave the others
  free: a parameter borrowed from another fit is a zero column of the map, so
  its gradient in u is 0 and every lane of the group keeps it."""
  g, p = len(fixed_G), len(form.params)
  shift_GxP, scale_GxPxP = np.zeros((g, p)), np.tile(np.eye(p), (g, 1, 1))
  for i, fixed in enumerate(fixed_G):
    for name, value in fixed.items():
      j = form.params.index(name)
      shift_GxP[i, j], scale_GxPxP[i, j, j] = value, 0.0
  return shift_GxP, scale_GxPxP


def coupled(form: forms_lib.Form, x: Mapping[str, np.ndarray], seed: int = 0,
            n_probes: int = 8):
  """(i, j, input) triples where d log L / d theta_j = -x_input * d log L / d theta_i
  at every point: theta_i is the log coefficient of a term theta_i - theta_j x
  (a - alpha ln N). Found numerically, at `n_probes` starts of the form's grid,
  so a new form needs no declaration. A triple is kept if it holds at every
  probe where its term is visible (column i not negligible) and is visible at
  one at least: at a start with a large exponent (alpha = 2, ln N = 22) the
  term is e^-44 of the loss and says nothing, and requiring it everywhere
  made the answer depend on which probes were drawn (so on the table's
  length, which seeds the draw)."""
  rng = np.random.default_rng(seed)
  names = list(form.inputs)
  rows = rng.choice(len(x[names[0]]), min(16, len(x[names[0]])), replace=False)
  x_s = {k: np.asarray(v, np.float64)[rows] for k, v in x.items()}
  grid = form.grid_starts()
  held, failed = set(), set()
  with jax.enable_x64(True):
    jac = jax.jit(jax.jacfwd(lambda th, x: form.log_loss(form.named(th), x)))
    for theta in grid[rng.choice(len(grid), min(n_probes, len(grid)), replace=False)]:
      j_NxP = np.asarray(jac(jnp.asarray(theta), {k: jnp.asarray(v) for k, v in x_s.items()}))
      visible = np.abs(j_NxP).max(axis=0) > 1e-8 * max(np.abs(j_NxP).max(), TINY)
      for i, j, k in itertools.product(np.flatnonzero(visible), range(len(visible)), names):
        if i != j:
          ok = np.allclose(j_NxP[:, j], -x_s[k] * j_NxP[:, i], rtol=1e-9, atol=1e-14)
          (held if ok else failed).add((int(i), j, k))
  return sorted(held - failed)


def centring(form: forms_lib.Form, x: Mapping[str, np.ndarray], weight_GxN,
             affine_G=None):
  """Per-group affine maps that centre each coupled input (see `coupled`) on
  the group's weighted mean c: theta_i = u_i + c u_j, so a term reads
  u_i - u_j (x - c). With ln N ~ 20 the raw a and alpha are nearly collinear
  (a step in alpha moves the term by 20x); centred, L-BFGS's first steps
  already point the right way, and a screen needs about half the evaluations.

  affine_G: per-group (shift, scale) of `fixing` to compose with; a fixed
  parameter stays fixed (scale = F C F, F the free-parameter projection)."""
  weight_GxN = np.asarray(weight_GxN, np.float64)
  g, p = weight_GxN.shape[0], len(form.params)
  shift, free = affine_G if affine_G is not None else (np.zeros((g, p)),
                                                      np.tile(np.eye(p), (g, 1, 1)))
  total = np.maximum(weight_GxN.sum(1), TINY)
  centre = np.tile(np.eye(p), (g, 1, 1))
  for i, j, k in coupled(form, x):
    centre[:, i, j] = weight_GxN @ np.asarray(x[k], np.float64) / total
  return shift, free @ centre @ free


def _jacobian(form: forms_lib.Form, theta_P, x_N) -> np.ndarray:
  """d log L_hat / d theta at theta_P, N x P, in float64."""
  with jax.enable_x64(True):
    jac = jax.jacfwd(lambda th: form.log_loss(form.named(th), x_N))
    return np.asarray(jac(jnp.asarray(theta_P, jnp.float64)))


def identified(form: forms_lib.Form, theta_P, x_N, rtol: float = 1e-7) -> bool:
  """Whether the points x_N pin every parameter at theta_P: the Jacobian
  d log L_hat / d theta, its columns scaled to unit length, has full rank
  (smallest singular value > rtol of the largest). False where a direction
  leaves every prediction unchanged, e.g. b and beta when all points share
  one token count (only b - beta ln D is seen). It does not see a fit that
  ran off along a valley (E -> 0): `backtest.bounded` does."""
  n = len(next(iter(x_N.values())))
  return bool(identified_each(form, np.asarray(theta_P)[None], x_N, np.ones((1, n)),
                              np.ones((1, len(form.params)), bool), rtol)[0])


def identified_each(form: forms_lib.Form, theta_GxP, x_N, weight_GxN, free_GxP,
                    rtol: float = 1e-7) -> np.ndarray:
  """`identified` for G fits at once, each on its own points (weight > 0) and
  its own free parameters (free_GxP: False for a parameter held fixed)."""
  theta_GxP = np.asarray(theta_GxP, np.float64)
  out = np.zeros(len(theta_GxP), bool)
  ok = np.all(np.isfinite(theta_GxP), axis=1)
  if not ok.any():
    return out
  with jax.enable_x64(True):
    jac = jax.vmap(jax.jacfwd(lambda th, x: form.log_loss(form.named(th), x)),
                   in_axes=(0, None))
    j_GxNxP = np.asarray(jac(jnp.asarray(theta_GxP[ok]),
                             {k: jnp.asarray(v, jnp.float64) for k, v in x_N.items()}))
  j_GxNxP = j_GxNxP * (np.asarray(weight_GxN)[ok] > 0)[..., None]
  free = np.asarray(free_GxP, bool)[ok]
  result = np.zeros(len(j_GxNxP), bool)
  for pattern in {tuple(f) for f in free}:  # one batched SVD per set of free parameters
    rows = np.flatnonzero((free == pattern).all(axis=1))
    j = j_GxNxP[rows][..., np.asarray(pattern)]
    norm = np.linalg.norm(j, axis=1, keepdims=True)
    good = np.all(np.isfinite(j), axis=(1, 2)) & np.all(norm[:, 0] > 0, axis=1)
    sv = np.linalg.svd(np.where(norm > 0, j / np.where(norm > 0, norm, 1.0), 0.0),
                       compute_uv=False)
    result[rows] = good & (sv[:, -1] > rtol * sv[:, 0])
  out[ok] = result
  return out


def whitening(form: forms_lib.Form, theta_P, x_N) -> tuple[np.ndarray, np.ndarray]:
  """(theta, S) with S^T J^T J S = I for J = d log L_hat / d theta at theta.

  The Gauss-Newton matrix J^T J carries the strong correlations of the law's
  parameters (ln A with alpha through ln N ~ 20, ...); refits started near theta
  run in u = S^-1 (theta' - theta), where those are gone: bootstrap refits then
  need ~15 instead of ~70 evaluations. Tiny eigenvalues are floored.
  """
  j_NxP = _jacobian(form, theta_P, x_N)
  eig, vec = np.linalg.eigh(j_NxP.T @ j_NxP)
  eig = np.maximum(eig, max(eig.max(), TINY) * 1e-12)
  return np.asarray(theta_P, np.float64), vec / np.sqrt(eig)
