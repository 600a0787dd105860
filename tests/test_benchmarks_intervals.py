"""benchmarks/intervals.py: the Student-t interval over replicates, and how reports print the two
intervals that would otherwise claim more than they know (one replicate; replicates that all agree)."""
import math

import pytest

from benchmarks.fewshot import recipe
from benchmarks.intervals import ZERO_MARK, ZERO_WIDTH_NOTE, format_interval, notes_for, t_interval
from benchmarks.longtail import evaluation, reports


def test_t_interval_over_replicates():
    mean, half = t_interval([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6)
    assert half == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-6)  # t_{0.975, 2} from tables
    mean, half = t_interval([0.4])
    assert mean == 0.4 and math.isnan(half)           # one replicate resamples nothing
    assert t_interval([0.72, 0.72, 0.72]) == (pytest.approx(0.72), 0.0)
    with pytest.raises(ValueError, match="no values"):
        t_interval([])


def test_zero_width_and_missing_intervals_are_marked():
    assert format_interval(0.6, 0.0125, 100, 1) == "60.0 ± 1.2"
    assert format_interval(0.72, 0.0, 100, 1) == f"72.0 ± 0.0{ZERO_MARK}"
    assert format_interval(0.05, 0.0, 100, 2, "+") == f"+5.00 ± 0.00{ZERO_MARK}"
    assert format_interval(0.5, math.nan, 100, 1) == "50.0 ± n/a"
    assert format_interval(None, None) == "–" and format_interval(math.nan, 0.1) == "–"
    # a half-width that only rounds to zero is a spread the replicates drew: not marked
    assert format_interval(0.5, 1e-5, 100, 1) == "50.0 ± 0.0"
    assert notes_for("50.0 ± 0.0") == "" and notes_for(f"72.0 ± 0.0{ZERO_MARK}") == ZERO_WIDTH_NOTE


def test_reports_explain_a_zero_width_interval_under_their_table():
    def rows(values):
        summary = evaluation.summarise({s: {m: v for m in evaluation.METRICS} for s, v in enumerate(values)})
        return reports.accuracy_rows("b", "real", "ce", summary)

    spread = reports.markdown_table(rows([0.5, 0.6, 0.7]))
    assert ZERO_MARK not in spread and ZERO_WIDTH_NOTE not in spread
    agree = reports.markdown_table(rows([0.6, 0.6, 0.6]))
    assert f"60.00 ± 0.00{ZERO_MARK}" in agree and agree.rstrip().endswith(ZERO_WIDTH_NOTE)
    variant = {"label": "v", "tail_fidelity": (1.0, 0.0), "tail_novel_fidelity": (0.9, 0.05),
               "near_copy_share": (0.0, 0.0), "tail_diversity": (0.5, 0.1), "updates_per_image": 5.0,
               "seconds_per_image": 0.1, "gain_over_real_only": {1: (0.02, math.nan)}}
    text = recipe.render({"benchmark": "b", "tail_classes": ["two"], "head": "linear", "shots": [1],
                          "variants": {"v": variant}})
    assert f"100.0 ± 0.0{ZERO_MARK}" in text and "2.0 ± n/a" in text and ZERO_WIDTH_NOTE in text
