"""Small integer expressions shared by the tasks.

An expression uses integer literals, the binary operators ``+ - *`` and
parentheses. Three views of one expression are used:

- text, as a model reads or writes it: ``"(17 + 8) * 2 - 19"`` (spaces around
  operators, parentheses hug their contents);
- a token list ``[ "(", 17, "+", 8, ")", "*", 2, "-", 19 ]`` that is reduced one
  binary operation at a time, which is what a chain of thought writes down;
- a tree of `Node`, used to generate expressions and render them with the fewest
  parentheses.

Untrusted text (model answers) is only ever evaluated by `safe_eval`, an
``ast`` walker that accepts int literals and ``+ - *`` and nothing else.
"""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

Token = int | str
OPS = ("+", "-", "*")
PRECEDENCE = {"+": 1, "-": 1, "*": 2}
MAX_EXPR_CHARS = 200

_TOKEN_RE = re.compile(r"\s*(\d+|[-+*()])")
_NUM = r"-?\d{1,12}"
_STEP_RE = re.compile(rf"^\s*({_NUM})\s*([-+*])\s*({_NUM})\s*=\s*({_NUM})\s*$")
_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}


@dataclass(frozen=True)
class Node:
    """A binary operation ``left op right``; leaves are plain ints."""

    op: str
    left: Expr
    right: Expr


Expr = int | Node


def apply_op(a: int, op: str, b: int) -> int:
    """The value of ``a op b`` for op in ``+ - *``."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"unknown operator {op!r}")


def format_step(a: int, op: str, b: int, result: int) -> str:
    """One chain-of-thought step, e.g. ``"11 + 16 = 27"``."""
    return f"{a} {op} {b} = {result}"


def parse_step(step: str) -> tuple[int, str, int, int] | None:
    """Parse ``"a op b = r"`` (whitespace-tolerant, signed ints up to 12 digits); None if malformed."""
    m = _STEP_RE.match(step)
    if m is None:
        return None
    return int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))


def tokenize(text: str) -> list[Token] | None:
    """Split expression text into int literals and operator/parenthesis strings; None on any other char."""
    tokens: list[Token] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            return None
        tok = m.group(1)
        tokens.append(int(tok) if tok.isdigit() else tok)
        pos = m.end()
    return tokens


def well_formed(tokens: Sequence[Token]) -> bool:
    """Whether ``tokens`` read as one expression: operands (ints, or parenthesised expressions)
    joined by binary operators, parentheses balanced. ``Compute 17 - 2 +`` is a prefix of a
    question, not a question."""
    depth, want_operand = 0, True
    for tok in tokens:
        if want_operand and tok == "(":
            depth += 1
        elif want_operand and isinstance(tok, int):
            want_operand = False
        elif not want_operand and tok == ")" and depth > 0:
            depth -= 1
        elif not want_operand and tok in OPS:
            want_operand = True
        else:
            return False
    return bool(tokens) and not want_operand and depth == 0


def render_tokens(tokens: Sequence[Token]) -> str:
    """Join tokens with single spaces, then let parentheses hug their contents."""
    text = " ".join(str(t) for t in tokens)
    return text.replace("( ", "(").replace(" )", ")")


def render(expr: Expr) -> str:
    """Render a tree with the fewest parentheses that keep its value.

    A child is parenthesised when its operator binds looser than the parent's,
    or when it is the right child of ``-`` at equal precedence (a - (b + c)).
    """
    if isinstance(expr, int):
        return str(expr)
    left, right = render(expr.left), render(expr.right)
    prec = PRECEDENCE[expr.op]
    if isinstance(expr.left, Node) and PRECEDENCE[expr.left.op] < prec:
        left = f"({left})"
    if isinstance(expr.right, Node):
        rprec = PRECEDENCE[expr.right.op]
        if rprec < prec or (rprec == prec and expr.op == "-"):
            right = f"({right})"
    return f"{left} {expr.op} {right}"


def random_tree(rng: random.Random, n_leaves: int, ops: Sequence[str], lo: int, hi: int) -> Expr:
    """A random binary tree with ``n_leaves`` leaves drawn from ``[lo, hi]`` and random operators."""
    if n_leaves == 1:
        return rng.randint(lo, hi)
    k = rng.randint(1, n_leaves - 1)
    left = random_tree(rng, k, ops, lo, hi)
    right = random_tree(rng, n_leaves - k, ops, lo, hi)
    return Node(rng.choice(ops), left, right)


def _strip_trivial_parens(tokens: list[Token]) -> list[Token]:
    """Remove every ``( n )`` around a single number; a finished group needs no step of its own."""
    out = list(tokens)
    i = 0
    while i + 2 < len(out):
        if out[i] == "(" and isinstance(out[i + 1], int) and out[i + 2] == ")":
            out[i : i + 3] = [out[i + 1]]
            i = max(i - 1, 0)
        else:
            i += 1
    return out


def next_reduction(tokens: Sequence[Token]) -> tuple[list[Token], int] | None:
    """The next binary operation to evaluate, innermost group first.

    Returns ``(normalised_tokens, i)`` where ``normalised_tokens[i:i+3]`` is
    ``a op b``: inside the innermost (first-closing) parenthesis group, the
    leftmost ``*``, else the leftmost ``+``/``-``. None when one number is left.
    """
    toks = _strip_trivial_parens(list(tokens))
    if len(toks) == 1:
        return None
    close = toks.index(")") if ")" in toks else len(toks)
    open_ = max((k for k in range(close) if toks[k] == "("), default=-1)
    group = range(open_ + 1, close)
    ops = [k for k in group if toks[k] in OPS and (k - open_) % 2 == 0]
    mul = [k for k in ops if toks[k] == "*"]
    k = mul[0] if mul else ops[0]
    return toks, k - 1


def reduce_at(tokens: Sequence[Token], i: int, value: int) -> list[Token]:
    """Replace ``tokens[i:i+3]`` (an ``a op b``) by ``value``."""
    return [*tokens[:i], value, *tokens[i + 3 :]]


def reduce_all(tokens: Sequence[Token]) -> list[tuple[int, str, int, int]]:
    """All reduction steps ``(a, op, b, result)`` of an expression, in evaluation order."""
    steps: list[tuple[int, str, int, int]] = []
    nxt = next_reduction(tokens)
    while nxt is not None:
        toks, i = nxt
        a, op, b = toks[i], toks[i + 1], toks[i + 2]
        result = apply_op(a, op, b)
        steps.append((a, op, b, result))
        nxt = next_reduction(reduce_at(toks, i, result))
    return steps


def _eval_node(node: ast.AST, leaves: list[int]) -> int | None:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        leaves.append(node.value)
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
        left = _eval_node(node.left, leaves)
        right = _eval_node(node.right, leaves) if left is not None else None
        if right is None:
            return None
        return apply_op(left, _AST_OPS[type(node.op)], right)
    return None


def safe_eval(text: str) -> tuple[int, list[int]] | None:
    """Evaluate untrusted expression text; returns ``(value, literals in order)`` or None.

    Only int literals, binary ``+ - *`` and parentheses are accepted (no names,
    calls, attributes, unary minus, powers, floats); text longer than
    `MAX_EXPR_CHARS` is refused before parsing. Nothing is ever executed.
    """
    if len(text) > MAX_EXPR_CHARS:
        return None
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    leaves: list[int] = []
    value = _eval_node(tree.body, leaves)
    return None if value is None else (value, leaves)


def reachable(pool: Sequence[int], target: int, ops: Sequence[str] = OPS) -> bool:
    """Whether ``target`` can be made from ``pool`` using every number exactly once.

    Exhaustive search over pairwise combinations (``a op b`` and ``b op a``),
    memoised on the sorted pool; fine for the pools of <= 5 numbers used here.
    """
    return _reachable(tuple(sorted(pool)), target, tuple(ops))


@lru_cache(maxsize=65536)
def _reachable(pool: tuple[int, ...], target: int, ops: tuple[str, ...]) -> bool:
    if len(pool) == 1:
        return pool[0] == target
    for i in range(len(pool)):
        for j in range(i + 1, len(pool)):
            rest = pool[:i] + pool[i + 1 : j] + pool[j + 1 :]
            a, b = pool[i], pool[j]
            results = {apply_op(a, op, b) for op in ops} | ({b - a} if "-" in ops else set())
            if any(_reachable(tuple(sorted((*rest, r))), target, ops) for r in results):
                return True
    return False
