"""How often, and where, the LLM must step in (FS-GEN's analyses).

Pure NumPy / SciPy on the per-token records of `collab_generate`:

  collaboration frequency   share of generated tokens whose final choice
                            differs from the SLM's own greedy choice, with
                            the LLM consulted at every step (router "always")
  LLM-call rate             share of tokens where the router consulted it
  position histogram        interventions in 10 bins of relative position
                            t / length of each output
  threshold sweep           quality vs call rate as a router threshold moves
  scaling law               y = b - a x^(-alpha), x = N_LLM / N_SLM, fitted
                            with scipy's curve_fit (p0 = 1, 1, 1; lower bounds
                            0.05; maxfev 2000, as FS-GEN's code), with standard
                            errors and residuals; a fit with a parameter on its
                            bound is reported as such (`is_law` False), and
                            with >= 4 pairs the largest ratio is held out and
                            predicted from the others
"""

from __future__ import annotations

import numpy as np


def valid_mask(lengths: np.ndarray, width: int) -> np.ndarray:
  return np.arange(width)[None, :] < np.asarray(lengths)[:, None]


def position_histogram(events: np.ndarray, lengths: np.ndarray, bins: int = 10) -> dict:
  """Events [B, N] (bool) binned by relative position t / length_b of each row.

  Returns counts of events, counts of tokens, and their ratio per bin (the
  rate of intervention at that stage of the output).
  """
  events = np.asarray(events, bool)
  lengths = np.asarray(lengths)
  valid = valid_mask(lengths, events.shape[1])
  t = np.broadcast_to(np.arange(events.shape[1])[None, :], events.shape)
  rel = t / np.maximum(lengths, 1)[:, None]  # in [0, 1)
  which = np.minimum((rel * bins).astype(int), bins - 1)
  event_counts = np.bincount(which[valid & events], minlength=bins)
  token_counts = np.bincount(which[valid], minlength=bins)
  rate = np.where(token_counts > 0, event_counts / np.maximum(token_counts, 1), 0.0)
  return {
    "bin_edges": np.linspace(0, 1, bins + 1).tolist(),
    "events": event_counts.tolist(),
    "tokens": token_counts.tolist(),
    "rate": rate.tolist(),
    "share_of_events": (event_counts / max(event_counts.sum(), 1)).tolist(),
  }


LOWER = 0.05  # every parameter's lower bound in the fit (FS-GEN's)


def scaling_law(x: np.ndarray, a: float, alpha_: float, b: float) -> np.ndarray:
  return b - a * np.power(np.asarray(x, np.float64), -alpha_)


def fit_scaling_law(ratios, values) -> dict:
  """Fits y = b - a x^(-alpha) (all three >= 0.05); needs at least three pairs."""
  from scipy.optimize import curve_fit  # noqa: PLC0415 (heavy: only the scaling-law fit)

  x, y = np.asarray(ratios, np.float64), np.asarray(values, np.float64)
  if x.shape != y.shape or x.ndim != 1:
    raise ValueError(f"ratios and values must be two equal 1-D lists, got {x.shape}, {y.shape}")
  if len(x) < 3:
    raise ValueError(f"the scaling law has 3 parameters; it needs >= 3 model pairs, got {len(x)}")
  if (x <= 0).any():
    raise ValueError(f"parameter ratios must be > 0, got {x.tolist()}")
  f = scaling_law
  (a, alpha_, b), cov = curve_fit(
    f, x, y, p0=[1.0, 1.0, 1.0], bounds=([LOWER] * 3, [np.inf] * 3), maxfev=2000
  )
  pred = f(x, a, alpha_, b)
  ss_res = float(((y - pred) ** 2).sum())
  ss_tot = float(((y - y.mean()) ** 2).sum())
  names = ("a", "alpha", "b")
  at_bounds = [n for n, v in zip(names, (a, alpha_, b)) if v <= LOWER * (1 + 1e-6)]
  stderr = np.sqrt(np.clip(np.diag(cov), 0, None)) if np.all(np.isfinite(cov)) else None
  return {
    "a": float(a),
    "alpha": float(alpha_),
    "b": float(b),
    "stderr": None if stderr is None else dict(zip(names, map(float, stderr))),
    "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"),
    "x": x.tolist(),
    "y": y.tolist(),
    "predicted": pred.tolist(),
    "residuals": (y - pred).tolist(),
    # A parameter stuck on its bound: the data do not follow the law's shape.
    "at_bounds": at_bounds,
    "is_law": not at_bounds,
  }


def fit_with_holdout(ratios, values) -> dict:
  """fit_scaling_law on all pairs, and (>= 4 pairs) on all but the largest ratio, whose value
  it then predicts: `holdout` {ratio, measured, predicted, error}."""
  fit = fit_scaling_law(ratios, values)
  order = np.argsort(np.asarray(ratios, np.float64))
  x, y = np.asarray(ratios, np.float64)[order], np.asarray(values, np.float64)[order]
  if len(x) >= 4:
    part = fit_scaling_law(x[:-1], y[:-1])
    guess = float(scaling_law(x[-1:], part["a"], part["alpha"], part["b"])[0])
    fit["holdout"] = {
      "ratio": float(x[-1]),
      "measured": float(y[-1]),
      "predicted": guess,
      "error": guess - float(y[-1]),
      "fit": part,
    }
  return fit


def plot_positions(hists: dict, path: str, title: str) -> None:
  """{pair name: position_histogram(...)}: the rate of change per bin, one line a pair."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for name, hist in hists.items():
    edges = np.asarray(hist["bin_edges"])
    centers = (edges[:-1] + edges[1:]) / 2 * 100
    ax.plot(centers, np.asarray(hist["rate"]) * 100, marker="o", label=name)
  ax.set_xlabel("relative position in the output (%)")
  ax.set_ylabel("tokens changed by the LLM (%)")
  ax.set_title(title)
  ax.legend(fontsize="small")
  ax.grid(True, alpha=0.3)
  _save(fig, path)


def plot_sweep(
  rows: list[dict], path: str, title: str, *, metric: str = "bleu", llm: dict | None = None
) -> None:
  """Quality vs LLM-call rate (left) and vs wall time (right), a line per router kind;
  speculative decoding (lossless: a time, no rate to sweep) and the LLM alone as single
  points."""
  plt = _pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
  for i, kind in enumerate(sorted({r["router"] for r in rows})):
    pts = sorted(
      (r.get("large_call_rate", 1.0), r["seconds"], r["quality"])
      for r in rows
      if r["router"] == kind
    )
    style = dict(marker="o" if len(pts) > 1 else "*", label=kind, color=f"C{i}")
    if kind != "speculative":
      left.plot([p[0] * 100 for p in pts], [p[2] for p in pts], **style)
    right.plot([p[1] for p in pts], [p[2] for p in pts], **style)
  if llm is not None:
    left.axhline(llm["quality"], color="gray", ls="--", label="LLM alone")
    right.scatter(
      [llm["seconds"]], [llm["quality"]], color="black", marker="s", label="LLM alone", zorder=3
    )
  left.set_xlabel("LLM-call rate (% of tokens)")
  right.set_xlabel("seconds")
  for ax in (left, right):
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
  fig.suptitle(title)
  _save(fig, path)


def plot_scaling(fit: dict, path: str, title: str) -> None:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  x = np.asarray(fit["x"])
  ax.scatter(x, np.asarray(fit["y"]) * 100, label="measured", zorder=3)
  grid = np.geomspace(x.min() * 0.8, x.max() * 1.25, 100)
  ax.plot(
    grid,
    scaling_law(grid, fit["a"], fit["alpha"], fit["b"]) * 100,
    label=f"{fit['b']:.3f} - {fit['a']:.3f} x^-{fit['alpha']:.2f}",
  )
  ax.set_xscale("log")
  ax.set_xlabel("parameter ratio N_LLM / N_SLM")
  ax.set_ylabel("collaboration frequency (%)")
  ax.set_title(title)
  ax.legend()
  ax.grid(True, alpha=0.3)
  _save(fig, path)


def _pyplot():
  import matplotlib  # noqa: PLC0415 (heavy: only the plots need it)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415 (after the backend is set)

  return plt


def _save(fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  _pyplot().close(fig)
