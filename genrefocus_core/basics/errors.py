"""Exceptions with messages meant for the person at the keyboard.

Every error the core raises on bad input or a bad model file derives from
GenRefocusError, so front ends (ComfyUI nodes, the CLI) can show the message as is.
"""
import math


class GenRefocusError(ValueError):
    """Base class: bad input, a bad model file, or an impossible request."""


class InputError(GenRefocusError):
    """An image, depth map, mask, focus point or setting that cannot be used."""


class OutputError(GenRefocusError):
    """An output file that cannot be written (no folder, unknown extension, no permission, disk full,
    the path of an input); a previous file of that name is always left intact."""


class ModelFileError(GenRefocusError):
    """A model file that exists but does not hold what it should (wrong family, layout, shapes, corrupt)."""


class MissingModelFileError(GenRefocusError, FileNotFoundError):
    """A model file that is not where it should be; the message names the file and its folder."""

    def __init__(self, filename, where, hint=""):
        self.filename = str(filename)
        self.where = str(where)
        msg = f"Model file '{self.filename}' not found. Put it in {self.where}."
        if hint:
            msg += " " + hint
        super().__init__(msg)

    def __str__(self):
        # OSError's __str__ would print "[Errno None] None: '<filename>'" instead of the message.
        return self.args[0]


class Interrupted(Exception):
    """Raised by a progress callback to stop sampling between steps (not an input error)."""


def finite_number(value, what: str) -> float:
    """`value` as a float; InputError naming `what` for anything that is not a finite number (NaN
    passes every range comparison, so range checks alone do not catch it)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number, got {value!r}.") from None
    if not math.isfinite(out):
        raise InputError(f"{what} must be a finite number, got {value!r}.")
    return out
