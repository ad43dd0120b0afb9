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

from resforge.models import create_model, list_models, model_info  # noqa: E402,F401

_API = ("train", "evaluate", "predict", "scan", "load_config")


def __getattr__(name):
    # The API loads lazily so `import resforge` stays cheap (no data/plotting imports).
    if name in _API:
        from resforge import api
        return getattr(api, name)
    raise AttributeError(f"module 'resforge' has no attribute {name!r}")
