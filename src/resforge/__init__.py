"""resforge: train residual networks from scratch and fine-tune pretrained CNNs.

The Python API that the ``resforge`` CLI is a thin layer over::

    import resforge
    run = resforge.train("digits", ["train.epochs=5"])     # -> TrainRun (run.dir, run.results)
    resforge.evaluate(run.dir)                              # -> {split: metrics}
    resforge.predict(run.dir, ["img.png", "folder/"])       # -> rows with top-k labels
    resforge.scan("path/to/images")                         # -> data report
    resforge.create_model("resnet18", num_classes=5)
"""
__version__ = "0.1.0"

# Every public name loads on first use, so `import resforge` (and `resforge --help`, which
# needs only __version__) does not pay torch's ~1-10 s import.
# Each name maps to the module that defines it (resforge.api is the same set as a façade).
_LAZY = {"train": "resforge.train_run", "evaluate": "resforge.evaluation", "predict": "resforge.infer",
         "scan": "resforge.data", "load_config": "resforge.config", "update": "resforge.continual.update",
         "versions": "resforge.api",
         "create_model": "resforge.models", "list_models": "resforge.models", "model_info": "resforge.models"}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value            # later look-ups skip this hook
        return value
    raise AttributeError(f"module 'resforge' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
