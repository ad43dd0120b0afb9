"""Model registry: name -> builder function.

    model = create_model("resnet20", num_classes=10)
    model = create_model("resnet18", num_classes=10, pretrained="resnet18.pth", head="reset")

Builders live in resnet.py (ImageNet layout) and cifar_resnet.py (CIFAR layout) and register
themselves with @register_model when this package is imported.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}  # the only module-level state


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a builder under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is already registered")
    _MODELS[fn.__name__] = fn
    return fn


def _natural_key(name: str) -> tuple[str, int]:
    # "resnet110" sorts after "resnet56": (letters, number)
    return re.sub(r"\d+", "", name), int(re.sub(r"\D", "", name) or 0)


def list_models() -> list[str]:
    """Registered model names, grouped by family and ordered by depth."""
    return sorted(_MODELS, key=_natural_key)


def _builder(name: str) -> Callable[..., nn.Module]:
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Available: {', '.join(list_models())}")
    return _MODELS[name]


def create_model(name: str, num_classes: int | None = None, in_chans: int = 3,
                 pretrained: str | Path | Mapping[str, torch.Tensor] | None = None, *,
                 head: str = "strict", **kwargs: Any) -> nn.Module:
    """Build a registered model; optionally load weights into it.

    num_classes: None = the architecture's default (1000 ImageNet layout, 10 CIFAR layout).
    pretrained: a weights file (or state dict) for `resforge.weights.load_weights`; conv1 is
        adapted when in_chans differs; `head` = "strict" | "reset" | "keep-matching" decides
        what happens to a file's fc when num_classes differs.
    kwargs go to the builder (drop_rate, zero_init_residual, small_input, shortcut, ...).
    """
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = _builder(name)(in_chans=in_chans, **kwargs)
    if pretrained is not None:
        from resforge.weights import load_weights  # weights.py imports nothing from here at import time
        load_weights(model, pretrained, head=head)
    return model


# Builder settings a checkpoint may record as model.kwargs (what pipeline.build_model and the
# fine-tuner write), per builder module. Nothing else ever reaches a builder from a file:
# not `pretrained` (a path), not `arch`, not a setting resforge never records.
_RECORDED_SETTINGS = {
    "resforge.models.cifar_resnet": ("drop_rate", "shortcut"),
    "resforge.models.resnet": ("drop_rate", "small_input"),
    "resforge.models.fastnet": ("drop_rate",),
}
_SETTING_VALUES = {  # setting -> (is the value allowed?, what is allowed)
    "drop_rate": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1,
                  "a number in [0, 1)"),
    "shortcut": (lambda v: isinstance(v, str) and v in ("A", "B"), "'A' or 'B'"),
    "small_input": (lambda v: isinstance(v, bool), "true or false"),
}


def check_settings(name: str, kwargs: Mapping[str, Any]) -> str | None:
    """Why `kwargs` are not builder settings a stored `name` model may carry; None if they are."""
    allowed = _RECORDED_SETTINGS.get(_builder(name).__module__, ())
    for key, value in kwargs.items():
        if key not in allowed:
            return (f"has {key!r}, which is not a setting a {name} checkpoint may carry "
                    f"(allowed: {', '.join(allowed) or 'none'})")
        ok, wanted = _SETTING_VALUES[key]
        if not ok(value):
            return f"has {key}={value!r:.60}; it must be {wanted}"
    return None


def model_info(name: str) -> dict[str, Any]:
    """Facts about an architecture at its default settings, without allocating its weights."""
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = _builder(name)()
    cfg = model.default_cfg
    return dict(name=name, family=cfg["family"], layout=cfg["layout"],
                input_size=tuple(cfg["input_size"]), num_classes=cfg["num_classes"],
                params=sum(p.numel() for p in model.parameters()),
                num_features=model.num_features, stage_names=list(model.stage_names))


# Builders register themselves on import; they need register_model, defined above.
from resforge.models import cifar_resnet, fastnet, resnet  # noqa: E402,F401
