"""Exception types raised for user mistakes.

Every error a user can cause derives from :class:`VimodelsError`, so the
command line can turn it into one line and exit code 2 while genuine bugs
still show a traceback.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np


class VimodelsError(ValueError):
    """Base class of every error caused by user input."""


class UnknownNameError(VimodelsError, KeyError):
    """A model, guide or ELBO name that is not registered."""

    def __init__(self, kind: str, name: object, valid: Iterable[str]):
        self.kind = kind
        self.name = name
        self.valid = sorted(valid)
        super().__init__(f"unknown {kind} {name!r}; valid {kind}s are: {', '.join(self.valid)}")

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.args[0]


class DataError(VimodelsError):
    """Data that is missing, mis-shaped, of the wrong dtype or not finite."""


class ModelError(DataError):
    """The user's model cannot be run as written (a bug in its code, an unsupported construct).

    A :class:`DataError` subclass: before models were told apart from their data,
    both raised DataError.
    """


class OptionError(VimodelsError):
    """An option of the wrong type or out of its valid range."""


class IncompatibleError(VimodelsError):
    """A guide or ELBO that cannot be used with the given model."""


class CurvatureError(VimodelsError):
    """A Hessian that is not positive definite where a Gaussian needs one (Laplace)."""


class OutputError(VimodelsError):
    """An output location that cannot be written."""


class PrecisionWarning(UserWarning):
    """Float64 data that float32 would round (kept float64) met a model computing in float32."""


SEED_MAX = 2**32 - 1  # numpy's and torch's seeds are 32-bit


def check_option(
    name: str,
    value: object,
    *,
    kind: type | tuple[type, ...],
    low=None,
    low_inclusive: bool = True,
    high=None,
):
    """Raise :class:`OptionError` unless ``value`` has the type and range required.

    NumPy scalars count as their Python kind (``np.int64(200)`` is an int,
    ``np.float32(0.1)`` a float); a float option is never NaN.

    Parameters
    ----------
    name : str
        Option name used in the message.
    value : object
        The value given by the user.
    kind : type or tuple of types
        Accepted types (``bool`` is never accepted for numeric options).
    low, high : number, optional
        Bounds; ``low`` is inclusive unless ``low_inclusive`` is False, ``high`` inclusive.

    Returns
    -------
    object
        ``value``, a NumPy scalar converted to the Python int or float it stands for.
    """
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, (bool, np.bool_)):
        if int in kinds and isinstance(value, np.integer):
            value = int(value)
        elif float in kinds and isinstance(value, (np.floating, np.integer)):
            value = float(value)
    if isinstance(value, (bool, np.bool_)) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise OptionError(f"{name} must be {names}, got {value!r} ({type(value).__name__})")
    if isinstance(value, float) and math.isnan(value):
        raise OptionError(f"{name} must be a number, got nan")
    if low is not None:
        bad = value < low if low_inclusive else value <= low
        if bad:
            op = ">=" if low_inclusive else ">"
            raise OptionError(f"{name} must be {op} {low}, got {value!r}")
    if high is not None and value > high:
        raise OptionError(f"{name} must be <= {high}, got {value!r}")
    return value


def check_seed(value: object, name: str = "seed") -> int:
    """A seed as an int in ``0 .. 2**32 - 1`` (NumPy integers accepted), else OptionError."""
    return check_option(name, value, kind=int, low=0, high=SEED_MAX)


def derive_seed(seed: int, offset: int) -> int:
    """``seed + offset`` wrapped into ``0 .. 2**32 - 1`` (a derived stream's seed stays valid)."""
    return (int(seed) + int(offset)) % (SEED_MAX + 1)
