"""Static int8 ONNX exports, calibrated on the run's own training images and accuracy-checked.

    resforge export runs/x --format onnx --int8 [--calibration 512] [--int8-tolerance 0.5]
        -> runs/x/weights/best.int8.onnx   (the fp32 best.onnx is neither needed nor touched)

Steps (export_int8), every file a temporary beside the target until the last one passed:
  1. the fp32 ONNX export, parity-checked against eager PyTorch as every export is (export.py)
  2. ONNX Runtime's pre-processing (quant_pre_process: shape inference and graph optimisation,
     which the quantiser needs to see each Conv with its bias and ReLU as one unit)
  3. quantize_static in QDQ format: activations uint8 per tensor (MinMax ranges over the
     calibration images), weights int8 per output channel, symmetric, in a 7-bit range
  4. the accuracy check: fp32 and int8 ONNX on the run's test split (else val), every image
     unless capped; top-1 of each and the share of images whose top-1 class agrees. int8 top-1
     more than `tolerance` percentage points below fp32 top-1 -> ExportError, no file written
  5. the fp32 export's metadata plus a "quantization" record of step 4 embedded in the int8
     graph, which is then opened as `serve` / `predict` open it (backends.OnnxBackend) before it
     gets its name

Calibration images: `calibration` images of the run's training split (the run folder's
config.json and splits.json, as `resforge eval` rebuilds them), picked class-balanced with a
seed and preprocessed exactly as inference preprocesses (infer.Preprocess). Weights outside a
run folder (third-party files) need `data` (--data): a labelled source whose train split
calibrates and whose test split checks; there is no silent fallback to random calibration.

Why the 7-bit weight range (ONNX Runtime's reduce_range): on x86 CPUs without VNNI (AVX2 and
plain AVX-512) ONNX Runtime's uint8 x int8 kernels add pairs of products in int16 with
saturation (255 x 127 x 2 overflows it; 255 x 63 x 2 does not). On this project's AVX2 machine
the full 8-bit range cost the akamaster ResNet-56 0.34 points of CIFAR-10 top-1 (93.33 -> 92.99%,
97.3% agreement) and the 7-bit range 0.02 (93.31%, 99.2%), at the same speed. The artifact is
checked where it is exported but may be served elsewhere, so the portable range is the default.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resforge.atomic import finish_temporary, temporary_for
from resforge.progress import track

log = logging.getLogger(__name__)

INT8_SUFFIX = ".int8.onnx"
METHOD = "static QDQ"
ACTIVATIONS = "uint8 per tensor, asymmetric, MinMax"
WEIGHTS = "int8 per channel, symmetric, 7-bit"
CALIBRATION_BATCH = 32      # images per calibration run: bounds memory, the ranges are global
CHECK_BATCH = 256           # images per accuracy-check batch (preprocessed batch by batch)
PARITY_SAMPLES = 64         # as export.N_SAMPLES: the fp32 stage's parity check


@dataclass(frozen=True)
class Int8Options:
    """What `resforge export --int8` takes besides the source (export(..., int8=Int8Options(...)))."""
    calibration: int = 512            # training images the activation ranges are measured on
    tolerance: float = 0.5            # largest top-1 drop vs fp32 allowed, in percentage points
    data: str | None = None           # labelled data instead of the run's own (third-party weights)
    data_root: str | None = None      # where named sources are found (default: RESFORGE_DATA)
    seed: int = 0                     # which training images calibrate
    check_images: int | None = None   # cap on the accuracy check's images (None: the whole split)
    reduce_range: bool = True         # 7-bit weights (module docstring); False only for VNNI-only use

    def __post_init__(self):
        if not _is_int(self.calibration) or self.calibration < 1:
            raise ValueError(f"int8 calibration must be a number of images >= 1, got {self.calibration!r}")
        if (not isinstance(self.tolerance, (int, float)) or isinstance(self.tolerance, bool)
                or not math.isfinite(self.tolerance) or not 0 <= self.tolerance <= 100):
            raise ValueError(f"int8 tolerance must be 0..100 percentage points of top-1, got {self.tolerance!r}")
        if self.check_images is not None and (not _is_int(self.check_images) or self.check_images < 1):
            raise ValueError(f"int8 check_images must be >= 1 or None (the whole split), got {self.check_images!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"int8 seed must be an integer >= 0, got {self.seed!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def int8_options(value) -> Int8Options | None:
    """export()'s `int8` argument: False/None (fp32), True (defaults), Int8Options, or a dict of its fields."""
    if value is None or value is False:
        return None
    if value is True:
        return Int8Options()
    if isinstance(value, Int8Options):
        return value
    if isinstance(value, dict):
        return Int8Options(**value)
    raise TypeError(f"int8 must be True/False, an Int8Options or a dict of its fields, not {type(value).__name__}")


# ---------------------------------------------------------------- the export


def export_int8_from(source, out: str | Path | None = None, *, int8=True, model_name: str | None = None,
                     samples: list | None = None, atol: float | None = None):
    """`resforge export SOURCE --format onnx --int8`: the run folder / checkpoint / weights file's
    model quantised to `out` (default <weights>.int8.onnx beside the fp32 export); `int8` as
    int8_options takes it. -> export.ExportResult with its `quantization` record."""
    from resforge.checkpoint import load_for_inference
    from resforge.weightfile import resolve_weights

    opts = int8_options(int8) or Int8Options()
    model, meta = load_for_inference(source, model_name=model_name)
    out = Path(out) if out else resolve_weights(source).with_suffix(INT8_SUFFIX)
    return export_int8(model, meta, out, source=source, opts=opts, samples=samples, atol=atol)


def export_int8(model, meta: dict, out: str | Path, *, source, opts: Int8Options,
                samples: list | None = None, atol: float | None = None):
    """Quantise `model` (eager, with its checkpoint meta) to `out`; see the module docstring.
    Returns an export.ExportResult whose `quantization` is the record embedded in the artifact."""
    from resforge.export import ATOL, ExportResult, export_model, export_meta, sample_inputs
    from resforge.infer import Preprocess

    t0 = time.perf_counter()
    out = Path(out)
    bundle, origin = labelled_data(source, meta, opts)
    meta = match_classes(meta, bundle, origin)
    prep = Preprocess(meta)
    check_name, check_split = check_split_of(bundle, origin)
    inputs, where = (sample_inputs(meta, samples) if samples else _parity_inputs(bundle, prep, origin))
    out.parent.mkdir(parents=True, exist_ok=True)
    temps = [temporary_for(out) for _ in range(3)]
    fp32_path, pre_path, int8_path = temps
    try:
        fp32 = export_model(model, meta, "onnx", fp32_path, inputs=inputs, origin=where,
                            atol=ATOL if atol is None else atol)
        reader = CalibrationReader(bundle.splits["train"], prep, opts.calibration, opts.seed)
        quantize_onnx(fp32_path, int8_path, reader, pre_path=pre_path, reduce_range=opts.reduce_range)
        figures = compare_top1(fp32_path, int8_path, check_split, prep, opts.check_images, opts.seed)
        record = {"dtype": "int8", "method": METHOD, "activations": ACTIVATIONS,
                  "weights": WEIGHTS if opts.reduce_range else WEIGHTS.replace("7-bit", "8-bit"),
                  "calibration_images": reader.count, "calibration_split": "train", "split": check_name,
                  "data": bundle.name, **figures, "tolerance": float(opts.tolerance),
                  "onnxruntime": _ort_version()}
        check_tolerance(record, out)
        _finish(int8_path, {**export_meta(meta, "onnx"), "quantization": record}, out)
    finally:
        for t in temps:
            t.unlink(missing_ok=True)
    return ExportResult(out, "onnx", fp32.max_abs_diff, fp32.limit, fp32.top1_agreement, fp32.n_samples,
                        fp32.samples, time.perf_counter() - t0, quantization=record,
                        quantization_summary=describe(record))


def _parity_inputs(bundle, prep, origin: str) -> tuple[np.ndarray, str]:
    from resforge.export import held_out_arrays

    arrays, where = held_out_arrays(bundle, prep, PARITY_SAMPLES, origin)
    if arrays is None:
        raise ValueError(f"int8 export: {where}")
    return prep.batch(arrays), where


def _finish(tmp: Path, meta: dict, out: Path) -> None:
    """Embed the final metadata, prove the file loads as served, and give it its name."""
    import onnx

    from resforge.artifact import ArtifactError, validate_meta
    from resforge.backends import OnnxBackend
    from resforge.export import ExportError, embed_onnx_meta

    validate_meta(meta, f"the metadata for {out}", "onnx")
    proto = onnx.load(str(tmp))
    embed_onnx_meta(proto, meta)
    proto.producer_name = "resforge"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    try:
        OnnxBackend(tmp)              # the checks serve/predict run at load: meta, graph, finite, probe
    except ArtifactError as e:
        raise ExportError(f"the int8 model fails the checks every artifact must pass at load ({e}); "
                          f"{out.name} was not written") from None
    finish_temporary(tmp, out)


def _ort_version() -> str:
    import onnxruntime
    return onnxruntime.__version__


# ---------------------------------------------------------------- data


def labelled_data(source, meta: dict, opts: Int8Options):
    """(bundle, origin): `opts.data` loaded at the model's input size, else the run's own data
    (the run folder's config.json and splits.json); ValueError saying what to pass otherwise."""
    from resforge.data import load_source, make_splits
    from resforge.evaluation import run_data, run_folder
    from resforge.weightfile import resolve_weights

    c, h, w = meta["input_size"]
    if opts.data is not None:
        bundle = load_source(opts.data, image_size=(h, w), channels=c, data_root=opts.data_root)
        return make_splits(bundle)[0], f"{bundle.name} ({opts.data})"
    weights = resolve_weights(source)
    run = run_folder(weights)
    need = (f"pass --data SOURCE, labelled images of the model's {len(meta['class_names'])} classes "
            "(its train split calibrates, its test split checks accuracy)")
    if run is None:
        raise ValueError(f"int8 export of {weights} calibrates on the run's own training images, but the weights "
                         f"are not inside a run folder (config.json and splits.json beside weights/): {need}")
    try:
        bundle = run_data(run, data_root=opts.data_root)
    except (ValueError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ValueError(f"int8 export of {weights}: the run's own data could not be loaded ({first}); "
                         f"make it available again (data_root / RESFORGE_DATA) or {need}") from None
    return bundle, f"{bundle.name} (the run's own data)"


def match_classes(meta: dict, bundle, origin: str) -> dict:
    """The labels of `bundle` must mean the model's outputs; third-party weights take the data's names."""
    k, names = len(meta["class_names"]), list(bundle.class_names)
    if len(names) != k:
        raise ValueError(f"int8 export: {origin} has {len(names)} classes but the model predicts {k}: "
                         "pass --data with the classes the model was trained on")
    if meta.get("source_format") is not None:         # third-party weights: output indices, named by the data
        return {**meta, "class_names": names}
    if names != list(meta["class_names"]):
        raise ValueError(f"int8 export: the classes of {origin} ({', '.join(names[:4])}, ...) are not the "
                         f"model's ({', '.join(meta['class_names'][:4])}, ...) in the same order, so accuracy "
                         "cannot be checked: pass --data with the model's own classes")
    return meta


def check_split_of(bundle, origin: str):
    """('test' | 'val', split) the accuracy is checked on; the train split must exist to calibrate."""
    train = bundle.splits.get("train")
    if train is None or len(train.labels) == 0:
        raise ValueError(f"int8 export: {origin} has no training images to calibrate on")
    for name in ("test", "val"):
        split = bundle.splits.get(name)
        if split is not None and len(split.labels) > 0:
            return name, split
    raise ValueError(f"int8 export: {origin} has neither a test nor a val split to check int8 accuracy on")


def balanced_pick(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n indices (sorted), seeded, spread over the classes as evenly as they allow: each class's
    images in a random order, then round-robin over the classes (one that runs out leaves its
    turns to the others). Sorted, so memory-mapped images are read front to back."""
    labels = np.asarray(labels)
    order = np.random.default_rng(seed).permutation(len(labels))
    shuffled = labels[order]
    by_class = np.argsort(shuffled, kind="stable")
    first = np.searchsorted(shuffled[by_class], shuffled[by_class], side="left")
    rank = np.empty(len(order), dtype=np.int64)
    rank[by_class] = np.arange(len(order)) - first        # position within its class
    take = np.lexsort((np.arange(len(order)), rank))[:n]   # rank 0 of every class, then rank 1, ...
    return np.sort(order[take])


def split_batch(split, idx: np.ndarray, prep) -> tuple[np.ndarray, np.ndarray]:
    """float32 (b, C, H, W) inputs, normalised as inference does, and their labels; a streamed
    split's unreadable files are left out (their labels too)."""
    if split.images is not None:               # uint8 (N, C, H, W) already at the model's size
        arrays = list(np.asarray(split.images[idx]).transpose(0, 2, 3, 1))
        want = (prep.height, prep.width, prep.channels)
        if arrays and arrays[0].shape != want:
            raise ValueError(f"int8 export: the data is stored at {arrays[0].shape} (H, W, C) but the model "
                             f"takes {want}")
        kept = idx
    else:                                      # streamed folder split: decode as predict does
        loaded = [prep.load(split.files[i]) for i in idx]
        ok = [j for j, a in enumerate(loaded) if not isinstance(a, str)]
        arrays, kept = [loaded[j] for j in ok], idx[ok]
    if not arrays:
        return np.zeros((0, prep.channels, prep.height, prep.width), np.float32), np.zeros(0, np.int64)
    return prep.batch(arrays), np.asarray(split.labels)[kept]


class CalibrationReader:
    """Calibration inputs for onnxruntime's quantize_static: `n` balanced, seeded images of
    `split`, preprocessed batch by batch (memory stays at one batch whatever n is). A
    CalibrationDataReader by duck typing (its __subclasshook__ asks only for get_next), so
    importing this module does not import onnxruntime."""

    def __init__(self, split, prep, n: int, seed: int):
        self.idx = balanced_pick(split.labels, min(n, len(split.labels)), seed)
        if n > len(self.idx):
            log.warning("int8 calibration: the training split has %d images, fewer than the %d asked for; "
                        "calibrating on all of them", len(self.idx), n)
        self.split, self.prep, self.count, self._next = split, prep, 0, 0

    def get_next(self) -> dict | None:
        while self._next < len(self.idx):
            chunk = self.idx[self._next:self._next + CALIBRATION_BATCH]
            self._next += len(chunk)
            x, _ = split_batch(self.split, chunk, self.prep)
            if len(x):
                self.count += len(x)
                return {"input": x}
        return None


# ---------------------------------------------------------------- quantisation


def quantize_onnx(fp32_path: Path, out: Path, reader, *, pre_path: Path, reduce_range: bool = True) -> None:
    """ORT pre-processing then static QDQ quantisation of `fp32_path` into `out` (the dynamic batch
    axis and the fp32 input/output stay as they were)."""
    try:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        from resforge.backends import missing_extra
        raise missing_extra("onnxruntime", "onnx") from None
    from resforge.export import ExportError

    try:
        quant_pre_process(str(fp32_path), str(pre_path))
        quantize_static(str(pre_path), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 — the quantiser raises many kinds; all mean the same here
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ExportError(f"int8 quantisation failed in onnxruntime.quantization ({type(e).__name__}: {first}); "
                          f"no artifact was written. Report this with the model name and onnxruntime "
                          f"{_ort_version()}") from None
    if reader.count == 0:
        raise ExportError("int8 calibration read no images (every calibration file was unreadable); "
                          "no artifact was written")


# ---------------------------------------------------------------- the accuracy check


def compare_top1(fp32_path: Path, int8_path: Path, split, prep, limit: int | None = None,
                 seed: int = 0) -> dict:
    """top-1 of the fp32 and the int8 model on `split` (all of it, or `limit` balanced images)
    and the share of images whose top-1 class the two agree on."""
    fp32, int8 = _session(fp32_path), _session(int8_path)
    n_all = len(split.labels)
    idx = np.arange(n_all) if limit is None or limit >= n_all else balanced_pick(split.labels, limit, seed)
    right = np.zeros(2, np.int64)
    agree = seen = 0
    chunks = [idx[i:i + CHECK_BATCH] for i in range(0, len(idx), CHECK_BATCH)]
    for chunk in track(chunks, "checking int8 accuracy", total=len(chunks), unit="batch"):
        x, y = split_batch(split, chunk, prep)
        if not len(x):
            continue
        a, b = fp32(x).argmax(1), int8(x).argmax(1)
        right += [(a == y).sum(), (b == y).sum()]
        agree += int((a == b).sum())
        seen += len(y)
    if seen == 0:
        raise ValueError("int8 export: none of the check split's images could be read")
    return {"n": seen, "fp32_top1": float(right[0] / seen), "int8_top1": float(right[1] / seen),
            "top1_agreement": agree / seen}


def _session(path: Path):
    """x -> logits with ONNX Runtime on the CPU (default threads: one per core)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def drop_points(record: dict) -> float:
    """fp32 top-1 minus int8 top-1, in percentage points (negative: int8 is better)."""
    return 100.0 * (record["fp32_top1"] - record["int8_top1"])


def check_tolerance(record: dict, out: Path) -> None:
    """ExportError when int8 top-1 is more than the tolerance below fp32 top-1."""
    from resforge.export import ExportError

    drop = drop_points(record)
    if drop > record["tolerance"] + 1e-9:            # 1e-9: a drop equal to the tolerance passes
        raise ExportError(
            f"int8 accuracy check failed: top-1 {100 * record['int8_top1']:.2f}% vs fp32 "
            f"{100 * record['fp32_top1']:.2f}% on {record['n']} {record['split']} images of {record['data']}, "
            f"a drop of {drop:.2f} points where at most {record['tolerance']:g} is allowed (top-1 agreement "
            f"{100 * record['top1_agreement']:.1f}%); {out.name} was not written: calibrate on more images "
            "(--calibration N), or allow a larger drop (--int8-tolerance POINTS) if that accuracy will do")


def describe(record: dict) -> str:
    """The summary line of an int8 export (and of `resforge export --int8`)."""
    return (f"int8 accuracy on {record['n']} {record['split']} images of {record['data']}: top-1 fp32 "
            f"{100 * record['fp32_top1']:.2f}%, int8 {100 * record['int8_top1']:.2f}% "
            f"({-drop_points(record):+.2f} points; allowed drop {record['tolerance']:g}), top-1 agreement "
            f"{100 * record['top1_agreement']:.2f}%; calibrated on {record['calibration_images']} "
            f"{record['calibration_split']} images ({record['method']}, weights {record['weights']})")

