"""What `llmlab backtest` writes: grid.csv, summary.json, heat maps, report.md.

Kept apart from backtest.py (the grid and its fits) as the studies keep their
reports apart from their analyses.
"""

from __future__ import annotations

import csv
import io
import math

import numpy as np

from llmlab import storage
from llmlab.scaling import backtest as bt

CONTOURS = (0.05, 0.10, 0.15)


def grid_csv(rows) -> str:
  buf = io.StringIO(newline="")
  w = csv.writer(buf)
  w.writerow(bt.GRID_COLUMNS)
  for r in rows:
    w.writerow(["" if isinstance(r[c], float) and not math.isfinite(r[c]) else r[c]
                for c in bt.GRID_COLUMNS])
  return buf.getvalue()


def summary_json(result: dict) -> dict:
  """summary.json: {"families": {F: {target, best, cheapest, n_fits,
  fit_seconds, ...}}, "n_fits", "seconds", ...}."""
  return dict(form=result["form"], families=result["families"],
              n_fits=result["n_fits"], seconds=result["seconds"],
              skipped=result["skipped"])


def heatmap(family: str, rows):
  """ARE over n_models x fraction, one panel per design and min_tokens, with
  contours at 5/10/15% and dashed iso-lines of compute fraction."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
  from matplotlib.figure import Figure  # noqa: PLC0415

  rows = [r for r in rows if r["checkpoints"] == "all" and
          r["design"] in ("smallest", "closest")]
  cuts = sorted({r["min_tokens"] for r in rows})
  fig = Figure(figsize=(5.2 * len(cuts), 8.4), dpi=90)
  FigureCanvasAgg(fig)
  ks = sorted({r["n_models"] for r in rows})
  ps = sorted({r["fraction"] for r in rows})
  image = None
  for i, design in enumerate(("smallest", "closest")):
    for j, cut in enumerate(cuts):
      ax = fig.add_subplot(2, len(cuts), i * len(cuts) + j + 1)
      are_KxP = np.full((len(ks), len(ps)), np.nan)
      cf_KxP = np.full_like(are_KxP, np.nan)
      for r in rows:
        if r["design"] == design and r["min_tokens"] == cut:
          a, b = ks.index(r["n_models"]), ps.index(r["fraction"])
          are_KxP[a, b], cf_KxP[a, b] = r["are"], r["compute_fraction"]
      image = ax.imshow(100 * np.clip(are_KxP, 0, 0.3), origin="lower", aspect="auto",
                        cmap="viridis_r", vmin=0, vmax=30,
                        extent=(ps[0] - 0.05, ps[-1] + 0.05, ks[0] - 0.5, ks[-1] + 0.5))
      if len(ks) > 1 and np.isfinite(are_KxP).sum() > 3:
        cs = ax.contour(ps, ks, np.nan_to_num(are_KxP, nan=1.0), levels=CONTOURS,
                        colors="white", linewidths=1.2)
        ax.clabel(cs, fmt=lambda v: f"{100 * v:.0f}%", fontsize=7)
        levels = [v for v in (0.01, 0.03, 0.1, 0.3, 1.0)
                  if np.nanmin(cf_KxP) < v < np.nanmax(cf_KxP)]
        if levels:
          cc = ax.contour(ps, ks, cf_KxP, levels=levels, colors="red",
                          linestyles="dashed", linewidths=0.8)
          ax.clabel(cc, fmt=lambda v: f"C {v:g}", fontsize=6)
      ax.set_title(f"{design}, min_tokens {cut:.3g}", fontsize=9)
      ax.set_xlabel("fraction of each model's training")
      ax.set_ylabel("models fitted (k)")
      ax.set_yticks(ks)
  fig.subplots_adjust(hspace=0.35)
  fig.suptitle(f"{family}: ARE % (white: 5/10/15%; red dashed: compute fraction)")
  if image is not None:
    fig.colorbar(image, ax=fig.axes, shrink=0.6, label="ARE %")
  return fig


def _pct(v) -> str:
  return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.2f}%"


def _cell_line(c) -> str:
  if c is None:
    return "none reaches it"
  return (f"{c['design']}, k={c['n_models']}, p={c['fraction']:g}, min_tokens "
          f"{c['min_tokens']:.3g} ({c['checkpoints']} checkpoints): ARE "
          f"{_pct(c['are'])}, compute {c['compute_fraction']:.3g} of the target's"
          + ("" if c.get("bounded", 1) else "; a parameter not identified (bounded = 0)")
          + ("" if c.get("identified", 1) else "; not pinned by its points (identified = 0)"))


def _check_line(question: str, c: dict | None, first: str, second: str) -> str:
  if c is None:
    return (f"- {question} Not measurable here: no matched pair of identified "
            "cells (a fit needs more distinct points than free parameters; and with "
            "3 sizes the closest and the smallest k = 2 are the same models).")
  verdict = "yes" if c["median_diff"] < 0 else "no"
  return (f"- {question} **{verdict}**: {first} wins {c['wins']} of {c['pairs']} "
          f"matched cells (median ARE {_pct(c.get('median_first'))} vs "
          f"{_pct(c.get('median_second'))} for {second}, mean {_pct(c['mean_first'])} "
          f"vs {_pct(c['mean_second'])}{_skew(c)}; median difference "
          f"{100 * c['median_diff']:+.2f} points).")


def _skew(c: dict) -> str:
  """Why mean and median disagree, where they do by more than 2x."""
  ratios = [c[f"mean_{k}"] / c[f"median_{k}"] for k in ("first", "second")
            if c.get(f"median_{k}")]
  return ": a few fits that blow up move the mean" if ratios and max(ratios) > 2 else ""


def report(result: dict) -> str:
  """report.md: per family, the best and cheapest cells and the guide's checks."""
  lines = [f"# Backtest of the {result['form']} law", "",
           f"{result['n_fits']} fits in {result['seconds']:.1f} s. Each family's "
           "largest size is the target, scored by ARE (mean |L - L_hat| / L over "
           "its checkpoints at >= 70% of its tokens; Choshen et al. 2024). grid.csv "
           "holds every cell; heatmap_<family>.png shows ARE over models x fraction.",
           ""]
  for msg in result["skipped"]:
    lines += [f"- {msg}"]
  for name, s in result["families"].items():
    lines += [f"## {name}", "",
              f"Target {s['target']}; {s['sizes']} sizes; min_tokens cut "
              f"{s['min_tokens_cut']:.3g} (1e10, scaled to the family's run length); "
              f"{s['n_fits']} fits in {s['fit_seconds']:.1f} s.", ""]
    if s.get("n_unbounded"):
      lines += [f"{s['n_unbounded']} of the {s['n_fits']} fits put a parameter far "
                "outside the form's grid of starts (grid.csv `bounded` = 0: E -> 0, "
                "or an exponent so large that its term is switched off): their "
                "points do not identify it, and their ARE can depend on where the "
                "optimiser stopped.", ""]
    if s.get("n_unidentified"):
      lines += [f"{s['n_unidentified']} of the {s['n_fits']} fits are not pinned by "
                "their points (grid.csv `identified` = 0: the Jacobian of the cell's "
                "predictions is rank-deficient in its free parameters; every cell of "
                "2 sizes for the Chinchilla law): another fit with the same objective "
                "predicts otherwise, so read their ARE as one of a range.", ""]
    if s.get("borrowed"):
      lines += ["Borrowed (median of the other families' fits, log space): " +
                "; ".join(f"{d}: " + ", ".join(f"{k} {v:.4g}" for k, v in p.items())
                          for d, p in s["borrowed"].items()), ""]
    if not s["n_fits"]:
      lines += [f"No cell is identified: none has more distinct points than the "
                f"{result['form']} law's free parameters (final losses only, or too "
                "few checkpoints per model, give each model a point or two). Give "
                "intermediate checkpoints: the guide's first advice.", ""]
    else:
      lines += [f"- Best: {_cell_line(s['best'])}"]
      for t, c in s["cheapest"].items():
        lines += [f"- Cheapest with ARE <= {float(t):.0%}: {_cell_line(c)}"]
      pinned = s["cheapest_identified"]
      if s["best_identified"] != s["best"] or pinned != s["cheapest"]:
        lines += ["", "Among the fits their points pin (`identified` and `bounded`; "
                  "the others' ARE can be luck):"]
        if s["best_identified"] is None:
          lines += ["- none: no fit of this family is pinned by its points, so "
                    "every ARE above is one of a range"]
        else:
          lines += [f"- Best: {_cell_line(s['best_identified'])}"]
          for t, c in pinned.items():
            lines += [f"- Cheapest with ARE <= {float(t):.0%}: {_cell_line(c)}"]
    ch = s["checks"]
    lines += ["", "The guide's checks (matched cells: same design, k, fraction):",
              _check_line("Do intermediate checkpoints beat final losses only?",
                          ch["intermediate_vs_final"], "all checkpoints", "final only"),
              _check_line("Does dropping early tokens help?", ch["drop_early_vs_keep"],
                          "dropping", "keeping them"),
              _check_line("Does closest-in-scale beat smallest-k?",
                          ch["closest_vs_smallest"], "closest", "smallest"), ""]
  return "\n".join(lines) + "\n"


def write(out_dir: str, result: dict) -> list[str]:
  """Writes every output into out_dir; returns the file names."""
  from llmlab.scaling import plots  # noqa: PLC0415 (matplotlib)

  storage.makedirs(out_dir)
  storage.write_text(storage.join(out_dir, "grid.csv"), grid_csv(result["rows"]))
  storage.write_json(storage.join(out_dir, "summary.json"),
                     storage.json_safe(summary_json(result)))
  figs = {}
  for fam in result["families"]:
    figs[f"heatmap_{fam}"] = heatmap(fam, [r for r in result["rows"]
                                           if r["family"] == fam])
  written = plots.save(figs, out_dir, prefix="backtest") if figs else []
  storage.write_text(storage.join(out_dir, "report.md"), report(result))
  return ["grid.csv", "summary.json", "report.md"] + [str(p).rsplit("/", 1)[-1]
                                                       for p in written]
