"""resforge: train residual networks from scratch and fine-tune pretrained CNNs.

The Python API that the ``resforge`` CLI is a thin layer over::

    import resforge
    run = resforge.train(recipe="digits", overrides=["train.epochs=5"])
    resforge.evaluate(run.dir)
    resforge.predict(run.dir, ["img.png"])
"""
__version__ = "0.1.0"

from resforge.models import create_model, list_models, model_info  # noqa: E402,F401


def __getattr__(name):
    # The heavy API modules load lazily so `import resforge` stays cheap.
    if name in ("train", "evaluate", "predict", "scan", "load_config"):
        from resforge import api
        return getattr(api, name)
    raise AttributeError(f"module 'resforge' has no attribute {name!r}")
