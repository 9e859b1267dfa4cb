"""Tools a model calls while it generates, and the sandbox that checks the code it writes.

The bottom layer of adamba: these modules import only the standard library.
- calculator.calculate: the <|python_start|> expression <|python_end|> tool (safe arithmetic and letter counting).
- sandbox.run_python: untrusted Python in a fresh, locked-down subprocess (HumanEval-style checks);
  sandbox.isolation / network_isolated say which of its layers this machine supports.
"""

from .calculator import calculate
from .sandbox import Isolation, SandboxResult, isolation, network_isolated, run_python

__all__ = ["Isolation", "SandboxResult", "calculate", "isolation", "network_isolated", "run_python"]
