"""Non-dominated sorting and average ranks on small hand-computed examples; the stored paper Table 1."""

import math

import numpy as np
import pytest

from rflow_jax.eval import ranking
from rflow_jax.flow import formulations

# (score ↑, fid ↓). A and B are not dominated; C is dominated by A and B; D only by B; E by everyone.
#   A (0.9, 10)  B (0.8, 5)  C (0.7, 12)  D (0.6, 6)  E (0.5, 20)
POINTS = {"A": (0.9, 10.0), "B": (0.8, 5.0), "C": (0.7, 12.0), "D": (0.6, 6.0), "E": (0.5, 20.0)}


def test_fronts_of_a_hand_computed_example():
  assert ranking.rank_setting(POINTS) == {"A": 1, "B": 1, "C": 2, "D": 2, "E": 3}


def test_equal_points_share_a_front_and_weak_domination_counts():
  # F equals A (tie, same front); G has A's score but a worse FD (dominated by A only weakly better in one).
  points = {**POINTS, "F": (0.9, 10.0), "G": (0.9, 11.0)}
  ranks = ranking.rank_setting(points)
  assert ranks["F"] == ranks["A"] == 1
  assert ranks["G"] == 2


def test_non_finite_values_count_as_worst():
  points = {"A": (0.9, 10.0), "B": (0.8, float("nan")), "C": (float("nan"), 1.0), "D": (0.1, 50.0)}
  ranks = ranking.rank_setting(points)
  # B's FD is worst but its score beats D's, so B is not dominated by D: both sit behind A.
  assert ranks == {"A": 1, "B": 2, "C": 1, "D": 2}


def test_general_sort_with_three_objectives_and_directions():
  points = [[1, 1, 1], [0, 0, 0], [2, 0, 0], [1, 1, 0]]
  # Minimise all three: [0,0,0] dominates everything; [2,0,0] and [1,1,0] are incomparable; [1,1,1] is behind [1,1,0].
  np.testing.assert_array_equal(ranking.non_dominated_sort(points, (False, False, False)), [3, 1, 2, 2])
  # Maximise all three: [1,1,1] and [2,0,0] are incomparable and undominated; [1,1,0] beats only [0,0,0].
  np.testing.assert_array_equal(ranking.non_dominated_sort(points, (True, True, True)), [1, 3, 1, 2])


def test_sort_rejects_mismatched_objectives():
  with pytest.raises(ValueError, match=r"points must be \(N, 2\).*got shape \(2, 3\)"):
    ranking.non_dominated_sort([[1, 2, 3], [4, 5, 6]], (True, False))


def test_average_ranks_over_all_settings_and_subsets():
  table = {
      "ema/5": POINTS,  # A1 B1 C2 D2 E3
      "ema/25": {
          "A": (0.5, 1.0),
          "B": (0.6, 2.0),
          "C": (0.9, 0.5),  # C dominates all: C1, B2, A2, D3, E4
          "D": (0.4, 3.0),
          "E": (0.1, 9.0),
      },
  }
  avg = ranking.average_ranks(table)
  assert avg == {"A": 1.5, "B": 1.5, "C": 1.5, "D": 2.5, "E": 3.5}
  assert list(avg)[-1] == "E"  # Sorted best first.
  assert ranking.average_ranks(table, ["ema/25"]) == {"C": 1.0, "A": 2.0, "B": 2.0, "D": 3.0, "E": 4.0}


@pytest.mark.parametrize(
    "settings, message",
    [
        ([], "at least one setting"),
        (["raw/5"], r"unknown settings \['raw/5'\]"),
    ],
)
def test_average_ranks_rejects_bad_settings(settings, message):
  with pytest.raises(ValueError, match=message):
    ranking.average_ranks({"ema/5": POINTS}, settings)


def test_average_ranks_rejects_settings_with_different_variants():
  with pytest.raises(ValueError, match=r"setting 'b' has variants \['A'\]"):
    ranking.average_ranks({"a": {"A": (1, 1), "B": (0, 2)}, "b": {"A": (1, 1)}})


def test_spearman_on_common_variants():
  ours = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0, "only_ours": 9.0}
  assert ranking.spearman(ours, {"a": 10, "b": 20, "c": 30, "d": 40}) == (pytest.approx(1.0), 4)
  assert ranking.spearman(ours, {"a": 4, "b": 3, "c": 2, "d": 1}) == (pytest.approx(-1.0), 4)
  rho, n = ranking.spearman(ours, {"a": 1, "b": 2})
  assert math.isnan(rho) and n == 2


def test_paper_table_is_canonical_sorted_and_matches_formulations():
  assert tuple(ranking.PAPER_AVERAGE_RANKS) == formulations.PAPER_TABLE1
  for name in ranking.PAPER_AVERAGE_RANKS:
    assert formulations.get(name).name == name
  alls = [v["all"] for v in ranking.PAPER_AVERAGE_RANKS.values()]
  assert alls == sorted(alls)
  assert ranking.PAPER_AVERAGE_RANKS["rf/lognorm(0.00,1.00)"] == {"all": 1.54, "5 steps": 1.25, "50 steps": 1.50}
