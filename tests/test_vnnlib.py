"""VNN-LIB 1.0 parsing (normal form, regions, errors with line numbers), the robustness writer and result files."""

from __future__ import annotations

import gzip
import subprocess
import sys
import time

import numpy as np
import pytest

from robustkit.errors import InputError
from robustkit.vnnlib import (
    Conjunction,
    Property,
    Region,
    VnnlibError,
    format_result,
    parse_property,
    read_property,
    robustness_property,
)

HEADER_1X_2Y = "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
BOX_X0 = "(assert (>= X_0 0.0))\n(assert (<= X_0 1.0))\n"


def rows_of(conjunction: Conjunction) -> list[tuple[list[float], float]]:
    return list(zip(conjunction.rows.tolist(), conjunction.offsets.tolist(), strict=True))


# ------------------------------------------------------------------------------------- robustness round trip


def test_robustness_property_round_trips_exactly():
    rng = np.random.default_rng(0)
    lower = rng.uniform(-1, 1, size=5)
    lower[0] = 1e-17  # tiny, awkward decimals must come back bit-exactly
    upper = lower + rng.uniform(0, 0.1, size=5) + 1 / 3
    text = robustness_property(lower, upper, label=2, n_outputs=4, comment="eps 0.1\nsample 7")
    assert text.startswith("; eps 0.1\n; sample 7\n(declare-const X_0 Real)\n")
    prop = parse_property(text)
    assert (prop.n_inputs, prop.n_outputs) == (5, 4)
    (region,) = prop.regions
    assert np.array_equal(region.lower, lower) and np.array_equal(region.upper, upper)
    assert region.lower.dtype == np.float64
    assert len(region.conjunctions) == 3
    expected = {j: [0.0] * 4 for j in (0, 1, 3)}
    for j, row in expected.items():
        row[2], row[j] = 1.0, -1.0  # Y_label - Y_j <= 0
    assert sorted(rows_of(c)[0][0] for c in region.conjunctions) == sorted(expected.values())
    assert all(c.rows.shape == (1, 4) and c.offsets.tolist() == [0.0] for c in region.conjunctions)

    inside = (lower + upper) / 2
    assert not prop.is_counterexample(inside, np.array([0.0, 1.0, 5.0, 2.0]))  # label wins
    assert prop.is_counterexample(inside, np.array([0.0, 6.0, 5.0, 2.0]))  # class 1 beats the label
    assert prop.is_counterexample(inside, np.array([0.0, 1.0, 5.0, 5.0]))  # a tie counts (>=)
    outside = inside.copy()
    outside[3] = upper[3] + 1e-9
    assert not prop.is_counterexample(outside, np.array([0.0, 6.0, 5.0, 2.0]))
    assert region.contains(lower) and region.contains(upper) and not region.contains(outside)


def test_robustness_property_rejects_bad_arguments():
    with pytest.raises(InputError, match="label 3"):
        robustness_property(np.zeros(2), np.ones(2), label=3, n_outputs=3)
    with pytest.raises(InputError, match="lower <= upper"):
        robustness_property(np.ones(2), np.zeros(2), label=0, n_outputs=3)
    with pytest.raises(InputError, match="1-D"):
        robustness_property(np.zeros((2, 2)), np.ones((2, 2)), label=0, n_outputs=3)


def test_mnist_sized_property_parses_quickly():
    lower = np.linspace(0, 0.97, 784)
    text = robustness_property(lower, lower + 0.03, label=7, n_outputs=10)
    start = time.perf_counter()
    prop = parse_property(text)
    assert time.perf_counter() - start < 0.5
    assert prop.n_inputs == 784 and len(prop.regions[0].conjunctions) == 9


def test_module_does_not_import_torch():
    code = "import sys, robustkit.vnnlib; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------ normal form


def test_disjunction_of_input_boxes_gives_two_regions():
    prop = parse_property(
        HEADER_1X_2Y
        + "(assert (or (and (>= X_0 0.0) (<= X_0 1.0)) (and (>= X_0 2.0) (<= X_0 3.0))))\n"
        + "(assert (>= Y_0 Y_1))\n"
    )
    assert [(r.lower.tolist(), r.upper.tolist()) for r in prop.regions] == [([0.0], [1.0]), ([2.0], [3.0])]
    for region in prop.regions:
        (conjunction,) = region.conjunctions
        assert rows_of(conjunction) == [([-1.0, 1.0], 0.0)]  # Y_1 - Y_0 <= 0
    assert prop.is_counterexample(np.array([2.5]), np.array([1.0, 0.0]))
    assert not prop.is_counterexample(np.array([1.5]), np.array([1.0, 0.0]))  # between the boxes
    assert not prop.is_counterexample(np.array([2.5]), np.array([0.0, 1.0]))


def test_dnf_product_of_two_asserts_and_merge_of_equal_boxes():
    text = (
        "(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
        "(assert (and (>= X_1 -1) (<= X_1 1) (or (and (>= X_0 0) (<= X_0 1)) (and (>= X_0 5) (<= X_0 6)))))\n"
        "(assert (or (<= Y_0 1) (and (>= Y_1 2) (or (<= Y_0 -3) (<= Y_1 4)))))\n"
    )
    prop = parse_property(text)
    # 2 boxes x 3 output terms = 6 DNF terms, merged into 2 regions of 3 conjunctions each
    assert [r.lower.tolist() for r in prop.regions] == [[0.0, -1.0], [5.0, -1.0]]
    assert [r.upper.tolist() for r in prop.regions] == [[1.0, 1.0], [6.0, 1.0]]
    for region in prop.regions:
        assert [rows_of(c) for c in region.conjunctions] == [
            [([1.0, 0.0], -1.0)],
            [([0.0, -1.0], 2.0), ([1.0, 0.0], 3.0)],
            [([0.0, -1.0], 2.0), ([0.0, 1.0], -4.0)],
        ]
        assert region.holds(np.array([0.5, 9.0]))  # Y_0 <= 1
        assert region.holds(np.array([-4.0, 9.0]))  # Y_1 >= 2 and Y_0 <= -3
        assert region.holds(np.array([7.0, 3.0]))  # Y_1 >= 2 and Y_1 <= 4
        assert not region.holds(np.array([7.0, 9.0]))
        assert not region.holds(np.array([7.0, 1.0]))


def test_empty_box_terms_are_dropped_and_all_empty_is_trivially_unsat():
    prop = parse_property(
        HEADER_1X_2Y + "(assert (or (and (>= X_0 2) (<= X_0 1)) (and (>= X_0 0) (<= X_0 1))))\n(assert (>= Y_0 0))\n"
    )
    assert [(r.lower.tolist(), r.upper.tolist()) for r in prop.regions] == [([0.0], [1.0])]
    unsat = parse_property(HEADER_1X_2Y + "(assert (>= X_0 2))\n(assert (<= X_0 1))\n")
    assert unsat.regions == ()
    assert not unsat.is_counterexample(np.array([1.5]), np.array([0.0, 0.0]))


def test_point_box_and_no_output_constraint_means_any_output():
    prop = parse_property(HEADER_1X_2Y + "(assert (<= X_0 0.5))\n(assert (>= X_0 0.5))\n")
    (region,) = prop.regions
    (conjunction,) = region.conjunctions
    assert conjunction.rows.shape == (0, 2) and conjunction.offsets.shape == (0,)
    assert prop.is_counterexample(np.array([0.5]), np.array([-1e9, 1e9]))
    assert not prop.is_counterexample(np.array([0.6]), np.array([0.0, 0.0]))


def test_strict_comparisons_are_read_as_non_strict():
    strict = parse_property(HEADER_1X_2Y + "(assert (> X_0 0))\n(assert (< X_0 1))\n(assert (< Y_0 Y_1))\n")
    loose = parse_property(HEADER_1X_2Y + "(assert (>= X_0 0))\n(assert (<= X_0 1))\n(assert (<= Y_0 Y_1))\n")
    for prop in (strict, loose):
        (region,) = prop.regions
        assert (region.lower.tolist(), region.upper.tolist()) == ([0.0], [1.0])
        assert rows_of(region.conjunctions[0]) == [([1.0, -1.0], 0.0)]
        assert prop.is_counterexample(np.array([0.0]), np.array([2.0, 2.0]))  # boundary and tie both count


def test_arithmetic_forms_in_output_constraints():
    prop = parse_property(
        HEADER_1X_2Y + BOX_X0
        + "(assert (or (<= (* 2 Y_0) (- Y_1)) (>= (+ Y_0 (* Y_1 -0.5) 1e-3) (- Y_1 2.5E+1)) (<= (* 3 (- Y_0 1)) 0)))\n"
    )
    (region,) = prop.regions
    assert [rows_of(c) for c in region.conjunctions] == [
        [([2.0, 1.0], 0.0)],  # 2 Y_0 + Y_1 <= 0
        [([-1.0, 1.5], -25.001)],  # (Y_1 - 25) - (Y_0 - 0.5 Y_1 + 0.001) <= 0
        [([3.0, 0.0], -3.0)],  # 3 (Y_0 - 1) <= 0
    ]


def test_input_bounds_through_arithmetic_and_chains():
    prop = parse_property(
        "(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
        "(assert (<= -0.5 X_0 .25))\n"  # chained comparison: -0.5 <= X_0 <= 0.25
        "(assert (>= (* 2 X_1) 1))\n(assert (<= (- (* -1 X_1)) 3))\n(assert (<= 0 (+ X_1 (- X_1)) 1))\n"
    )
    (region,) = prop.regions
    assert (region.lower.tolist(), region.upper.tolist()) == ([-0.5, 0.5], [0.25, 3.0])


def test_comments_and_crlf_line_endings():
    text = (
        "; a property ; with ( parentheses ) in a comment\r\n"
        "(declare-const X_0 Real) ; input\r\n(declare-const Y_0 Real)\r\n(declare-const Y_1 Real)\r\n"
        "(assert (and ; a comment inside an expression\r\n (>= X_0 -1) (<= X_0 1)))\r\n; (assert (not x))\r\n"
        "(assert (>= Y_0 3))\r\n(assert (not X_0))\r\n"
    )
    with pytest.raises(VnnlibError) as caught:
        parse_property(text, "crlf.vnnlib")
    assert str(caught.value) == "crlf.vnnlib line 9: unsupported construct 'not'"
    prop = parse_property(text.rsplit("(assert (not", 1)[0])
    (region,) = prop.regions
    assert (region.lower.tolist(), region.upper.tolist()) == ([-1.0], [1.0])
    assert rows_of(region.conjunctions[0]) == [([-1.0, 0.0], 3.0)]


def test_read_property_plain_and_gzip(tmp_path):
    text = robustness_property(np.array([0.1, 0.2]), np.array([0.3, 0.4]), label=0, n_outputs=3)
    plain = tmp_path / "p.vnnlib"
    plain.write_text(text)
    packed = tmp_path / "p.vnnlib.gz"
    packed.write_bytes(gzip.compress(text.encode()))
    for path in (plain, str(packed)):
        (region,) = read_property(path).regions
        assert region.lower.tolist() == [0.1, 0.2] and region.upper.tolist() == [0.3, 0.4]
        assert len(region.conjunctions) == 2


def test_read_property_errors_are_one_line(tmp_path):
    broken = tmp_path / "broken.vnnlib.gz"
    broken.write_bytes(b"not gzip at all")
    latin = tmp_path / "latin.vnnlib"
    latin.write_bytes(b"; caf\xe9\n")
    cases = [(tmp_path / "missing.vnnlib", "No such file"), (broken, "gzip"), (latin, "utf-8"), (tmp_path, "")]
    for path, reason in cases:
        with pytest.raises(VnnlibError) as caught:
            read_property(path)
        message = str(caught.value)
        assert message.startswith(f"{path}: cannot read the property file") and reason in message
        assert "\n" not in message and caught.value.line is None
    bad = tmp_path / "bad.vnnlib"
    bad.write_text("(declare-const X_0 Real)\n\n(declare-fun f (Real) Real)\n")
    with pytest.raises(VnnlibError, match=rf"^{bad} line 3: unsupported construct 'declare-fun'$"):
        read_property(bad)


# -------------------------------------------------------------------------------------------------- errors

ERROR_CASES = [
    ("declare-fun", HEADER_1X_2Y + "(declare-fun f (Real) Real)\n", 4, "unsupported construct 'declare-fun'"),
    ("equality", HEADER_1X_2Y + BOX_X0 + "\n(assert (= Y_0 Y_1))\n", 7, "unsupported construct '='"),
    ("not", HEADER_1X_2Y + BOX_X0 + "(assert (or (>= Y_0 0)\n (not (>= Y_1 0))))\n", 7, "unsupported construct 'not'"),
    ("ite", HEADER_1X_2Y + BOX_X0 + "(assert (<= (ite true Y_0 Y_1) 0))\n", 6, "unsupported construct 'ite'"),
    ("non-linear", HEADER_1X_2Y + BOX_X0 + "(assert (<= (* Y_0 Y_1) 0))\n", 6, "non-linear product"),
    ("division", HEADER_1X_2Y + BOX_X0 + "(assert (<= (/ Y_0 2) 0))\n", 6, "unsupported construct '/'"),
    ("Int sort", "(declare-const X_0 Real)\n(declare-const Y_0 Int)\n", 2, "unsupported sort 'Int'"),
    ("unknown symbol", HEADER_1X_2Y + BOX_X0 + "(assert (<= Y_0 eps))\n", 6, "unknown symbol 'eps'"),
    ("infinity", HEADER_1X_2Y + BOX_X0 + "(assert (<= Y_0 inf))\n", 6, "unknown symbol 'inf'"),
    ("undeclared", HEADER_1X_2Y + BOX_X0 + "(assert (<= Y_2 0))\n", 6, "undeclared variable 'Y_2'"),
    ("variable name", "(declare-const Z_0 Real)\n", 1, "unsupported variable name 'Z_0'"),
    ("duplicate", "(declare-const X_0 Real)\n(declare-const X_0 Real)\n", 2, "X_0 is declared twice"),
    ("gap in X", "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(declare-const X_2 Real)\n", 3,
     "X_2 is declared but X_1 is not"),
    ("gap in Y", "(declare-const X_0 Real)\n(declare-const Y_1 Real)\n", 2, "Y_1 is declared but Y_0 is not"),
    ("no outputs", "(declare-const X_0 Real)\n" + BOX_X0, 3, "no output variable Y_0"),
    ("unclosed", HEADER_1X_2Y + "(assert (>= X_0 0.0)\n(assert (<= X_0 1.0))\n", 4, "'(' is never closed"),
    ("extra close", HEADER_1X_2Y + BOX_X0 + "(assert (>= Y_0 0)))\n", 6, "unexpected ')'"),
    ("mixed", HEADER_1X_2Y + BOX_X0 + "(assert (<= X_0 Y_0))\n", 6, "mixes inputs and outputs"),
    ("several X", "(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
     "(assert (<= (+ X_0 X_1) 1))\n", 4, "input constraints must be bounds on single X_i"),
    ("unbounded", "(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n" + BOX_X0
     + "(assert (<= X_1 1.0))\n", 2, "input X_1 has no lower bound"),
    ("unbounded in one disjunct", HEADER_1X_2Y + "(assert (or (and (>= X_0 0) (<= X_0 1)) (>= X_0 3)))\n", 1,
     "input X_0 has no upper bound"),
    ("bare symbol", HEADER_1X_2Y + "assert\n", 4, "unexpected 'assert' outside a command"),
    ("two asserted", HEADER_1X_2Y + "(assert (>= X_0 0) (<= X_0 1))\n", 4, "expected (assert <constraint>)"),
    ("huge number", HEADER_1X_2Y + BOX_X0 + "(assert (<= Y_0 1e999))\n", 6, "out of range"),
]


@pytest.mark.parametrize(("text", "line", "problem"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_unsupported_input_names_construct_and_line(text, line, problem):
    with pytest.raises(VnnlibError) as caught:
        parse_property(text, "property.vnnlib")
    message = str(caught.value)
    assert message.startswith(f"property.vnnlib line {line}: ") and problem in message, message
    assert "\n" not in message and caught.value.line == line
    assert isinstance(caught.value, InputError)


def test_example_message_from_the_format():
    text = HEADER_1X_2Y + BOX_X0 + "(assert (not (>= Y_0 Y_1)))\n"
    with pytest.raises(VnnlibError, match=r"^property\.vnnlib line 6: unsupported construct 'not'$"):
        parse_property(text, "property.vnnlib")


def test_dnf_explosion_is_refused():
    or_of_two = "(or (<= Y_0 0) (<= Y_1 0))"
    within = HEADER_1X_2Y + BOX_X0 + "".join(f"(assert {or_of_two})\n" for _ in range(16))  # 65536 terms
    (region,) = parse_property(within).regions
    # 65536 terms, but as sets of distinct rows only {Y_0 <= 0}, {Y_0 <= 0, Y_1 <= 0} and {Y_1 <= 0}
    assert [rows_of(c) for c in region.conjunctions] == [
        [([1.0, 0.0], 0.0)], [([1.0, 0.0], 0.0), ([0.0, 1.0], 0.0)], [([0.0, 1.0], 0.0)],
    ]
    beyond = within + f"(assert {or_of_two})\n"  # 131072 terms
    with pytest.raises(VnnlibError, match=r"^<string> line 22: .*more than 100000 terms"):
        parse_property(beyond)
    nested = HEADER_1X_2Y + BOX_X0 + "(assert (and\n" + " ".join([or_of_two] * 17) + "))\n"
    with pytest.raises(VnnlibError, match=r"line 6: the disjunctive normal form of 'and' has 131072 terms"):
        parse_property(nested)


def test_deep_nesting_is_an_error_not_a_crash():
    text = HEADER_1X_2Y + "(assert " + "(and " * 300 + "(>= X_0 0)" + ")" * 301 + "\n"
    with pytest.raises(VnnlibError, match=r"line 4: expressions nested deeper than"):
        parse_property(text)


# ---------------------------------------------------------------------------------------------- dataclasses


def test_dataclasses_are_frozen_read_only_and_validated():
    conjunction = Conjunction(np.array([[1.0, -1.0]]), np.array([0.0]))
    region = Region(np.zeros(1), np.ones(1), (conjunction,))
    prop = Property(1, 2, (region,))
    with pytest.raises(AttributeError):
        prop.n_inputs = 3  # type: ignore[misc]
    with pytest.raises(ValueError):
        region.lower[0] = 5.0
    with pytest.raises(InputError, match="rows but"):
        Conjunction(np.zeros((2, 2)), np.zeros(1))
    with pytest.raises(InputError, match="lower <= upper"):
        Region(np.ones(1), np.zeros(1), (conjunction,))
    with pytest.raises(InputError, match="at least one conjunction"):
        Region(np.zeros(1), np.ones(1), ())
    with pytest.raises(InputError, match="3 inputs"):
        Property(3, 2, (region,))
    with pytest.raises(InputError, match=r"shape \(2,\)"):
        prop.is_counterexample(np.zeros(1), np.zeros(3))


# ------------------------------------------------------------------------------------------- result files


def test_format_result_words():
    assert format_result("unsat") == "unsat\n"
    assert format_result("unknown") == "unknown\n"
    assert format_result("timeout") == "timeout\n"
    with pytest.raises(ValueError, match="unknown result 'SAT'"):
        format_result("SAT")
    with pytest.raises(ValueError, match="needs the counterexample"):
        format_result("sat", np.zeros(2))
    with pytest.raises(ValueError, match="no counterexample"):
        format_result("unsat", np.zeros(2), np.zeros(2))
    with pytest.raises(ValueError, match="NaN or infinite"):
        format_result("sat", np.zeros(2), np.array([np.inf]))


def test_format_result_sat_lists_values_exactly():
    x = np.array([[0.1, -0.0], [1 / 3, 1e-20]])  # flattened in C order
    y = np.array([2.5, -7.0])
    text = format_result("sat", x, y)
    assert text == (
        "sat\n((X_0 0.1)\n (X_1 -0.0)\n (X_2 0.3333333333333333)\n (X_3 1e-20)\n (Y_0 2.5)\n (Y_1 -7.0))\n"
    )
    values = [float(line.strip(" ()").split()[1]) for line in text.splitlines()[1:]]
    assert values == [*x.ravel().tolist(), *y.tolist()]
