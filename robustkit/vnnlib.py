"""Read and write VNN-LIB 1.0 properties (the input/output specifications of VNN-COMP) and result files.

A property declares inputs ``X_0 ... X_{n-1}`` and outputs ``Y_0 ... Y_{K-1}`` (sort ``Real``) and asserts linear
constraints on them. It is *sat* when some input x satisfies every assert together with y = f(x) (a
counterexample) and *unsat* when none does. :func:`parse_property` converts the asserts to disjunctive normal
form and returns a :class:`Property`: a disjunction of :class:`Region` objects, each an input box with a
disjunction of :class:`Conjunction` rows ``rows @ y + offsets <= 0``. Strict comparisons (``<``, ``>``) are read
as non-strict (``<=``, ``>=``), as VNN-COMP does: a verifier working in floating point cannot tell them apart.

Supported: ``;`` comments, ``declare-const`` of ``X_i``/``Y_j`` with sort ``Real`` (indices contiguous from 0),
``assert`` of ``<=``, ``>=``, ``<``, ``>`` (chains such as ``(<= 0 X_0 1)`` included), ``and`` and ``or``
nested freely, over linear expressions of numbers (``-0.5``, ``1e-3``), variables, ``+``, ``-`` (negation and
left-to-right subtraction) and ``*`` with at most one non-constant factor. Constraints on inputs must be bounds
on single ``X_i``, and every input must be bounded in every disjunct. Anything else raises a
:class:`VnnlibError` whose one-line message names the construct and its line.

The PyPI package ``vnnlib`` was evaluated and not used: its 1.0.x releases (1.0.2) parse the VNN-LIB 2.0 grammar
with a compiled C++ extension and reject plain VNN-LIB 1.0 files (a syntax error at the first declaration),
and its VNN-LIB 1.0 release 0.0.1.post1 (alpha, January 2024) reports unsupported constructs without a line
number (``NotImplementedError: Function 'not' is not supported by the legacy parser``) and returns ``-inf``
for a missing input bound instead of an error.

>>> text = robustness_property(np.array([0.0, 0.5]), np.array([0.25, 0.75]), label=1, n_outputs=3)
>>> prop = parse_property(text)
>>> (prop.n_inputs, prop.n_outputs, len(prop.regions), len(prop.regions[0].conjunctions))
(2, 3, 1, 2)
>>> prop.regions[0].upper.tolist()
[0.25, 0.75]
>>> prop.is_counterexample(np.array([0.1, 0.6]), np.array([3.0, 1.0, 2.0]))  # class 0 beats the label
True
>>> format_result("sat", np.array([0.1, 0.6]), np.array([3.0, 1.0, 2.0])).splitlines()[:2]
['sat', '((X_0 0.1)']
"""

from __future__ import annotations

import gzip
import itertools
import math
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from robustkit.errors import InputError

__all__ = [
    "Conjunction", "Property", "Region", "VnnlibError", "format_result", "parse_property", "read_property",
    "robustness_property",
]

MAX_DNF_TERMS = 100_000
MAX_NESTING = 200  # keeps the recursive formula walk far from Python's recursion limit

FloatArray = npt.NDArray[np.float64]

# One pass of one regex: a newline (counted for line numbers), a comment, a parenthesis or a symbol/number.
_TOKEN = re.compile(r"(\n)|;[^\n]*|(\()|(\))|([^\s();]+)")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_VARIABLE = re.compile(r"([XY])_(0|[1-9]\d*)")
_COMPARISONS = {"<=": False, "<": False, ">=": True, ">": True}  # value: whether the sides swap
_ARITHMETIC = {"+", "-", "*"}
_RESULTS = ("sat", "unsat", "unknown", "timeout")


class VnnlibError(InputError):
    """A VNN-LIB property cannot be read: the message is one line, ``<source> line <n>: <problem>``."""

    def __init__(self, source: str, line: int | None, problem: str) -> None:
        self.source = source
        self.line = line
        self.problem = problem
        where = f"{source} line {line}" if line is not None else source
        super().__init__(f"{where}: {problem}")


def _frozen_array(value: npt.ArrayLike, what: str, ndim: int) -> FloatArray:
    array = np.array(value, dtype=np.float64)
    if array.ndim != ndim:
        raise InputError(f"{what} must be a {ndim}-D array, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise InputError(f"{what} holds NaN or infinite values")
    array.setflags(write=False)
    return array


def _vector(value: npt.ArrayLike, size: int, what: str) -> FloatArray:
    array = np.asarray(value, dtype=np.float64)
    if array.shape != (size,):
        raise InputError(f"{what} must have shape ({size},), got {array.shape}")
    return array


@dataclass(frozen=True, eq=False)
class Conjunction:
    """Output constraints that all hold: ``rows @ y + offsets <= 0``; zero rows mean "true" (any output)."""

    rows: FloatArray
    offsets: FloatArray

    def __post_init__(self) -> None:
        rows = _frozen_array(self.rows, "rows", 2)
        offsets = _frozen_array(self.offsets, "offsets", 1)
        if offsets.shape[0] != rows.shape[0]:
            raise InputError(f"{rows.shape[0]} rows but {offsets.shape[0]} offsets")
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "offsets", offsets)

    def holds(self, y: npt.ArrayLike) -> bool:
        """Whether the output vector ``y`` satisfies every row (exactly, no tolerance)."""
        values = _vector(y, self.rows.shape[1], "y")
        return bool(np.all(self.rows @ values + self.offsets <= 0.0))


@dataclass(frozen=True, eq=False)
class Region:
    """An input box with a disjunction of output conditions: sat iff some x in ``[lower, upper]`` has f(x)
    satisfying one of ``conjunctions``."""

    lower: FloatArray
    upper: FloatArray
    conjunctions: tuple[Conjunction, ...]

    def __post_init__(self) -> None:
        lower = _frozen_array(self.lower, "lower", 1)
        upper = _frozen_array(self.upper, "upper", 1)
        if lower.shape != upper.shape or not np.all(lower <= upper):
            raise InputError("a region needs lower <= upper elementwise, with equal shapes")
        conjunctions = tuple(self.conjunctions)
        if not conjunctions or len({c.rows.shape[1] for c in conjunctions}) != 1:
            raise InputError("a region needs at least one conjunction, all over the same number of outputs")
        object.__setattr__(self, "lower", lower)
        object.__setattr__(self, "upper", upper)
        object.__setattr__(self, "conjunctions", conjunctions)

    def holds(self, y: npt.ArrayLike) -> bool:
        """Whether the output vector ``y`` satisfies the output condition (all rows of some conjunction)."""
        return any(conjunction.holds(y) for conjunction in self.conjunctions)

    def contains(self, x: npt.ArrayLike) -> bool:
        """Whether ``lower <= x <= upper`` elementwise."""
        values = _vector(x, self.lower.shape[0], "x")
        return bool(np.all(self.lower <= values) and np.all(values <= self.upper))


@dataclass(frozen=True, eq=False)
class Property:
    """A parsed property: sat iff some region is; no regions means trivially unsat."""

    n_inputs: int
    n_outputs: int
    regions: tuple[Region, ...]

    def __post_init__(self) -> None:
        regions = tuple(self.regions)
        for region in regions:
            if region.lower.shape[0] != self.n_inputs or region.conjunctions[0].rows.shape[1] != self.n_outputs:
                raise InputError(f"every region must have {self.n_inputs} inputs and {self.n_outputs} outputs")
        object.__setattr__(self, "regions", regions)

    def is_counterexample(self, x: npt.ArrayLike, y: npt.ArrayLike) -> bool:
        """Whether some region contains ``x`` and its output condition holds for ``y`` (no tolerance)."""
        inputs = _vector(x, self.n_inputs, "x")
        outputs = _vector(y, self.n_outputs, "y")
        return any(region.contains(inputs) and region.holds(outputs) for region in self.regions)


# ---------------------------------------------------------------------------------------------------- parsing


@dataclass(slots=True)
class _Symbol:
    text: str
    line: int


@dataclass(slots=True)
class _List:
    items: list[_Symbol | _List]
    line: int


_Node = _Symbol | _List


@dataclass(slots=True)
class _Linear:
    """``sum x[i] X_i + sum y[j] Y_j + const``."""

    x: dict[int, float]
    y: dict[int, float]
    const: float

    def scaled(self, factor: float) -> _Linear:
        return _Linear({i: factor * c for i, c in self.x.items()}, {j: factor * c for j, c in self.y.items()},
                       factor * self.const)

    def add(self, other: _Linear) -> None:
        for i, c in other.x.items():
            self.x[i] = self.x.get(i, 0.0) + c
        for j, c in other.y.items():
            self.y[j] = self.y.get(j, 0.0) + c
        self.const += other.const


def _read_sexpressions(text: str, source: str) -> tuple[list[_Node], int]:
    """The top-level S-expressions of ``text`` and the line of its last token."""
    line = 1
    top: list[_Node] = []
    stack: list[_List] = []
    last = 1  # line of the last token, for errors about the whole file
    for match in _TOKEN.finditer(text):
        kind = match.lastindex
        if kind == 1:
            line += 1
            continue
        last = line
        if kind is None:
            continue  # a comment
        if kind == 2:
            if len(stack) >= MAX_NESTING:
                raise VnnlibError(source, line, f"expressions nested deeper than {MAX_NESTING} levels")
            stack.append(_List([], line))
        elif kind == 3:
            if not stack:
                raise VnnlibError(source, line, "unbalanced parentheses: unexpected ')'")
            closed = stack.pop()
            (stack[-1].items if stack else top).append(closed)
        elif kind == 4:
            (stack[-1].items if stack else top).append(_Symbol(match.group(4), line))
    if stack:
        raise VnnlibError(source, stack[-1].line, "unbalanced parentheses: '(' is never closed")
    return top, last


class _Parser:
    """Walks the S-expressions: declarations, then each assert to a DNF over atoms ``x.X + y.Y + const <= 0``."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.variables: dict[str, tuple[str, int]] = {}
        self.declared_on: dict[tuple[str, int], int] = {}
        self.atoms: list[tuple[_Linear, int]] = []

    def error(self, line: int, problem: str) -> VnnlibError:
        return VnnlibError(self.source, line, problem)

    def declare(self, node: _List) -> None:
        match node.items[1:]:
            case [_Symbol() as name, _Symbol() as sort]:
                pass
            case _:
                raise self.error(node.line, "expected (declare-const <name> Real)")
        found = _VARIABLE.fullmatch(name.text)
        if found is None:
            raise self.error(name.line, f"unsupported variable name {name.text!r} (expected X_<i> or Y_<j>)")
        if sort.text != "Real":
            raise self.error(sort.line, f"unsupported sort {sort.text!r} for {name.text} (only Real)")
        if name.text in self.variables:
            raise self.error(name.line, f"{name.text} is declared twice")
        key = (found.group(1), int(found.group(2)))
        self.variables[name.text] = key
        self.declared_on[key] = name.line

    def count(self, kind: str, last_line: int) -> int:
        indices = sorted(i for k, i in self.declared_on if k == kind)
        if not indices:
            raise self.error(last_line, f"no {'input' if kind == 'X' else 'output'} variable {kind}_0 is declared")
        for expected, index in enumerate(indices):
            if index != expected:
                raise self.error(self.declared_on[(kind, index)],
                                 f"{kind}_{index} is declared but {kind}_{expected} is not "
                                 "(indices must be contiguous from 0)")
        return len(indices)

    def linear(self, node: _Node) -> _Linear:
        if isinstance(node, _Symbol):
            if _NUMBER.fullmatch(node.text):
                value = float(node.text)
                if not math.isfinite(value):
                    raise self.error(node.line, f"number {node.text} is out of range")
                return _Linear({}, {}, value)
            if node.text in self.variables:
                kind, index = self.variables[node.text]
                return _Linear({index: 1.0}, {}, 0.0) if kind == "X" else _Linear({}, {index: 1.0}, 0.0)
            if _VARIABLE.fullmatch(node.text):
                raise self.error(node.line, f"undeclared variable {node.text!r}")
            raise self.error(node.line, f"unknown symbol {node.text!r}")
        head, args = self.head(node)
        if head not in _ARITHMETIC:
            raise self.error(node.line, f"unsupported construct {head!r} in an arithmetic expression")
        terms = [self.linear(a) for a in args]
        if not terms or (head == "*" and len(terms) < 2):
            raise self.error(node.line, f"{head!r} needs {'two' if head == '*' else 'one'} or more arguments")
        if head == "-" and len(terms) == 1:
            return terms[0].scaled(-1.0)
        if head == "*":
            variable = [t for t in terms if t.x or t.y]
            if len(variable) > 1:
                raise self.error(node.line, "unsupported construct: non-linear product '*' of two variables")
            factor = math.prod(t.const for t in terms if not (t.x or t.y))
            return (variable[0] if variable else _Linear({}, {}, 1.0)).scaled(factor)
        total = _Linear(dict(terms[0].x), dict(terms[0].y), terms[0].const)
        for term in terms[1:]:
            total.add(term.scaled(-1.0) if head == "-" else term)
        return total

    def head(self, node: _List) -> tuple[str, list[_Node]]:
        if not node.items:
            raise self.error(node.line, "empty expression '()'")
        first = node.items[0]
        if not isinstance(first, _Symbol):
            raise self.error(node.line, "expected an operator after '('")
        return first.text, node.items[1:]

    def atom(self, lesser: _Node, greater: _Node, line: int) -> int:
        """Index of the new atom ``lesser - greater <= 0``."""
        atom = self.linear(lesser)
        atom.add(self.linear(greater).scaled(-1.0))
        values = [*atom.x.values(), *atom.y.values(), atom.const]
        if not all(math.isfinite(v) for v in values):
            raise self.error(line, "arithmetic overflows to an infinite value")
        self.atoms.append((atom, line))
        return len(self.atoms) - 1

    def dnf(self, node: _Node) -> list[tuple[int, ...]]:
        """The formula as a list of terms (tuples of atom indices), at most MAX_DNF_TERMS of them."""
        if isinstance(node, _Symbol):
            raise self.error(node.line, f"unsupported construct {node.text!r} (expected a constraint)")
        head, args = self.head(node)
        if head in _COMPARISONS:
            if len(args) < 2:
                raise self.error(node.line, f"{head!r} needs two arguments")
            pairs = itertools.pairwise(args)
            swap = _COMPARISONS[head]
            return [tuple(self.atom(b, a, node.line) if swap else self.atom(a, b, node.line) for a, b in pairs)]
        if head not in ("and", "or"):
            raise self.error(node.line, f"unsupported construct {head!r}")
        if not args:
            raise self.error(node.line, f"{head!r} needs at least one argument")
        children = [self.dnf(a) for a in args]
        size = sum(map(len, children)) if head == "or" else math.prod(map(len, children))
        if size > MAX_DNF_TERMS:
            raise self.error(node.line, f"the disjunctive normal form of {head!r} has {size} terms "
                                        f"(more than {MAX_DNF_TERMS})")
        if head == "or":
            return [term for child in children for term in child]
        return [tuple(itertools.chain.from_iterable(combo)) for combo in itertools.product(*children)]

    def parse(self, text: str) -> Property:
        top, last_line = _read_sexpressions(text, self.source)
        shared: list[int] = []  # atoms of asserts whose DNF is a single term: common to every term
        split: list[list[tuple[int, ...]]] = []
        total = 1
        for node in top:
            if isinstance(node, _Symbol):
                raise self.error(node.line, f"unexpected {node.text!r} outside a command")
            head, args = self.head(node)
            if head == "declare-const":
                self.declare(node)
            elif head == "assert":
                if len(args) != 1:
                    raise self.error(node.line, "expected (assert <constraint>)")
                terms = self.dnf(args[0])
                if len(terms) == 1:
                    shared.extend(terms[0])
                    continue
                total *= len(terms)
                if total > MAX_DNF_TERMS:
                    raise self.error(node.line, f"the disjunctive normal form of all asserts has more than "
                                                f"{MAX_DNF_TERMS} terms")
                split.append(terms)
            else:
                raise self.error(node.line, f"unsupported construct {head!r}")
        n_inputs, n_outputs = self.count("X", last_line), self.count("Y", last_line)
        return _build(self, shared, split, n_inputs, n_outputs)


@dataclass(slots=True)
class _Term:
    """The atoms of a DNF term, or of the part of one that an assert contributes, sorted by what they say."""

    bounds: list[tuple[int, float, bool]]  # (input index, bound, whether it is an upper bound)
    outputs: list[int]  # ids of distinct output rows
    infeasible: bool  # holds an atom that is constant and false


def _build(parser: _Parser, shared: list[int], split: list[list[tuple[int, ...]]], n_inputs: int,
           n_outputs: int) -> Property:
    """Box and output rows of every DNF term; terms with equal boxes become one region."""
    bound_of: dict[int, tuple[int, float, bool]] = {}
    row_of: dict[int, int] = {}
    row_ids: dict[tuple[tuple[int, float], ...], int] = {}  # equal rows from different atoms share one id
    rows: list[FloatArray] = []
    false_atoms: set[int] = set()
    for index, (atom, line) in enumerate(parser.atoms):
        x = {i: c for i, c in atom.x.items() if c != 0.0}
        y = {j: c for j, c in atom.y.items() if c != 0.0}
        if x and y:
            raise parser.error(line, "a constraint mixes inputs and outputs (input constraints must be bounds on "
                                     "single X_i)")
        if len(x) > 1:
            names = ", ".join(f"X_{i}" for i in sorted(x))
            raise parser.error(line, f"input constraints must be bounds on single X_i (this one is linear in {names})")
        if x:
            ((i, c),) = x.items()
            bound = -atom.const / c
            if not math.isfinite(bound):
                raise parser.error(line, f"the bound on X_{i} overflows to an infinite value")
            bound_of[index] = (i, bound + 0.0, c > 0)  # + 0.0 turns -0.0 into 0.0: equal boxes get equal bytes
        elif y:
            row_key = (*sorted(y.items()), (-1, atom.const + 0.0))
            if row_key not in row_ids:
                row_ids[row_key] = len(rows)
                row = np.zeros(n_outputs + 1)
                row[list(y)] = list(y.values())
                row[-1] = atom.const + 0.0
                rows.append(row)
            row_of[index] = row_ids[row_key]
        elif atom.const > 0.0:
            false_atoms.add(index)

    def summarise(atoms: tuple[int, ...] | list[int]) -> _Term:
        term = _Term([bound_of[a] for a in atoms if a in bound_of], [row_of[a] for a in atoms if a in row_of], False)
        term.infeasible = any(a in false_atoms for a in atoms)
        return term

    def tighten(lower: FloatArray, upper: FloatArray, bounds: Iterable[tuple[int, float, bool]]) -> None:
        for i, bound, is_upper in bounds:
            if is_upper:
                upper[i] = min(upper[i], bound)
            else:
                lower[i] = max(lower[i], bound)

    def box(bounds: Iterable[tuple[int, float, bool]]) -> tuple[bytes, FloatArray, FloatArray] | None:
        lower, upper = base_lower.copy(), base_upper.copy()
        tighten(lower, upper, bounds)
        if np.any(lower > upper):
            return None  # an empty box: the term cannot be satisfied
        for side, values in (("lower", lower), ("upper", upper)):
            unbounded = np.flatnonzero(np.isinf(values))
            if unbounded.size:
                i = int(unbounded[0])
                raise parser.error(parser.declared_on[("X", i)], f"input X_{i} has no {side} bound")
        return lower.tobytes() + upper.tobytes(), lower, upper

    table = np.array(rows).reshape(len(rows), n_outputs + 1)
    base = summarise(shared)
    base_lower, base_upper = np.full(n_inputs, -np.inf), np.full(n_inputs, np.inf)
    tighten(base_lower, base_upper, base.bounds)  # once: the shared bounds are most of a large property
    parts = [[summarise(term) for term in terms] for terms in split]
    boxes: dict[tuple[int, ...], tuple[bytes, FloatArray, FloatArray] | None] = {}
    regions: dict[bytes, tuple[FloatArray, FloatArray, dict[frozenset[int], Conjunction]]] = {}
    for choice in itertools.product(*(range(len(p)) for p in parts)):
        chosen = [part[c] for part, c in zip(parts, choice, strict=True)]
        if base.infeasible or any(term.infeasible for term in chosen):
            continue
        key = tuple(c if term.bounds else -1 for c, term in zip(choice, chosen, strict=True))
        if key not in boxes:  # many terms differ only in their output rows: build each box once
            boxes[key] = box(itertools.chain.from_iterable(term.bounds for term in chosen))
        found = boxes[key]
        if found is None:
            continue
        ids = list(dict.fromkeys(itertools.chain(base.outputs, *(term.outputs for term in chosen))))
        _, _, conjunctions = regions.setdefault(found[0], (found[1], found[2], {}))
        if frozenset(ids) not in conjunctions:
            conjunctions[frozenset(ids)] = Conjunction(table[ids, :-1], table[ids, -1])
    return Property(n_inputs, n_outputs, tuple(Region(lo, up, tuple(c.values())) for lo, up, c in regions.values()))


def parse_property(text: str, source: str = "<string>") -> Property:
    """Parse VNN-LIB 1.0 ``text``; ``source`` names it in error messages (``<source> line <n>: ...``)."""
    return _Parser(source).parse(text)


def read_property(path: str | Path) -> Property:
    """Read a ``.vnnlib`` file, or a gzip-compressed one (``.vnnlib.gz``, recognised by its content too)."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
        if source.endswith(".gz") or data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        text = data.decode("utf-8-sig")
    except (OSError, EOFError, zlib.error, UnicodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise VnnlibError(source, None, f"cannot read the property file: {' '.join(reason.split())}") from error
    return parse_property(text, source)


# ---------------------------------------------------------------------------------------------------- writing


def _number(value: float) -> str:
    return repr(float(value))


def robustness_property(lower: npt.ArrayLike, upper: npt.ArrayLike, label: int, n_outputs: int,
                        comment: str = "") -> str:
    """VNN-LIB text of local robustness on the box ``[lower, upper]``: sat iff some class ``j != label``
    scores at least as high as ``label`` (``Y_j >= Y_label``). Numbers are written with ``repr`` so they read
    back exactly; each line of ``comment`` becomes a leading ``;`` comment line."""
    low = np.asarray(lower, dtype=np.float64)
    high = np.asarray(upper, dtype=np.float64)
    if low.ndim != 1 or low.shape != high.shape or low.size == 0:
        raise InputError(f"lower and upper must be non-empty 1-D arrays of one shape, got {low.shape}, {high.shape}")
    if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high)) and np.all(low <= high)):
        raise InputError("the input box must be finite with lower <= upper")
    if n_outputs < 2 or not 0 <= label < n_outputs:
        raise InputError(f"label {label} must be a class in 0..{n_outputs - 1}, with at least two classes")
    lines = [f"; {text}".rstrip() for text in comment.splitlines()]
    lines += [f"(declare-const X_{i} Real)" for i in range(low.size)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(n_outputs)]
    for i, (lo, hi) in enumerate(zip(low.tolist(), high.tolist(), strict=True)):
        lines += [f"(assert (<= X_{i} {_number(hi)}))", f"(assert (>= X_{i} {_number(lo)}))"]
    lines.append("(assert (or")
    lines += [f"    (and (>= Y_{j} Y_{label}))" for j in range(n_outputs) if j != label]
    lines.append("))")
    return "\n".join(lines) + "\n"


def format_result(result: str, x: npt.ArrayLike | None = None, y: npt.ArrayLike | None = None) -> str:
    """VNN-COMP result file text: ``unsat``, ``unknown`` or ``timeout`` alone, or for ``sat`` the
    counterexample ``x`` (flattened in C order, as ``X_i`` number the network's input) and its output ``y``."""
    if result not in _RESULTS:
        raise ValueError(f"unknown result {result!r}: expected one of {', '.join(_RESULTS)}")
    if result != "sat":
        if x is not None or y is not None:
            raise ValueError(f"a {result!r} result has no counterexample; pass x and y only with 'sat'")
        return f"{result}\n"
    if x is None or y is None:
        raise ValueError("a 'sat' result needs the counterexample x and its output y")
    entries: list[str] = []
    for name, values in (("X", x), ("Y", y)):
        flat = np.asarray(values, dtype=np.float64).ravel()
        if not np.all(np.isfinite(flat)):
            raise ValueError(f"the counterexample's {name} values hold NaN or infinite values")
        entries += [f"({name}_{i} {_number(v)})" for i, v in enumerate(flat.tolist())]
    return "sat\n(" + "\n ".join(entries) + ")\n"
