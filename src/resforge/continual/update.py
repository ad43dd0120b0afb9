"""`update`: the API behind `resforge update MODEL --data NEW` (one new model version).

    parent version (RUN -> its latest; the run itself is registered as v1 on first use)
    -> the new data, read and split like any training data (data.* keys apply)
    -> its classes matched to the model's by name (head.reconcile; --rename / --merge)
    -> the head grown for new classes (old rows bit for bit)
    -> training with the method (methods.py) in the one training loop (training/loop.fit)
    -> weight aligning if asked -> the replay buffer updated with the new data
    -> every data set seen so far evaluated on its test split (re-created from the manifests the
       versions keep; a source that cannot be loaded any more is named and skipped)
    -> the version written atomically (versions.write_version) with its report (report.py)
The parent and every earlier version are only read.
"""
from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from resforge.config import ConfigError, RunConfig, load_config, validate_update
from resforge.continual import buffer as B
from resforge.continual import head as H
from resforge.continual import methods as M
from resforge.continual import report as R
from resforge.continual import versions as V
from resforge.continual._shared import prepare_data
from resforge.runs import MetricsLog, is_main_process


@dataclass
class UpdateRun:
    version: V.Version              # the new version (verified)
    parent: V.Version
    model: nn.Module
    report: dict                    # report.json content
    config: RunConfig

    @property
    def dir(self) -> Path:
        return self.version.dir


class UpdateDataError(ValueError):
    """New data that cannot make an update (empty, tiny classes, wrong image size)."""


def _say(msg: str) -> None:
    if is_main_process():
        print(msg, flush=True)


# ---------------------------------------------------------------- configuration

def resolve_config(parent: V.Version, meta: dict, data: str | None, overrides, *, method=None, align=None,
                   buffer_size=None, selection=None) -> RunConfig:
    """The update's RunConfig: the parent's training config (optimiser, augmentation, train.*),
    a fresh data section for the new data at the model's input size, then the overrides."""
    base = copy.deepcopy(parent.record.get("config") or {})
    base = {k: v for k, v in base.items() if isinstance(v, dict) or k == "recipe"}
    old = base.get("data", {})
    c, h, w = meta["input_size"]
    base["data"] = {k: old[k] for k in ("val_fraction", "split_seed", "data_root", "cache_dir", "workers")
                    if old.get(k) is not None}
    base["data"].update({"channels": c} if c in (1, 3) else {})
    if h == w:
        base["data"]["image_size"] = h
    base.setdefault("model", {})
    base["model"].update({"name": meta["model"]["name"], "pretrained": None})
    items = list(overrides.items()) if isinstance(overrides, dict) else list(overrides or [])
    extra = {"continual.method": method, "continual.align": align, "continual.buffer_size": buffer_size,
             "continual.selection": selection, "data.source": data}
    as_dict = isinstance(overrides, dict)
    if as_dict:
        merged = {**{k: v for k, v in extra.items() if v is not None}, **dict(items)}
        cfg = load_config(None, merged, base=base)
    else:
        pre = [f"{k}={_yaml(v)}" for k, v in extra.items() if v is not None]
        cfg = load_config(None, pre + items, base=base)
    keys = [k for k, _ in items] if as_dict else [str(o).split("=", 1)[0].strip().lstrip("-") for o in items]
    if data is None and not {"data", "data.source", "source"} & set(keys):
        raise ConfigError("name the new data to update on: --data SRC (a folder, .npz, cifar10, ...)")
    validate_update(cfg)
    if cfg.data.stream:
        raise ConfigError("data.stream=true: an update keeps new images in the replay buffer, so the new data must "
                          "be loaded into memory: set data.stream=false")
    return cfg


def _yaml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


# ---------------------------------------------------------------- data

def _remap(bundle, class_names: list[str], head_index: list[int]):
    """The bundle with labels as head rows and the head's class list."""
    lut = np.asarray(head_index, np.int64)
    splits = {s: dataclasses.replace(sp, labels=lut[sp.labels]) for s, sp in bundle.splits.items()}
    return dataclasses.replace(bundle, splits=splits, class_names=list(class_names))


def _check_new_data(bundle, cfg: RunConfig, meta: dict, source: str) -> None:
    train = bundle.splits["train"].labels
    if len(train) == 0:
        raise UpdateDataError(f"the new data {source} has no training images: an update needs labelled images of "
                              "every class it brings")
    few = _few(bundle, "train", cfg.continual.min_per_class)
    if few:
        _refuse_few(cfg, few)
    want = tuple(meta["input_size"])
    have = (bundle.channels, *bundle.image_size)
    if have != want:
        raise UpdateDataError(f"the new data {source} is {have[0]}x{have[1]}x{have[2]} but the model takes "
                              f"{want[0]}x{want[1]}x{want[2]}: set data.image_size / data.channels to match")


def _few(bundle, split: str, least: int) -> list[tuple[str, int]]:
    """Classes with fewer than `least` images in `split`; a class with no image in any split is only
    declared (an .npz whose labels skip it, e.g. a second task's 5..9), not brought: not listed."""
    k = len(bundle.class_names)
    labels = bundle.splits[split].labels if split in bundle.splits else np.zeros(0, np.int64)
    counts = np.bincount(labels, minlength=k)
    anywhere = sum(np.bincount(sp.labels, minlength=k) for sp in bundle.splits.values())
    return [(bundle.class_names[i], int(n)) for i, n in enumerate(counts) if n < least and anywhere[i] > 0]


def _explain_tiny(cfg: RunConfig) -> None:
    """After the new data failed to split: UpdateDataError if a class has too few training images."""
    from resforge.data.sources import load_source
    d = cfg.data
    try:
        raw = load_source(d.source, image_size=d.image_size, channels=d.channels, cache_dir=d.cache_dir,
                          data_root=d.data_root)
    except ValueError:
        return
    few = _few(raw, "train", cfg.continual.min_per_class)
    if few or "train" not in raw.splits:
        _refuse_few(cfg, few)


def _refuse_few(cfg: RunConfig, few: list[tuple[str, int]]) -> None:
    shown = ", ".join(f"{c!r} ({n})" for c, n in few[:5]) or "all (no training split)"
    raise UpdateDataError(f"the new data {cfg.data.source} has fewer than continual.min_per_class="
                          f"{cfg.continual.min_per_class} training images in {len(few) or 'every'} class(es): {shown}; "
                          "add images, drop those classes, or (for a few labelled examples) use `resforge fewshot`")


def _load_old(parent: V.Version, cfg: RunConfig) -> tuple[dict, dict]:
    """Every data set the parent has seen, re-created from its record and manifest, labels as head
    rows of the parent: ({id: bundle}, {id: why it could not be loaded})."""
    out, missing = {}, {}
    for d in parent.data:
        try:
            saved = {k: v for k, v in d.get("data", {}).items() if v is not None}
            saved.update({"download": False, "manifest": None, "stream": False})
            if cfg.data.data_root and not saved.get("data_root"):
                saved["data_root"] = cfg.data.data_root
            if cfg.data.cache_dir:
                saved["cache_dir"] = cfg.data.cache_dir
            dcfg = load_config(None, base={"data": saved})
            manifest = None
            if d.get("manifest"):
                from resforge.data.splits import load_manifest
                manifest = load_manifest(parent.dir / d["manifest"])
            bundle, _ = prepare_data(dcfg, manifest)
            if list(bundle.class_names) != list(d["class_names"]):
                raise ValueError(f"its classes are now {bundle.class_names[:5]}, not {d['class_names'][:5]}")
            out[d["id"]] = _remap(bundle, parent.class_names, d["head_index"])
        except Exception as e:  # noqa: BLE001 - any failure means the same: that data set is gone
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            missing[d["id"]] = f"{d['source']} could not be loaded ({text[:200]})"
    return out, missing


# ---------------------------------------------------------------- model outputs

@torch.no_grad()
def outputs(model: nn.Module, images: np.ndarray, augment, rt, batch_size: int,
            features: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits (N, K) and, when asked, pooled pre-logit features (N, D) of uint8 images (N, C, H, W),
    as evaluation sees them (eval mode, no augmentation), fp32 on CPU."""
    model.eval()
    logits, feats = [], []
    for i in range(0, len(images), batch_size):
        x = augment.eval_view(torch.from_numpy(np.array(images[i:i + batch_size], np.uint8)).to(rt.device))
        with rt.autocast():
            fmap = model.forward_features(rt.to_input(x))
            logits.append(model.forward_head(fmap).float().cpu())
            if features:
                feats.append(model.forward_head(fmap, pre_logits=True).float().cpu())
    k = model.fc.out_features
    lg = torch.cat(logits).numpy() if logits else np.zeros((0, k), np.float32)
    return lg, (torch.cat(feats).numpy() if feats else None) if features else None


def _evaluate(model, bundles: dict, augment, rt, batch_size: int, class_names: list[str]) -> dict:
    out = {}
    for j, b in bundles.items():
        sp = b.splits.get("test")
        if sp is None or not len(sp.labels):
            continue
        lg, _ = outputs(model, sp.images, augment, rt, batch_size)
        out[j] = R.accuracy_entry(lg, sp.labels, class_names)
    return out


# ---------------------------------------------------------------- the buffer

def _start_buffer(parent: V.Version, meta: dict, cfg: RunConfig, old: dict, model, augment, rt,
                  buffer_file) -> tuple[B.ReplayBuffer, str]:
    """The buffer the update starts from: a given file, the parent's, or one selected now from the
    parent's training data (a version made from a run has none yet). -> (buffer, where from)."""
    c, shape = cfg.continual, tuple(meta["input_size"])
    path = Path(buffer_file) if buffer_file else parent.buffer
    if path is not None:
        buf = B.load(path, lineage=parent.lineage, class_names=parent.class_names, image_shape=shape)
        buf.selection = c.selection
        return buf, str(path)
    buf = B.empty(shape, parent.class_names, parent.lineage, c.buffer_size, c.selection, cfg.train.seed)
    if not old:
        return buf, "empty (the parent has no buffer and none of its training data could be loaded)"
    for j, b in old.items():
        sp = b.splits["train"]
        lg, ft = outputs(model, sp.images, augment, rt, cfg.train.eval_batch_size, c.selection == "herding")
        bf = outputs(model, buf.images, augment, rt, cfg.train.eval_batch_size, True)[1] \
            if c.selection == "herding" else None
        buf = B.update(buf, np.asarray(sp.images), sp.labels, lg, ft, buffer_features=bf)
    return buf, f"selected now from the parent's training data ({', '.join(old)})"


# ---------------------------------------------------------------- update

def update(model: str | Path, data: str | None = None, *, method: str | None = None, overrides=None,
           rename=None, merge=None, buffer_size: int | None = None, align: bool | None = None,
           selection: str | None = None, buffer_file: str | Path | None = None,
           data_root: str | None = None) -> UpdateRun:
    """Update the model version MODEL (a run folder: its latest version; RUN@vN; RUN/versions/vN) on
    the data `data` with `method`; writes RUN/versions/v(N+1) and returns it with its report.

    rename / merge: ['OLD=NEW', ...] / ['DATA=MODEL', ...] (head.py). buffer_file: a replay buffer
    to start from instead of the parent's (it must be of the same lineage). Every other setting is
    a config key (continual.*, train.epochs, optim.lr, data.*)."""
    from resforge.checkpoint import load_for_inference, save_checkpoint
    from resforge.data.augment import Augmenter
    from resforge.data.loader import make_batches
    from resforge.training.device import make_runtime, seed_everything
    from resforge.training.loop import fit, soft_cross_entropy

    run, parent = V.resolve_model(model)
    if parent is None:
        parent = V.register_root(run)
        _say(f"registered {run} as version v1 ({parent.dir})")
    rename_map, merge_map = H.parse_pairs(rename, "--rename"), H.parse_pairs(merge, "--merge")
    _, meta = load_for_inference(parent.weights)             # the sidecar, checked against the weights
    if meta["class_names"] != parent.class_names:
        raise V.VersionError(f"{parent.weights.with_suffix('.json')} names classes {meta['class_names'][:5]} but "
                             f"{parent.dir / V.RECORD} {parent.class_names[:5]}: the version is inconsistent")
    if data_root:
        overrides = [*(overrides or []), f"data.data_root={data_root}"] if not isinstance(overrides, dict) \
            else {**overrides, "data.data_root": data_root}
    cfg = resolve_config(parent, meta, data, overrides, method=method, align=align, buffer_size=buffer_size,
                         selection=selection)
    c = cfg.continual
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    rt = make_runtime(cfg.train.device, cfg.train.precision, cfg.train.channels_last, cfg.train.threads)
    net, _ = load_for_inference(parent.weights, device=rt.device)
    try:
        bundle, manifest = prepare_data(cfg)
    except ValueError:
        _explain_tiny(cfg)              # too few images to split: say that, not how splitting failed
        raise
    _check_new_data(bundle, cfg, meta, cfg.data.source)
    rec = H.reconcile(parent.class_names, list(bundle.class_names), rename_map, merge_map)
    names, k_old = rec.class_names, len(parent.class_names)
    _say(f"resforge update: {parent.dir} ({k_old} classes) + {bundle.name} "
         f"({len(bundle.splits['train'].labels)} train images, {len(bundle.class_names)} classes: "
         f"{len(rec.added)} new) with {c.method}{' + weight aligning' if c.align else ''} on {rt.describe()}")
    augment0 = Augmenter(cfg.aug, meta["mean"], meta["std"], k_old, tuple(meta["input_size"][1:]), seed=cfg.train.seed)
    old, missing = _load_old(parent, cfg)
    for j, why in missing.items():
        _say(f"  note: old data set {j} is not evaluated: {why}")
    parent_now = _evaluate(net, old, augment0, rt, cfg.train.eval_batch_size, parent.class_names)
    buf, buf_from = _start_buffer(parent, meta, cfg, old, net, augment0, rt, buffer_file) if c.buffer_size \
        else (None, "none (continual.buffer_size=0)")
    if M.USES_BUFFER[c.method] and (buf is None or len(buf) == 0):
        raise UpdateDataError(f"continual.method={c.method} replays old images, but {parent.dir} has no replay buffer "
                              f"and its training data cannot be loaded ({'; '.join(missing.values()) or 'none'}): "
                              "pass --replay-buffer FILE of this lineage, or use --method lwf (needs no old images)")
    teacher = copy.deepcopy(net).eval() if c.method == "lwf" else None
    H.grow_head(net, len(rec.added), seed=cfg.train.seed)
    net = net.to(rt.device, memory_format=torch.channels_last if rt.channels_last else torch.contiguous_format)
    if buf is not None:
        buf = B.grow_classes(buf, names)
    new = _remap(bundle, names, rec.head_index)
    augment = Augmenter(cfg.aug, meta["mean"], meta["std"], len(names), tuple(meta["input_size"][1:]),
                        seed=cfg.train.seed)
    tb = make_batches(new, "train", rt.device, cfg.train.batch_size, train=True, workers=cfg.data.workers)
    vb = (make_batches(new, "val", rt.device, cfg.train.eval_batch_size, train=False, workers=cfg.data.workers)
          if len(new.splits["val"].labels) else None)
    ce = soft_cross_entropy(cfg.optim.label_smoothing)
    buf_t = B.as_tensors(buf, rt.device) if buf is not None and M.USES_BUFFER[c.method] else None
    if buf_t is not None:
        tb = M.ReplayBatches(tb, buf_t, c.replay_batch or cfg.train.batch_size)
    loss = {"naive": lambda: M.naive_loss(ce), "replay": lambda: M.replay_loss(ce),
            "lwf": lambda: M.lwf_loss(ce, teacher, k_old, rt, c.temperature, c.lwf_weight),
            "derpp": lambda: M.derpp_loss(ce, buf_t, tb.offset if buf_t is not None else 0, c.alpha, c.beta)}[c.method]()
    # An update keeps its last epoch: the validation split holds only new data, so choosing the
    # best epoch by it would favour the new classes over the old ones.
    train_cfg = dataclasses.replace(cfg.train, restore_best=False)
    n = V.next_number(run)
    new_id = f"d{len(parent.data) + 1}"

    def build(tmp: Path) -> dict:
        t0 = time.perf_counter()
        result = fit(net, tb, vb, augment, rt, cfg.optim, train_cfg, metrics_log=MetricsLog(tmp / "metrics.csv"),
                     batch_loss=loss, desc=f"[update v{n}] ")
        model_ = result.model
        gamma = H.align_weights(model_, k_old) if c.align and rec.added else None
        if c.align and not rec.added:
            _say("  weight aligning skipped: the update adds no classes (domain-incremental)")
        train_seconds = time.perf_counter() - t0
        new_buf = None
        if buf is not None:
            sp = new.splits["train"]
            herd = buf.selection == "herding"
            lg, ft = outputs(model_, sp.images, augment, rt, cfg.train.eval_batch_size, herd)
            bf = outputs(model_, buf.images, augment, rt, cfg.train.eval_batch_size, True)[1] if herd else None
            new_buf = B.update(buf, np.asarray(sp.images), sp.labels, lg, ft, capacity=c.buffer_size,
                               buffer_features=bf)
            B.save(new_buf, tmp / V.BUFFER)
        bundles = {**{j: _remap_to(b, names) for j, b in old.items()}, new_id: new}
        now = _evaluate(model_, bundles, augment, rt, cfg.train.eval_batch_size, names)
        data_recs = _data_records(parent, tmp, cfg, bundle, manifest, rec, new_id, n)
        history = [(v.number, v.record["accuracy"]) for v in V.chain(parent)]
        summary = R.summarise(history, parent_now, now, data_recs, new_id, missing)
        method_rec = {"name": c.method, "align": c.align, "weight_align_gamma": gamma,
                      **({"alpha": c.alpha, "beta": c.beta} if c.method == "derpp" else {}),
                      **({"temperature": c.temperature, "weight": c.lwf_weight} if c.method == "lwf" else {})}
        classes = {"added": rec.added, "renamed": rec.renamed, "merged": rec.merged}
        buf_info = ({"size": len(new_buf), "capacity": new_buf.capacity, "selection": new_buf.selection,
                     "per_class": new_buf.counts(), "started_from": buf_from} if new_buf is not None else None)
        info = {"version": f"v{n}", "parent": parent.name, "run": str(run), "method": method_rec,
                "classes": classes, "buffer": buf_info, "data_sets": data_recs, "train_seconds": round(train_seconds, 2),
                "accuracy": now, "parent_accuracy": parent_now}
        report = R.write(tmp, summary, info)
        out_meta = {"model": {**meta["model"], "num_classes": len(names)}, "class_names": names,
                    "input_size": meta["input_size"], "mean": meta["mean"], "std": meta["std"],
                    "config": cfg.to_dict(), "split_hash": manifest["hash"],
                    "data": {"source": bundle.name, "fingerprint": bundle.fingerprint},
                    "epoch": result.state.epoch,
                    "metrics": {k: summary[k] for k in ("top1", "old_top1", "new_top1") if summary[k] is not None},
                    "continual": {"version": n, "parent": parent.number, "lineage": parent.lineage,
                                  "method": c.method}}
        save_checkpoint(tmp / "weights" / "best", model_, out_meta)
        return {"class_names": names, "method": method_rec, "config": cfg.to_dict(), "data": data_recs,
                "images_seen": parent.record["images_seen"] + int(len(new.splits["train"].labels)),
                "metrics": {k: summary[k] for k in ("top1", "old_top1", "old_top1_before", "new_top1", "forgetting",
                                                    "backward_transfer")},
                "accuracy": now, "classes": classes, "verdict": summary["verdict"], "_report": report}

    holder = {}

    def build_and_keep(tmp: Path) -> dict:
        fields = build(tmp)
        holder["report"] = fields.pop("_report")
        return fields
    version = V.write_version(run, parent=parent, build=build_and_keep)
    _say(f"{version.record['verdict']}\nversion: {version.dir}\nreport: {version.dir / 'report.md'}")
    return UpdateRun(version, parent, net.eval(), holder["report"], cfg)


def _remap_to(bundle, names: list[str]):
    """An old bundle (labels already head rows of the parent) under the grown head's names."""
    return dataclasses.replace(bundle, class_names=list(names))


def _data_records(parent: V.Version, tmp: Path, cfg: RunConfig, bundle, manifest: dict, rec: H.Reconciled,
                  new_id: str, n: int) -> list[dict]:
    """The parent's data records (their manifests copied along) plus the new data set's."""
    from resforge.data.splits import save_manifest
    (tmp / "data").mkdir(exist_ok=True)
    out = []
    for d in parent.data:
        d = dict(d)
        if d.get("manifest"):
            name = f"data/{d['id']}.json"
            shutil.copyfile(parent.dir / d["manifest"], tmp / name)
            d["manifest"] = name
        out.append(d)
    save_manifest(tmp / "data" / f"{new_id}.json", manifest)
    data_cfg = {**cfg.to_dict()["data"], "manifest": None}
    out.append({"id": new_id, "source": str(cfg.data.source), "data": data_cfg, "fingerprint": bundle.fingerprint,
                "class_names": list(bundle.class_names), "head_index": list(rec.head_index),
                "manifest": f"data/{new_id}.json", "version": n,
                "images": {s: int(len(sp.labels)) for s, sp in bundle.splits.items()}})
    return out


def versions_table(run: str | Path) -> str:
    """The `resforge versions RUN` listing: one line per version, oldest first (RUN@vN or
    RUN/versions/vN list the run they belong to)."""
    run = V.split_model_arg(run)[0]
    numbers = V.version_numbers(run)
    if not numbers:
        if not Path(run).is_dir():
            raise FileNotFoundError(f"{run}: no such run folder")
        return f"{run} has no versions yet: `resforge update {run} --data NEW` makes v2 (and registers the run as v1)"
    vs, damaged = [], []
    for n in numbers:
        try:
            vs.append(V.load_version(V.versions_dir(run) / f"v{n}"))
        except V.VersionError as e:               # listed, not hidden: the others stay usable
            damaged.append(f"v{n}: DAMAGED, not usable: {e}")
    rows = [("version", "parent", "method", "classes", "images seen", "top1", "old", "new", "forgetting", "date")]
    for v in vs:
        m, meth = v.record["metrics"], v.record["method"]
        rows.append((v.name, f"v{v.parent}" if v.parent else "-",
                     meth["name"] + ("+align" if meth.get("align") else ""), str(len(v.class_names)),
                     str(v.record["images_seen"]), _pct(m.get("top1")), _pct(m.get("old_top1")),
                     _pct(m.get("new_top1")), _pct(m.get("forgetting")), v.record["created"].replace("T", " ")[:16]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += damaged
    if vs:
        lines.append(f"lineage {vs[0].lineage[:12]}; weights of a version: {Path(run) / 'versions' / 'vN'} "
                     f"(or {run}@vN) for eval, predict, export and serve")
    return "\n".join(lines)


def _pct(v) -> str:
    return "-" if v is None else f"{v:.4f}"
