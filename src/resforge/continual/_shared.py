"""The training pipeline's functions that updates reuse, imported in this one place.

They live in resforge.api today and move to resforge.pipeline (the shared "config -> data ->
model -> runtime" module); api.py becomes a façade that nothing in the package imports, so the
imports stay lazy and the move is one line each here.
"""
from __future__ import annotations


def prepare_data(cfg, manifest: dict | None = None):
    """(bundle, manifest) of cfg.data: the source loaded, its splits fixed (by `manifest` if given)."""
    from resforge.api import prepare_data as _prepare   # pipeline: re-point to resforge.pipeline at merge
    return _prepare(cfg, manifest)
