"""Figures of a scaling-law fit, written as PNGs and as TensorBoard images.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot, so
no global backend or figure state is touched in a process that also trains).
"""

import io

import matplotlib
import matplotlib.image
import numpy as np
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from llmlab import metrics as metrics_lib
from llmlab import storage

MAX_CURVES = 12
X_LABELS = {"tokens": "training tokens D", "compute": "training compute C (FLOPs)",
            "flops": "training compute C (FLOPs)"}


def _log_loss_axis(ax) -> None:
  """A log loss axis whose labels read as numbers (2.5, 3, 4), not as
  10^0 plus a stray minor label: losses span far less than a decade."""
  ax.set_yscale("log")
  ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 1.25, 1.5, 2.0, 2.5,
                                                     3.0, 4.0, 5.0, 6.0, 8.0)))
  ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))
  ax.yaxis.set_minor_formatter(ticker.NullFormatter())
  ax.set_ylabel("loss (nats/token)")


def figure(title: str):
  fig = Figure(figsize=(6.4, 4.8), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  ax.set_title(title)
  ax.grid(True, which="both", alpha=0.3)
  return fig, ax


def _models(records) -> list[float]:
  """Model sizes to draw a curve for: all of them, or MAX_CURVES quantiles."""
  sizes = np.unique(records["params"])
  if len(sizes) > MAX_CURVES:
    sizes = np.unique(np.quantile(sizes, np.linspace(0, 1, MAX_CURVES), method="nearest"))
  return sizes.tolist()


def loss_curves(records, curve, target=None, band=None, xkey: str = "tokens"):
  """Loss against tokens (or compute) per model with fitted curves.

  curve(N, x) -> fitted losses at model size N; target: dict with "x" and maybe
  "loss" of the target; band: dict "x", "mid", "lo", "hi" of its prediction.
  """
  fig, ax = figure(f"loss vs {xkey}: data and fit")
  xs = records[xkey] if xkey in records else 6.0 * records["params"] * records["tokens"]
  logn = np.log10(records["params"])
  sc = ax.scatter(xs, records["loss"], c=logn, s=10, cmap="viridis", label="fitted records")
  fig.colorbar(sc, ax=ax, label="log10 params")
  norm = sc.norm
  for n in _models(records):
    m = records["params"] == n
    grid = np.geomspace(xs[m].min() if m.sum() > 1 else xs.min(), xs[m].max() if m.sum() > 1
                        else xs.max(), 100)
    ax.plot(grid, curve(n, grid), color=sc.cmap(norm(np.log10(n))), lw=1)
  if band is not None:
    ax.fill_between(band["x"], band["lo"], band["hi"], color="tab:red", alpha=0.25)
    ax.plot(band["x"], band["mid"], color="tab:red", lw=1.5)
    # The prediction at the target's last point: a marker with its 95%
    # interval as an error bar, visible however narrow the band is.
    mid, lo, hi = (float(np.ravel(band[k])[-1]) for k in ("mid", "lo", "hi"))
    # (A bootstrap percentile interval need not contain the point estimate.)
    ax.errorbar([np.ravel(band["x"])[-1]], [mid],
                yerr=[[max(mid - lo, 0.0)], [max(hi - mid, 0.0)]],
                fmt="D", color="tab:red", ms=7, capsize=5, elinewidth=2,
                label="target prediction, 95% interval")
  if target is not None and target.get("loss") is not None:
    ax.scatter(target["x"], target["loss"], color="black", marker="x", s=40,
               zorder=5, label="target actual")
  ax.set_xscale("log")
  _log_loss_axis(ax)
  ax.set_xlabel(X_LABELS.get(xkey, xkey))
  ax.legend(fontsize=8)
  return fig


def target_curve(family: dict, target: str, points: list[dict], x: str = "step"):
  """The curve design on one chart: the fitted members' logged evals (one
  line each), the target's evals and its predicted curve with the widest 95%
  band the points carry (seed noise folded in where measured).

  family: {run: (x values, losses, N)}, coloured by log N (a member's seed
  re-runs share its colour); points: the target's rows (x, loss, loss_hat
  and maybe run_lo/run_hi, obs_lo/obs_hi, loss_lo/loss_hi)."""
  fig, ax = figure(f"{target}: predicted along its curve")
  cmap = matplotlib.colormaps["viridis"]
  logn = np.log([n for _, _, n in family.values()])
  span = max(float(np.ptp(logn)), 1e-9)
  for (run, (xs, loss, _)), u in zip(family.items(), logn):
    ax.plot(xs, loss, color=cmap((u - logn.min()) / span), lw=1, alpha=0.8,
            label=run if len(family) <= MAX_CURVES else None)
  xs = np.array([r[x] for r in points], np.float64)
  col = lambda k: np.array([np.nan if r.get(k) is None else r[k] for r in points],
                           np.float64)  # a point without an interval: a gap
  for lo, hi in (("run_lo", "run_hi"), ("obs_lo", "obs_hi"), ("loss_lo", "loss_hi")):
    if np.isfinite(col(lo)).any():
      ax.fill_between(xs, col(lo), col(hi), color="tab:red", alpha=0.2,
                      label="95% interval")
      break
  ax.plot(xs, [r["loss_hat"] for r in points], color="tab:red", lw=1.5,
          label=f"{target} predicted")
  ax.scatter(xs, [r["loss"] for r in points], color="black", marker="x", s=25,
             zorder=5, label=f"{target} actual")
  _log_loss_axis(ax)
  ax.set_xlabel("training step" if x == "step" else X_LABELS.get(x, x))
  ax.legend(fontsize=7)
  return fig


def predicted_vs_actual(actual, predicted, target_actual=None, target_predicted=None):
  fig, ax = figure("predicted vs actual loss")
  ax.scatter(actual, predicted, s=10, label="fitted records")
  if target_actual is not None and len(target_actual):
    ax.scatter(target_actual, target_predicted, s=20, color="tab:red", marker="x",
               label="target")
  lo = min(np.min(actual), np.min(predicted))
  hi = max(np.max(actual), np.max(predicted))
  ax.plot([lo, hi], [lo, hi], color="gray", lw=1, ls="--", label="y = x")
  ax.set_xlabel("actual loss (nats/token)")
  ax.set_ylabel("predicted loss (nats/token)")
  ax.legend(fontsize=8)
  return fig


def compute_frontier(optimal: dict, records=None):
  """N*(C) and D*(C) of the compute-optimal allocation, with the fitted runs."""
  fig, ax = figure(f"compute-optimal frontier (N* ~ C^{optimal['a']:.3f})")
  ax.plot(optimal["compute"], optimal["params"], label="N* (params)")
  ax.plot(optimal["compute"], optimal["tokens"], label="D* (tokens)")
  if records is not None:
    c = 6.0 * records["params"] * records["tokens"]
    ax.scatter(c, records["params"], s=8, alpha=0.5, label="fitted runs (N)")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("training compute C = 6ND (FLOPs)")
  ax.set_ylabel("params N / training tokens D")
  ax.legend(fontsize=8)
  return fig


def saturation_plot(rows: list[dict], threshold: float):
  fig, ax = figure(f"saturation: doubling tokens gains < {threshold:g} nats")
  n = [r["params"] for r in rows]
  ax.scatter(n, [r["saturation_tokens"] for r in rows], label="saturation tokens")
  ax.scatter(n, [r["final_tokens"] for r in rows], marker="x", label="final tokens")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("params N")
  ax.set_ylabel("training tokens D")
  ax.legend(fontsize=8)
  return fig


def _rgba(fig) -> np.ndarray:
  """Renders once; the pixels go both to the PNG and to TensorBoard."""
  canvas = FigureCanvasAgg(fig)
  canvas.draw()
  return np.asarray(canvas.buffer_rgba()).copy()


def save(figures: dict, out_dir: str, prefix: str = "fit",
         scalars=(), fresh: bool = False) -> list[str]:
  """Writes name.png for each figure and the same images (tags
  `prefix/name`) plus `scalars` ((tag, value, step) triples) under
  out_dir/tensorboard, local or gs://. `fresh` first drops the event files
  an earlier invocation wrote there (a report rewritten whole)."""
  if fresh:
    tb_dir = storage.join(out_dir, "tensorboard")
    for name in storage.listdir(tb_dir):
      if name.startswith("events.out.tfevents"):
        storage.remove(storage.join(tb_dir, name))
  paths = []
  spool = storage.Spool(out_dir)
  writer = metrics_lib.tensorboard_writer(spool)
  try:
    for name, fig in figures.items():
      rgba = _rgba(fig)
      path = storage.join(out_dir, f"{name}.png")
      png = io.BytesIO()
      matplotlib.image.imsave(png, rgba, format="png")
      storage.write_bytes(path, png.getvalue())
      paths.append(path)
      writer.add_image(f"{prefix}/{name}", rgba[..., :3], global_step=0,
                       dataformats="HWC")
    for tag, value, step in scalars:
      writer.add_scalar(tag, value, global_step=step)
  finally:
    writer.close()
    spool.close()
  return paths
