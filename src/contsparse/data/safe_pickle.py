"""Unpickling the numpy-array pickles of MNIST and CIFAR without executing code.

``pickle.load`` runs whatever callable a file names; these files only need numpy's array
reconstruction, so nothing else is admitted.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, BinaryIO

import numpy as np

from contsparse.errors import UserError


def _numpy_multiarray():
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return multiarray


_MULTIARRAY = _numpy_multiarray()
_ALLOWED: dict[tuple[str, str], Any] = {}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_module, "_reconstruct")] = _MULTIARRAY._reconstruct
    _ALLOWED[(_module, "scalar")] = _MULTIARRAY.scalar
_ALLOWED[("numpy", "ndarray")] = np.ndarray
_ALLOWED[("numpy", "dtype")] = np.dtype


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """How Python 3 pickles ``bytes`` at protocol 2 (e.g. a re-saved CIFAR batch): only latin-1."""
    if encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"refused to load _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_ALLOWED[("_codecs", "encode")] = _latin1_bytes


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: only numpy arrays are allowed") from None


def load_numpy_pickle(stream: BinaryIO | bytes, source: str = "data file") -> Any:
    """Load a pickle that may contain only numpy arrays, tuples, lists, dicts, numbers and strings."""
    if isinstance(stream, bytes):
        stream = io.BytesIO(stream)
    try:
        return _NumpyOnlyUnpickler(stream, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, SystemError, MemoryError) as err:  # what damaged bytes raise (MemoryError: a huge shape)
        raise UserError(f"{source} is not a valid numpy pickle ({err}); delete it and fetch it again") from err
