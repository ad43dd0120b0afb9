"""The documented Python API; each CLI subcommand calls exactly one function here.

    train(recipe=None, overrides=None, resume=None) -> TrainRun          (train_run.py)
    evaluate(source, data=None, splits=("test",), tta=False, model=None, ...) -> dict   (evaluation.py)
    predict(source, inputs, topk=5, ...) -> list[dict]                   (infer.py)
    scan(source, ...) -> dict                                            (data/scan.py)
    degradation(depths=(20, 56), seeds=(0,), ...) -> dict                (experiments/degradation.py)
    finetune(source, data=..., policy=..., ...) -> FinetuneRun           (finetune/run.py)
    lr_find(source=None, data=..., policy=..., ...) -> dict              (finetune/lrfind.py)
    update(model, data, method=..., ...) -> UpdateRun                    (continual/update.py)
    versions(run) -> str                                                 (continual/update.py)
    fewshot(model, support, shots=K, ...) -> FewshotResult               (continual/fewshot.py)
    bench(target=None, overrides=(), seconds=3, ...) -> dict             (bench/)

A façade only: the functions live in the modules named, which compose pipeline.py (config ->
data -> model -> runtime -> batches). Nothing inside resforge imports this module but cli.py,
so it can import everything without an import circle.
"""
from __future__ import annotations

from resforge.bench import bench
from resforge.config import load_config
from resforge.continual.fewshot import fewshot
from resforge.continual.update import UpdateRun, update, versions_table
from resforge.data import scan
from resforge.evaluation import evaluate
from resforge.experiments.degradation import report_degradation, run_degradation
from resforge.finetune.lrfind import lr_find
from resforge.finetune.run import FinetuneRun, finetune
from resforge.infer import predict
from resforge.train_run import TrainRun, train

__all__ = ["train", "TrainRun", "evaluate", "predict", "scan", "load_config", "degradation",
           "degradation_report", "finetune", "FinetuneRun", "lr_find", "update", "UpdateRun", "versions", "fewshot",
           "bench", "export"]


def degradation(depths=(20, 56), seeds=(0,), **kwargs) -> dict:
    """He et al. 2016's degradation experiment (plainD vs resnetD twins, one recipe); see
    resforge.experiments.degradation.run_degradation for the arguments and outputs."""
    return run_degradation(depths, seeds, **kwargs)


def degradation_report(depths=(20, 56), seeds=(0,), **kwargs) -> dict:
    """Redraw the degradation experiment's figures and table from its runs as they stand, training
    nothing (unfinished runs drawn up to their last epoch); see report_degradation."""
    return report_degradation(depths, seeds, **kwargs)


def export(source, format: str = "onnx", out=None, *, int8=False, model_name=None, samples=None, **kwargs):
    """Export to ONNX or TorchScript (export.py: parity-checked against PyTorch); `int8` (True,
    a quantize.Int8Options or a dict of its fields) quantises an ONNX export (quantize.py:
    accuracy-checked against the fp32 ONNX on the run's own test images)."""
    from resforge.export import export as export_float
    from resforge.quantize import export_int8_from, int8_options
    if int8_options(int8) is None:
        return export_float(source, format, out, model_name=model_name, samples=samples, **kwargs)
    if format != "onnx":
        raise ValueError(f"--int8 quantises ONNX exports only, not {format}: use --format onnx "
                         "(TorchScript artifacts stay float32)")
    return export_int8_from(source, out, int8=int8, model_name=model_name, samples=samples, **kwargs)


def versions(run) -> str:
    """The lineage of a run's model versions as a table; see resforge.continual.update.versions_table."""
    return versions_table(run)
