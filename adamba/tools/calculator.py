"""The calculator tool: what a model's <|python_start|> expression <|python_end|> computes.

It accepts what nanochat's `use_calculator` accepts (arithmetic, and a string literal's `.count` of another one, the
form of its letter-counting task), but the expression is parsed with `ast` and walked node by node: nothing is ever
passed to `eval`, so a name, a call, an attribute or a comprehension is refused before anything runs. Sizes are
bounded before each operation, so an expression like 9**9**9 is refused at once instead of computing for minutes.
"""

from __future__ import annotations

import ast
import math
import operator
import re

MAX_LENGTH = 200  # characters; a longer "expression" is not a calculator call
MAX_INT_BITS = 4096  # about 1233 digits: far past any answer, and still instant to multiply or print
SIGNIFICANT_DIGITS = 12  # floats are rounded to these, so 0.1 + 0.2 reads 0.3 and 1/3 stays short


class _Refused(Exception):
    """The expression is outside what the calculator accepts."""


def calculate(expression: str) -> str | None:
    """The value of `expression` as text ("2+3" -> "5", "7/2" -> "3.5"), or None if it is refused or fails."""
    if not isinstance(expression, str) or len(expression) > MAX_LENGTH:
        return None
    text = expression.strip()
    if "'" not in text and '"' not in text:
        text = re.sub(r"(?<=\d),(?=\d)", "", text)  # thousands separators, as nanochat drops them: 1,000 -> 1000
    try:
        value = _evaluate(ast.parse(text, mode="eval").body)
    except (_Refused, SyntaxError, ValueError, TypeError, ArithmeticError, RecursionError, MemoryError):
        return None
    return _format(value)


def _power(base: int | float, exponent: int | float) -> int | float:
    """base ** exponent, refused when an integer result would pass MAX_INT_BITS (checked before computing it)."""
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if exponent > MAX_INT_BITS or (abs(base).bit_length() - 1) * exponent > MAX_INT_BITS:
            raise _Refused("result too large")
    return operator.pow(base, exponent)  # floats overflow with OverflowError, which the caller catches


_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: _power,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _evaluate(node: ast.AST) -> int | float:
    """The value of one node of the parsed expression; anything but the accepted forms raises _Refused."""
    if isinstance(node, ast.Constant):
        if type(node.value) in (int, float):  # not bool (a subclass of int), complex or str
            return _checked(node.value)
        raise _Refused("constant")
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        return _checked(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.Call):
        return _count(node)
    raise _Refused(type(node).__name__)


def _count(node: ast.Call) -> int:
    """"strawberry".count("r"): a str literal's count of a str literal, and no other call."""
    func = node.func
    if (isinstance(func, ast.Attribute) and func.attr == "count" and _is_str(func.value)
            and len(node.args) == 1 and _is_str(node.args[0]) and not node.keywords):
        return func.value.value.count(node.args[0].value)
    raise _Refused("call")


def _is_str(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is str


def _checked(value: object) -> int | float:
    """`value` if it is a finite int or float of bounded size (a negative number's fractional power is complex)."""
    if type(value) is int and value.bit_length() <= MAX_INT_BITS:
        return value
    if type(value) is float and math.isfinite(value):
        return value
    raise _Refused("result out of range")


def _format(value: int | float) -> str:
    """Ints as they are; floats to SIGNIFICANT_DIGITS, and a whole float as an int (48/2 -> "24", as GSM8K writes)."""
    if isinstance(value, int):
        return str(value)
    value = float(f"{value:.{SIGNIFICANT_DIGITS}g}")
    if value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value)
