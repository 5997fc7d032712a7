"""``vimodels nuts`` prints its site table without pandas (vimodels.cli.compare.format_rows)."""

from __future__ import annotations

from vimodels.cli.compare import format_rows

ROWS = [
    {"site": "mu", "element": "mu", "mean": 4.39312, "ess_bulk": 679.123, "n": 3},
    {"site": "theta", "element": "theta[10]", "mean": -0.000123456, "ess_bulk": 12.0, "n": 12},
]


def test_columns_are_right_aligned_with_four_significant_digits():
    lines = format_rows(ROWS).splitlines()
    assert lines == [
        " site   element       mean ess_bulk  n",
        "   mu        mu      4.393    679.1  3",
        "theta theta[10] -0.0001235       12 12",
    ]


def test_no_rows_is_an_empty_table():
    assert format_rows([]) == ""
