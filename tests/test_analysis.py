"""Collaboration analyses: the scaling-law fit and the position histogram, by hand."""

import numpy as np
import pytest

from l2s_jax.collab import analysis


def test_scaling_law_fit_recovers_known_parameters():
  x = np.asarray([2.0, 4.0, 8.0, 16.0, 32.0, 64.0])
  y = 0.4 - 0.3 * x**-0.5  # b = 0.4, a = 0.3, alpha = 0.5
  fit = analysis.fit_scaling_law(x, y)
  assert fit["a"] == pytest.approx(0.3, rel=1e-3)
  assert fit["alpha"] == pytest.approx(0.5, rel=1e-3)
  assert fit["b"] == pytest.approx(0.4, rel=1e-3)
  assert fit["r2"] == pytest.approx(1.0, abs=1e-6)


def test_scaling_law_fit_respects_the_lower_bounds_and_says_so():
  x = np.asarray([2.0, 4.0, 8.0, 16.0])
  y = 0.2 + 0.1 * x**-1.0  # decreasing: a would be negative
  fit = analysis.fit_scaling_law(x, y)
  assert min(fit["a"], fit["alpha"], fit["b"]) >= 0.05 - 1e-12
  assert fit["at_bounds"] and fit["is_law"] is False  # reported as no law


def test_scaling_law_standard_errors_residuals_and_a_held_out_pair():
  """Noisy points of b = 0.4, a = 0.3, alpha = 0.5: the residuals are measured - predicted,
  the standard errors are finite and shrink with less noise, and the largest ratio held out
  is predicted by the fit on the other four within the noise."""
  x = np.asarray([2.0, 4.0, 8.0, 16.0, 32.0])
  noise = np.asarray([0.004, -0.003, 0.002, -0.004, 0.003])
  y = 0.4 - 0.3 * x**-0.5 + noise
  fit = analysis.fit_with_holdout(x, y)
  assert fit["is_law"] and fit["at_bounds"] == []
  np.testing.assert_allclose(fit["residuals"], y - np.asarray(fit["predicted"]), atol=1e-12)
  assert all(0 < fit["stderr"][k] < 0.5 for k in ("a", "alpha", "b"))
  quiet = analysis.fit_scaling_law(x, 0.4 - 0.3 * x**-0.5 + noise / 10)
  assert quiet["stderr"]["b"] < fit["stderr"]["b"] / 5
  held = fit["holdout"]
  assert held["ratio"] == 32.0 and held["measured"] == pytest.approx(y[-1])
  part = held["fit"]
  assert held["predicted"] == pytest.approx(part["b"] - part["a"] * 32.0 ** -part["alpha"])
  assert abs(held["error"]) < 0.02 and held["error"] == held["predicted"] - held["measured"]
  assert "holdout" not in analysis.fit_with_holdout(x[:3], y[:3])  # 3 pairs: no hold-out


def test_scaling_law_needs_three_pairs():
  with pytest.raises(ValueError, match="needs >= 3 model pairs, got 2"):
    analysis.fit_scaling_law([2.0, 4.0], [0.1, 0.2])
  with pytest.raises(ValueError, match="ratios must be > 0"):
    analysis.fit_scaling_law([0.0, 4.0, 8.0], [0.1, 0.2, 0.3])


def test_position_histogram_by_hand():
  # Row 0: length 10, events at t = 0, 1, 9 -> bins 0, 1, 9.
  # Row 1: length 4, events at t = 3 -> rel 0.75 -> bin 7; t = 0 -> bin 0.
  # Row 2: length 2 with an event at t = 5 (past its end: ignored).
  events = np.zeros((3, 10), bool)
  events[0, [0, 1, 9]] = True
  events[1, [0, 3]] = True
  events[2, 5] = True
  hist = analysis.position_histogram(events, np.asarray([10, 4, 2]))
  assert hist["events"] == [2, 1, 0, 0, 0, 0, 0, 1, 0, 1]
  # Tokens per bin: row 0 one per bin; row 1 at bins 0, 2, 5, 7; row 2 at bins 0, 5.
  assert hist["tokens"] == [3, 1, 2, 1, 1, 3, 1, 2, 1, 1]
  assert hist["rate"][0] == pytest.approx(2 / 3)
  assert sum(hist["share_of_events"]) == pytest.approx(1.0)
