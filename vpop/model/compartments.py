"""`ByCompartment`: one value for each of the four compartments, with elementwise arithmetic.

Why not a (4,) array: vmapped over patients, (4,) arrays become [N, 4] arrays whose sums, stacks and
index updates split XLA's work into many more separate, memory-bound loops. Four separate scalars
keep every operation elementwise over the patient axis; measured on the yardstick (2 CPU cores) the
whole simulation ran 4x faster (4,400 -> 19,000 patients/s). The class reads like the vector code
it replaces: `k * partition * volume / reference`.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, NamedTuple

import jax.numpy as jnp


def _binary(op: Callable) -> Callable:
    def f(a: "ByCompartment", b: Any) -> "ByCompartment":
        if isinstance(b, ByCompartment):
            return ByCompartment(*(op(x, y) for x, y in zip(a, b)))
        return ByCompartment(*(op(x, b) for x in a))

    return f


def _reflected(op: Callable) -> Callable:
    def f(a: "ByCompartment", b: Any) -> "ByCompartment":
        return ByCompartment(*(op(b, x) for x in a))

    return f


class ByCompartment(NamedTuple):
    """A quantity in blood, lymphoid tissue (spleen and lymph nodes), bone marrow and tumour."""

    blood: Any
    lymphoid: Any
    marrow: Any
    tumour: Any

    __add__ = _binary(operator.add)
    __radd__ = _reflected(operator.add)
    __sub__ = _binary(operator.sub)
    __rsub__ = _reflected(operator.sub)
    __mul__ = _binary(operator.mul)
    __rmul__ = _reflected(operator.mul)
    __truediv__ = _binary(operator.truediv)
    __rtruediv__ = _reflected(operator.truediv)
    __pow__ = _binary(operator.pow)

    def __neg__(self) -> "ByCompartment":
        return ByCompartment(*(-x for x in self))

    @property
    def tissues(self):
        """Sum over the three tissue compartments (everything but blood)."""
        return self.lymphoid + self.marrow + self.tumour

    def total(self):
        return self.blood + self.tissues

    @staticmethod
    def full(value) -> "ByCompartment":
        return ByCompartment(value, value, value, value)

    @staticmethod
    def blood_and_tissues(blood, tissue) -> "ByCompartment":
        """`blood` in blood and `tissue` in the three tissue compartments."""
        return ByCompartment(blood, tissue, tissue, tissue)


def cmap(f: Callable, *args) -> ByCompartment:
    """Apply f compartment by compartment; ByCompartment arguments are split, others broadcast."""
    split = [a if isinstance(a, ByCompartment) else ByCompartment.full(a) for a in args]
    return ByCompartment(*(f(*xs) for xs in zip(*split)))


def maximum(a, b) -> ByCompartment:
    return cmap(jnp.maximum, a, b)
