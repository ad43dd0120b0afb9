"""The training pipeline's functions that updates reuse, imported in this one place
(resforge.pipeline: config -> data -> model -> runtime -> batches)."""
from __future__ import annotations

from resforge.pipeline import prepare_data  # noqa: F401 (re-exported)
