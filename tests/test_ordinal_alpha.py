"""The report's Krippendorff alpha for a rating criterion is the ordinal one, checked against
a value computed by hand: the coincidence matrix and the ordinal distances are worked out
below, independently of the `krippendorff` package the report uses."""

from __future__ import annotations

import json
from fractions import Fraction
from itertools import permutations

import pytest

from ml_backend.cli import main as cli

CONTROL = "helpfulness_answer1"
# Task -> each annotator's 1-5 rating of answer 1's helpfulness (C did not rate task 3).
RATINGS = {
    1: {"A": 1, "B": 2, "C": 1},
    2: {"A": 3, "B": 3, "C": 4},
    3: {"A": 5, "B": 4},
    4: {"A": 2, "B": 2, "C": 2},
}


def hand_alpha(units: dict[int, dict[str, int]], ordinal: bool) -> Fraction:
    """Krippendorff's alpha, in exact fractions (Krippendorff 2011, "Computing Krippendorff's
    Alpha-Reliability", sections B and D).

    Coincidences: each unit with m values adds, for every ordered pair of two different
    coders' values (c, k), 1/(m - 1) to o[c][k]. n_c is row c's sum, n the total.
    Ordinal distance: delta^2(c, k) = (sum of n_g for g from c to k - (n_c + n_k) / 2)^2;
    nominal: 1 when c != k. D_o = sum o_ck delta^2 / n, D_e = sum n_c n_k delta^2 / (n (n - 1)),
    alpha = 1 - D_o / D_e.

    For RATINGS: o11 = 1, o12 = o21 = 1 (task 1: values 1, 2, 1, weight 1/2); o33 = 1,
    o34 = o43 = 1 (task 2); o45 = o54 = 1 (task 3, weight 1); o22 = 3 (task 4). So
    n = (n1..n5) = (2, 4, 2, 2, 1), n = 11; ordinal delta^2: (1,2) 9, (3,4) 4, (4,5) 2.25, ...
    D_o = (2*9 + 2*4 + 2*2.25) / 11 = 30.5 / 11; D_e = 2277 / 110; alpha = 1 - 305/2277 =
    1972/2277 (nominal: 1 - (6/11) / (92/110) = 8/23).
    """
    values = sorted({v for unit in units.values() for v in unit.values()})
    o = {(c, k): Fraction(0) for c in values for k in values}
    for unit in units.values():
        given = list(unit.values())
        if len(given) < 2:
            continue
        for c, k in permutations(given, 2):  # ordered pairs of two coders' values
            o[c, k] += Fraction(1, len(given) - 1)
    n_c = {c: sum(o[c, k] for k in values) for c in values}
    n = sum(n_c.values())

    def delta2(c: int, k: int) -> Fraction:
        if c == k:
            return Fraction(0)
        if not ordinal:
            return Fraction(1)
        low, high = min(c, k), max(c, k)
        between = sum(n_c[g] for g in values if low <= g <= high)
        return (between - (n_c[c] + n_c[k]) / 2) ** 2

    observed = sum(o[c, k] * delta2(c, k) for c in values for k in values) / n
    expected = sum(n_c[c] * n_c[k] * delta2(c, k) for c in values for k in values) / (n * (n - 1))
    return 1 - observed / expected


def test_hand_computation_matches_the_worked_figures():
    assert hand_alpha(RATINGS, ordinal=True) == Fraction(1972, 2277)
    assert hand_alpha(RATINGS, ordinal=False) == Fraction(8, 23)


def test_the_reports_rating_alpha_is_the_hand_computed_ordinal_one(tmp_path):
    users = {"A": 1, "B": 2, "C": 3}
    export = [
        {
            "id": task,
            "data": {"prompt": f"Question {task}?", "answer1": "one", "answer2": "two"},
            "annotations": [
                {
                    "id": 10 * task + users[who],
                    "completed_by": users[who],
                    "result": [
                        {
                            "from_name": CONTROL,
                            "to_name": "answer1",
                            "type": "rating",
                            "value": {"rating": value},
                        }
                    ],
                }
                for who, value in ratings.items()
            ],
        }
        for task, ratings in RATINGS.items()
    ]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(export))
    out = tmp_path / "report"
    assert cli(["report", "--export", str(path), "--config", "rating", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    (row,) = [r for r in report["agreement"] if r["control"] == CONTROL]
    assert row["level"] == "ordinal" and row["units"] == 4
    assert row["alpha"] == pytest.approx(float(Fraction(1972, 2277)), abs=1e-9)  # 0.86605
    assert row["alpha"] != pytest.approx(float(Fraction(8, 23)), abs=1e-3)  # not the nominal
    # Raw agreement: of the 10 pairs of ratings on shared tasks, 5 are equal (A-C on 1,
    # A-B on 2, all three pairs on 4).
    assert (row["pairs"], row["pairwise_agreement"]) == (10, 0.5)
    assert f"| {CONTROL} | ordinal | 4 | 0.866 | 0.500 | 10 |" in (out / "report.md").read_text()
    # The same figures as /metrics reads them.
    headline = json.loads((out / "headline.json").read_text())
    assert headline[f'krippendorff_alpha{{control="{CONTROL}"}}'] == row["alpha"]
    assert headline[f'pairwise_agreement{{control="{CONTROL}"}}'] == 0.5
    assert (headline["annotations"], headline["annotators"]) == (11, 3)
