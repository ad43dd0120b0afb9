"""Load CIFAR "python version" pickles without letting the file run code.

A pickle can call any importable function while loading (os.system, eval, ...). The
Unpickler below resolves only an allow-list of globals, looked up in our own table (the
module named in the file is never imported); anything else raises UnsafePickleError before
a single call is made. The list is what numpy arrays in plain dicts/lists need:
* ndarray reconstruction, as written by numpy 1.x (numpy.core...) and 2.x (numpy._core...);
* numeric._frombuffer: protocol-5 pickles written by Python 3 (PickleBuffer path);
* _codecs.encode: protocol-2 pickles written by Python 3 store bytes through it;
* set / frozenset / bytearray for plain containers (lists, dicts, tuples need no global).
"""
from __future__ import annotations

import codecs
import os
import pickle

import numpy as np


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """The pickle asked for a global outside the allow-list; nothing was executed.
    Also a ValueError: bad input, reported as one sentence by the CLI like any other."""


def _np_core():
    return np._core if hasattr(np, "_core") else np.core  # numpy 2.x vs 1.x


_NUMPY = {  # (module, name) as written in the pickle -> resolver (numpy 1.x and 2.x names)
    ("numpy.core.multiarray", "_reconstruct"): lambda: _np_core().multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): lambda: _np_core().multiarray._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): lambda: _np_core().numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): lambda: _np_core().numeric._frombuffer,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: codecs.encode,
}
_CONTAINERS = {"set": set, "frozenset": frozenset, "bytearray": bytearray}


def _resolve(module: str, name: str):
    """The allowed object for (module, name), or None."""
    if module in ("builtins", "__builtin__"):  # py3 and py2 spellings
        return _CONTAINERS.get(name)
    resolver = _NUMPY.get((module, name))
    return resolver() if resolver else None


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fileobj, source: str):
        super().__init__(fileobj, encoding="bytes")  # CIFAR pickles are Python 2 str = bytes
        self._source = source

    def find_class(self, module, name):
        obj = _resolve(module, name)
        if obj is None:
            raise UnsafePickleError(
                f"{self._source}: refusing to load global '{module}.{name}' from a pickle; "
                "only numpy arrays in plain containers are allowed (nothing was executed). "
                "If this file should be a CIFAR batch, re-download it.")
        return obj


def safe_load_pickle(fileobj_or_path, *, name: str | None = None):
    """Unpickle CIFAR-style data safely; dict keys that are bytes become str.

    name: how errors refer to the data (defaults to the path or the file object's name).
    """
    if isinstance(fileobj_or_path, (str, os.PathLike)):
        with open(fileobj_or_path, "rb") as f:
            return _load(f, name or str(fileobj_or_path))
    return _load(fileobj_or_path, name or getattr(fileobj_or_path, "name", "<pickle stream>"))


def _load(f, source: str):
    try:
        obj = _RestrictedUnpickler(f, source).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise pickle.UnpicklingError(f"{source}: not a readable pickle ({e})") from None
    return _str_keys(obj)


def _str_keys(obj):
    if isinstance(obj, dict):
        return {(k.decode("latin-1") if isinstance(k, bytes) else k): _str_keys(v)
                for k, v in obj.items()}
    return obj
