"""Few-shot classes: K labelled images per new class become classifier rows of a new model version.

    resforge fewshot RUN --support DIR [--shots K] [--centre base|support|none]

DIR is an ImageFolder tree (DIR/<class>/<image>, read by data.load_source like any source, so
the same formats, limits, channel conversion and rejected-file rules apply). The backbone is
frozen; each new class c gets a prototype

    p_c = normalise(mean_i (f_i - mu))          f_i = forward_head(forward_features(x_i), pre_logits=True)

(SimpleShot's "CL2N" prototypes: centred, L2-normalised class means), and the classifier
scores a query feature f with s * p_c . (f - mu).

The head: plain rows of the existing Linear fc. A cosine classifier also divides by
||f - mu||, but that factor is the same for every class of one query, so among the new classes
the ranking is exactly the cosine classifier's; dropping it keeps the score linear in f, so the
new row is weight s * p_c and bias -s * p_c . mu (divided by the model's head_scale, if any).
The model stays the architecture it was -- same builder, same state-dict keys, a longer fc --
so the sidecar describes it completely and artifact validation, export (ONNX/TorchScript parity
checks), serve, predict, eval and `resforge update`'s head growth need no change. Old rows are
copied bit-for-bit; old-class logits are unchanged up to float rounding of the longer matmul
(tests check 1e-6). And like the old logits w_k . f + b_k, the new ones grow with the feature's
norm, which is what makes the two comparable at all; the scale s makes them so in fact.

The centre mu: by default ("base") the mean feature of the data the model was trained on (a
strided sample of <= CENTRE_IMAGES train images of every data set of the version, read through
its split manifest). It is fixed by the model, not by the support set: the support mean would
depend on which new classes happen to be added together, and for a single new class it is that
class's own mean, whose centred prototype is zero. "support" (>= 2 new classes) and "none"
(forced for heads without a bias, e.g. the fast nets, where -s p.mu has nowhere to go) exist
for comparison. The same base data is needed anyway to calibrate s.

The scale s: one number, chosen to maximise (support images classified as their new class) +
(base images whose old prediction is kept), i.e. new rows that win on their class without
stealing old images. Support scores are leave-one-out (each image against the prototype of the
other K-1) when K >= 2; with K = 1, four copies of the image shifted by ~H/16 px stand in for
unseen images (in-sample scores would be optimistic and pick too small an s: on the digits case
below, 1-shot new-class top-1 over seeds 0-2 is 30.8 / 34.6 / 27.1% with the shifted copies,
19.6 / 21.5 / 9.3% in-sample, old classes 98.4 / 96.4 / 99.2% vs 99.2 / 98.4 / 99.2%). Base images are a strided sample of the validation split (else train).
Among the maximising scales the geometric middle of the widest run is taken. The version's
metrics record the old-class top-1 on a sample of the old test split before and after the merge
(old_top1_before / old_top1), so any damage to the old classes is measured, not assumed.

Measured (ResNet-20, 3 epochs on digits 0-6 at 16 px, 99.2% test; digits 7/8/9 added from 5
images each; the whole digits test set, 10-way merged head): old classes 99.2% -> 97.2%, new
classes 54.2%, all 84.4% with centre base; centre none 75.1 / 68.2 / 73.1, centre support
79.4 / 38.3 / 67.2 -- the base centre is what keeps the new rows off the old images. Scaling
the chosen s by 0.8 / 1.25 gives 79.4 / 80.0 overall: the calibration sits at the optimum.
With --finetune-epochs 3: 98.0 / 60.7 / 86.9. In N-way episodes among new classes only
(bench/fewshot_episodes.py, akamaster CIFAR-10 ResNet-20 on 8 Imagenette classes, 600 episodes)
centring does not help -- 5-shot 51.5 +- 0.6% base vs 53.4 +- 0.7% none -- as there it only
changes the query's angle to prototypes that are all new; its job is the merged head.
"""
from __future__ import annotations

import copy
import json
import shutil
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from resforge.continual import versions as V

MAX_SHOTS = 20                 # the K the command accepts (1..MAX_SHOTS)
CENTRE_IMAGES = 2000           # base train images averaged for the centre mu
CALIBRATION_IMAGES = 1000      # base val (else train) images the scale is calibrated on
REPORT_IMAGES = 2000           # base test images old_top1 before/after is measured on
CENTRES = ("base", "support", "none")
FINETUNE_LR = 0.01             # --finetune-epochs: peak SGD rate of the head (cosine), a tenth of a from-scratch rate
FINETUNE_BATCH = 64


class FewshotError(ValueError):
    """Bad input for a few-shot update (support set, shots, class names, centre)."""


@dataclass
class FewshotResult:
    version: V.Version
    new_classes: list[str]
    scale: float
    centre: str
    metrics: dict


# ---------------------------------------------------------------- features and prototypes

@torch.no_grad()
def embed(model: nn.Module, images_u8, mean, std, batch_size: int = 256,
          device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, C, H, W) -> (pooled features (N, D), logits (N, K)), fp32 on CPU, eval mode."""
    model.eval()
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    feats, logits = [], []
    for i in range(0, len(images_u8), batch_size):
        x = torch.from_numpy(np.array(images_u8[i:i + batch_size])).to(device)   # a copy: memmaps are read-only
        x = (x.float() / 255 - m) / s                       # as Augmenter.eval_view
        fmap = model.forward_features(x)
        feats.append(model.forward_head(fmap, pre_logits=True).float().cpu())
        logits.append(model.forward_head(fmap).float().cpu())
    if not feats:
        return torch.empty(0, getattr(model, "num_features", 0)), torch.empty(0, 0)
    return torch.cat(feats), torch.cat(logits)


def prototypes(feats: torch.Tensor, labels, k: int, centre: torch.Tensor) -> torch.Tensor:
    """(k, D) rows: L2-normalised means of (feats - centre) per class 0..k-1 (float64 sums)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    f = feats.double() - centre.double()
    rows = torch.stack([f[labels == c].mean(0) for c in range(k)])
    return nn.functional.normalize(rows, dim=1).float()


def scores(feats: torch.Tensor, protos: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """(N, k) unscaled prototype scores p_c . (f - mu)."""
    return (feats - centre) @ protos.T


def loo_own_scores(feats: torch.Tensor, labels, k: int, centre: torch.Tensor) -> torch.Tensor:
    """(N,) score of each support image against its class prototype computed without it (the
    class needs >= 2 images; a class of one keeps its in-sample score)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    f = feats.double() - centre.double()
    sums = torch.stack([f[labels == c].sum(0) for c in range(k)])
    counts = torch.bincount(labels, minlength=k).double()
    own_sum, own_n = sums[labels], counts[labels]
    rest = torch.where((own_n > 1)[:, None], own_sum - f, own_sum)
    p = nn.functional.normalize(rest, dim=1)
    return (p * f).sum(1).float()


MAX_OLD_DROP = 0.05      # calibrate_scale: largest loss of base images kept, as a fraction


def calibrate_scale(old_sup: torch.Tensor, z_sup: torch.Tensor, y_sup, old_base: torch.Tensor,
                    z_base: torch.Tensor, own_sup: torch.Tensor | None = None,
                    grid: int = 400) -> tuple[float, dict]:
    """The scale s of the new rows (module docstring): maximise the fraction of support images
    whose new-class logit s*z beats every old logit and every other new class, plus the fraction
    of base images whose old top logit stays above every s*z, among the scales that keep base
    images within MAX_OLD_DROP of the most any scale keeps. Logits are final (after any
    head_scale). own_sup: leave-one-out own-class scores (default: in-sample)."""
    y = torch.as_tensor(y_sup, dtype=torch.long)
    rows = torch.arange(len(y))
    own = z_sup[rows, y] if own_sup is None else own_sup
    others = z_sup.clone()
    others[rows, y] = -float("inf")
    own_top = own >= others.max(1).values if z_sup.shape[1] > 1 else torch.ones(len(y), dtype=torch.bool)
    m_sup, m_base = old_sup.max(1).values, old_base.max(1).values
    z_base_max = z_base.max(1).values
    thr = torch.cat([(m_sup / own)[own > 0], (m_base / z_base_max)[z_base_max > 0]])
    thr = thr[thr > 0]
    lo, hi = (float(thr.min()) / 4, float(thr.max()) * 4) if len(thr) else (1e-3, 1e3)
    s = torch.logspace(np.log10(lo), np.log10(hi), grid, dtype=torch.float64)
    sup_ok = ((s[:, None] * own[None].double() > m_sup[None].double()) & own_top[None]).double().mean(1)
    base_kept = (s[:, None] * z_base_max[None].double() <= m_base[None].double()).double().mean(1)
    # Adding classes must not cost the old ones more than MAX_OLD_DROP of the base images the smallest
    # scales keep: the sum alone traded them 1:1 against support images (15 of them against ~100 base
    # images: ResNet-20 on digits 0-6 in fp32 lost 12 points of old-class test top-1, 91.7 -> 79.8%).
    feasible = base_kept >= base_kept.max() - MAX_OLD_DROP
    objective = torch.where(feasible, sup_ok + base_kept, torch.full_like(sup_ok, -1.0))
    best = objective.max()
    run_lo, run_len, i = 0, 0, 0
    hit = (objective >= best - 1e-12).tolist()
    while i < grid:                       # the widest run of maximising grid points
        if hit[i]:
            j = i
            while j + 1 < grid and hit[j + 1]:
                j += 1
            if j - i + 1 > run_len:
                run_lo, run_len = i, j - i + 1
            i = j + 1
        else:
            i += 1
    chosen = float(torch.sqrt(s[run_lo] * s[run_lo + run_len - 1]))
    k = int(torch.searchsorted(s, torch.tensor([chosen], dtype=torch.float64)).clamp(max=grid - 1))
    return chosen, {"support_ok": float(sup_ok[k]), "base_kept": float(base_kept[k])}


def shifted_views(images: np.ndarray) -> np.ndarray:
    """uint8 (n, C, H, W) -> (4n, C, H, W): each image shifted by ~H/16 px (>= 1) left, right, up
    and down, edges replicated -- stand-ins for unseen images of a class given by one image."""
    d = max(1, round(images.shape[2] / 16))
    p = np.pad(images, ((0, 0), (0, 0), (d, d), (d, d)), mode="edge")
    h, w = images.shape[2:]
    crops = [(d, 0), (d, 2 * d), (0, d), (2 * d, d)]                   # (top, left) of each view
    return np.concatenate([p[:, :, t:t + h, l:l + w] for t, l in crops])


def merge_rows(model: nn.Module, protos: torch.Tensor, centre: torch.Tensor, scale: float) -> nn.Module:
    """A copy of `model` whose fc has k more rows: weight s*p_c, bias -s*p_c.mu (both divided by
    head_scale, so the final logit is s * p_c . (f - mu)); old rows copied unchanged."""
    fc = model.fc
    if not isinstance(fc, nn.Linear):
        raise FewshotError(f"{type(model).__name__} has no Linear classifier (fc) to add rows to")
    g = float(getattr(model, "head_scale", 1.0))
    out = copy.deepcopy(model)
    k_old, d = fc.weight.shape
    new = nn.Linear(d, k_old + len(protos), bias=fc.bias is not None,
                    device=fc.weight.device, dtype=fc.weight.dtype)
    with torch.no_grad():
        new.weight[:k_old] = fc.weight
        new.weight[k_old:] = (scale * protos / g).to(new.weight)
        if fc.bias is not None:
            new.bias[:k_old] = fc.bias
            new.bias[k_old:] = (-scale * (protos.double() @ centre.double()) / g).to(new.bias)
        elif bool(centre.abs().max() > 0):
            raise FewshotError("a classifier without a bias cannot hold a centred prototype: use centre none")
    out.fc = new
    out.num_classes = k_old + len(protos)
    if isinstance(getattr(out, "default_cfg", None), dict):
        out.default_cfg = {**out.default_cfg, "num_classes": out.num_classes}
    return out


# ---------------------------------------------------------------- data

def load_support(path: str | Path, meta: dict, shots: int, old_names: list[str], seed: int = 0):
    """The support folder at the model's input size and channels -> (images u8 (n, C, H, W),
    labels (n,), class names, bundle, ids used): `shots` images per class, chosen by a seeded
    permutation of each class's images. Every refusal is one FewshotError sentence."""
    from resforge.data import load_source
    if not 1 <= shots <= MAX_SHOTS:
        raise FewshotError(f"--shots {shots} is outside 1..{MAX_SHOTS}: few-shot classes take 1 to "
                           f"{MAX_SHOTS} images each (use `resforge update` for more)")
    root = Path(path)
    if not root.is_dir():
        raise FewshotError(f"support folder {root} does not exist: pass a folder with one sub-folder "
                           "of images per new class (DIR/<class>/<image>)")
    if not any(p for p in root.iterdir() if not p.name.startswith(".")):
        raise FewshotError(f"support folder {root} is empty: put one sub-folder of images per new class "
                           f"in it (DIR/<class>/<image>, {shots} or more images each)")
    c, h, w = (int(v) for v in meta["input_size"])
    bundle = load_source(root, image_size=(h, w), channels=c, min_classes=1)
    clash = [n for n in bundle.class_names if n in old_names]
    if clash:
        raise FewshotError(f"class {clash[0]!r} of {root} is already one of the model's classes: rename its "
                           f"folder (e.g. {clash[0] + '_new'!r}), or use `resforge update` to add images "
                           "to an existing class")
    images = np.concatenate([np.asarray(sp.images) for sp in bundle.splits.values() if len(sp.labels)])
    labels = np.concatenate([sp.labels for sp in bundle.splits.values() if len(sp.labels)])
    ids = [i for sp in bundle.splits.values() for i in sp.ids]
    rng = np.random.default_rng(seed)
    keep = []
    for k, name in enumerate(bundle.class_names):
        idx = np.flatnonzero(labels == k)
        if len(idx) < shots:
            raise FewshotError(f"class {name!r} has {len(idx)} image{'s' * (len(idx) != 1)} in {root}, "
                               f"--shots {shots} needs {shots}: add images or lower --shots")
        keep.append(np.sort(rng.permutation(idx)[:shots]))
    keep = np.concatenate(keep)
    return images[keep], labels[keep], list(bundle.class_names), bundle, [ids[i] for i in keep]


def base_samples(version: V.Version, meta: dict, data_root=None) -> dict:
    """{"train", "calib", "test": (images u8, labels in head rows), "test_ids": data id per test
    image} strided samples of every data set of the version (read through their split manifests); a data set that cannot be read is
    skipped with a warning, none readable is a FewshotError."""
    from resforge.pipeline import prepare_data
    from resforge.config import load_config
    from resforge.data import load_manifest
    c, h, w = (int(v) for v in meta["input_size"])
    parts = {"train": [], "calib": [], "test": []}
    failures = []
    for entry in version.data:
        try:
            cfg = load_config(None, base={"data": entry.get("data") or {"source": entry["source"]}})
            cfg = replace(cfg, data=replace(cfg.data, data_root=data_root, download=False, cache_dir=None,
                                            manifest=None))
            man = load_manifest(version.dir / entry["manifest"]) if entry.get("manifest") else None
            with warnings.catch_warnings():   # a support manifest lists only the K images used per class
                warnings.filterwarnings("ignore", message=".*are not in the split manifest")
                bundle, _ = prepare_data(cfg, man)
        except (ValueError, OSError) as e:
            failures.append(f"{entry['source']} ({str(e).splitlines()[0][:160]})")
            continue
        rows = np.asarray(entry["head_index"], np.int64)
        calib = "val" if len(bundle.splits.get("val", bundle.splits["train"]).labels) else "train"
        for key, split, n in (("train", "train", CENTRE_IMAGES), ("calib", calib, CALIBRATION_IMAGES),
                              ("test", "test", REPORT_IMAGES)):
            sp = bundle.splits.get(split)
            if sp is None or not len(sp.labels):
                continue
            idx = np.unique(np.linspace(0, len(sp.labels) - 1, num=min(n, len(sp.labels))).astype(np.int64))
            parts[key].append((_images(sp, idx, bundle, (h, w), c), rows[sp.labels[idx]], entry["id"]))
    if not parts["train"]:
        raise FewshotError(f"none of the data the model was trained on could be read ({'; '.join(failures)}), "
                           "and it is needed to centre and calibrate the new rows: make it available again "
                           "(--data-root DIR for named sets)")
    for f in failures:
        warnings.warn(f"few-shot: data set {f} skipped for centring and calibration")
    out = {k: (np.concatenate([a for a, _, _ in v]), np.concatenate([b for _, b, _ in v])) if v else None
           for k, v in parts.items()}
    out["test_ids"] = np.concatenate([[d] * len(b) for _, b, d in parts["test"]]) if parts["test"] else None
    return out


def _images(sp, idx, bundle, size, channels) -> np.ndarray:
    """uint8 (n, C, H, W) of a split's items `idx` at the model's size and channels (streamed
    splits are decoded here)."""
    if sp.images is not None:
        from resforge.data.sources import conform_images
        return conform_images(np.asarray(sp.images[idx]), channels, size, bundle.extra.get("resize",
                                                                                         "shorter-center-crop"))
    from resforge.data.images import decode_image, resize_image
    mode = bundle.extra.get("resize", "shorter-center-crop")
    return np.stack([resize_image(decode_image(Path(sp.files[i]), channels), size, mode).transpose(2, 0, 1)
                     for i in idx])


# ---------------------------------------------------------------- the command

def fewshot(model: str | Path, support: str | Path, *, shots: int = 5, centre: str | None = None,
            seed: int = 0, data_root=None, device: str = "cpu", finetune_epochs: int = 0,
            say=print) -> FewshotResult:
    """Add the classes of `support` to MODEL (run folder, RUN@vN or RUN/versions/vN) as prototype
    rows; writes and returns the new version (the parent, and every other version, untouched).
    centre: "base" (default where the head has a bias), "support" or "none" (module docstring).
    finetune_epochs > 0: then train the head (finetune_head) for that many epochs."""
    from resforge.checkpoint import load_for_inference, read_meta, save_checkpoint
    from resforge.training.device import select_device
    if not (isinstance(finetune_epochs, int) and 0 <= finetune_epochs <= 100):
        raise FewshotError(f"--finetune-epochs {finetune_epochs!r} must be a whole number in 0..100")
    if centre is not None and centre not in CENTRES:
        raise FewshotError(f"--centre {centre!r} is not one of {', '.join(CENTRES)}")
    run, parent = V.resolve_model(model)
    meta = read_meta(parent.weights if parent is not None else run / V.WEIGHTS)   # verified, cheap
    if not meta:
        raise FewshotError(f"{run} has no resforge sidecar beside its weights: only resforge runs take new classes")
    old_names = list(meta["class_names"])
    # the support set is checked before anything is written or the model is built
    images, labels, new_names, bundle, ids = load_support(support, meta, shots, old_names, seed)
    if parent is None:
        parent = V.register_root(run)
        say(f"registered {run} as version v1")
    dev = select_device(device)
    net, meta = load_for_inference(parent.weights, device=dev)
    has_bias = isinstance(net.fc, nn.Linear) and net.fc.bias is not None
    centre = centre or ("base" if has_bias else "none")
    if centre != "none" and not has_bias:
        raise FewshotError(f"the {meta['model']['name']} classifier has no bias, so a centred prototype cannot "
                           "be folded into it: pass --centre none")
    if centre == "support" and len(new_names) < 2:
        raise FewshotError(f"--centre support needs at least 2 new classes ({support} has only "
                           f"{new_names[0]!r}: its centred prototype would be zero); use --centre base")
    base = base_samples(parent, meta, data_root)
    g = float(getattr(net, "head_scale", 1.0))
    emb = lambda x: embed(net, x, meta["mean"], meta["std"], device=dev)  # noqa: E731
    f_sup, old_sup = emb(images)
    f_train, _ = emb(base["train"][0])
    mu = {"base": f_train.mean(0), "support": f_sup.mean(0),
          "none": torch.zeros(f_sup.shape[1])}[centre]
    k = len(new_names)
    protos = prototypes(f_sup, labels, k, mu)
    calib = base["calib"] or base["train"]
    f_cal, old_cal = emb(calib[0])
    if shots >= 2:
        scale, fit = calibrate_scale(old_sup, scores(f_sup, protos, mu), labels, old_cal, scores(f_cal, protos, mu),
                                     loo_own_scores(f_sup, labels, k, mu))
    else:                     # one image per class: its shifted copies stand in for unseen images
        views = shifted_views(images)
        f_view, old_view = emb(views)
        scale, fit = calibrate_scale(old_view, scores(f_view, protos, mu), np.tile(labels, len(views) // len(labels)),
                                     old_cal, scores(f_cal, protos, mu))
    merged = merge_rows(net, protos, mu, scale)
    if finetune_epochs:
        cfg = parent.record.get("config") or meta.get("config") or {}
        merged = finetune_head(merged, images, labels + len(old_names), base["train"], meta, cfg,
                               finetune_epochs, device, seed)
    names = old_names + new_names
    metrics, accuracy = _measure(merged, g, f_sup, labels, len(old_names), base, emb, scale, fit, names)
    say(f"{k} new class{'es' * (k != 1)} ({', '.join(new_names)}) from {shots} image{'s' * (shots != 1)} each; "
        f"centre {centre}, scale {scale:.4g}; old-class top-1 {_pct(metrics.get('old_top1_before'))} -> "
        f"{_pct(metrics.get('old_top1'))}; support top-1 {_pct(metrics['support_top1'])}")
    if metrics["support_top1"] < 0.5:
        say(f"WARNING: only {_pct(metrics['support_top1'])} of the support images are predicted as their class: "
            "the frozen features barely tell the new classes from the old ones, so the calibration kept the new "
            "rows weak to protect the old classes; try more --shots, --finetune-epochs, or `resforge update`")
    n = (V.version_numbers(run) or [0])[-1] + 1
    entry = {"id": f"d{len(parent.data) + 1}", "source": str(support),
             "data": {"source": str(support), "channels": bundle.channels,
                      **({"image_size": bundle.image_size[0]} if len(set(bundle.image_size)) == 1 else {})},
             "fingerprint": bundle.fingerprint, "class_names": new_names,
             "head_index": list(range(len(old_names), len(names))), "manifest": None,
             "images": {"train": int(len(labels))}, "version": n}
    method = {"name": "fewshot", "shots": shots, "centre": centre, "scale": scale, "seed": seed,
              "new_classes": new_names, "finetune_epochs": finetune_epochs,
              **({"finetune": {"lr": FINETUNE_LR, "schedule": "cosine", "trains": "fc", "bn": "frozen"}}
                 if finetune_epochs else {})}
    side = {key: v for key, v in read_meta(parent.weights).items()
            if key not in ("format", "format_version", "resforge_version", "weights_sha256", "output")}
    side.update(model={**side["model"], "num_classes": len(names)}, class_names=names,
                continual={"method": "fewshot", "version": n, "parent": parent.number, "shots": shots,
                           "centre": centre, "scale": scale, "new_classes": new_names})

    def build(tmp: Path) -> dict:
        save_checkpoint(tmp / "weights" / "best", merged.cpu(), side)
        (tmp / "data").mkdir()
        for d in parent.data:                      # every earlier data set's manifest travels along
            if d.get("manifest"):
                shutil.copyfile(parent.dir / d["manifest"], tmp / d["manifest"])
        _save_support_manifest(tmp / "data" / f"{entry['id']}.json", bundle, ids, seed)
        entry["manifest"] = f"data/{entry['id']}.json"
        (tmp / "report.json").write_text(json.dumps({"method": method, "metrics": metrics}, indent=1))
        return {"class_names": names, "method": method, "config": parent.record.get("config", {}),
                "data": [*parent.data, entry], "images_seen": parent.record["images_seen"] + len(labels),
                "metrics": metrics, "accuracy": accuracy}
    version = V.write_version(run, parent=parent, build=build)
    say(f"version {version.name}: {version.dir}  (use it as {run}@{version.name})")
    return FewshotResult(version, new_names, scale, centre, version.record["metrics"])


def finetune_head(model: nn.Module, images, labels, base_train, meta: dict, cfg_dict: dict, epochs: int,
                  device: str, seed: int) -> nn.Module:
    """Train only the fc of the merged model (backbone frozen, every BatchNorm locked in eval mode,
    so the features -- and the old logits' inputs -- do not move) for `epochs` through the training
    loop, on the support images (repeated to the base sample's mean images per class, so K images
    are not drowned by the old classes) plus the base train sample, with the parent's augmentation
    and label smoothing. Old rows move too: that is what fine-tuning is for; the version's metrics
    measure old_top1 after it. Raises FewshotError if anything outside fc changed."""
    from resforge.config import load_config
    from resforge.data.augment import Augmenter
    from resforge.data.loader import make_batches
    from resforge.data.sources import DataBundle, Split
    from resforge.finetune.policies import changed, frozen_snapshot, release, set_bn_locked
    from resforge.training.device import make_runtime
    from resforge.training.loop import fit
    cfg = load_config(None, base={k: v for k, v in cfg_dict.items() if k in ("aug", "optim")})
    base_x, base_y = base_train
    per_class = len(base_y) / max(1, len(np.unique(base_y)))
    reps = max(1, round(per_class / max(1, np.bincount(labels).max())))
    x = np.concatenate([base_x, *[images] * reps])
    y = np.concatenate([base_y, *[labels] * reps]).astype(np.int64)
    k = model.fc.out_features
    bundle = DataBundle(name="fewshot-finetune", class_names=[str(i) for i in range(k)],
                        splits={"train": Split(labels=y, images=x, files=None, ids=[str(i) for i in range(len(y))])},
                        channels=x.shape[1], image_size=tuple(x.shape[2:]), fingerprint="", rejected=[])
    rt = make_runtime(device, "fp32", False)
    model = model.to(rt.device)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("fc."))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            set_bn_locked(m, True)
    keep = frozen_snapshot(model)
    optim = replace(cfg.optim, lr=FINETUNE_LR, schedule="cosine", warmup_epochs=0.0, full_lr_steps=0, clip_grad=None)
    train = replace(cfg.train, epochs=epochs, batch_size=min(FINETUNE_BATCH, len(y)), seed=seed, ema=None,
                    lookahead_every=None, max_seconds=None, fit_budget=False, bn_recalibrate="never",
                    restore_best=False, progress=False, patience=None, eval_train=0, grad_norms=False)
    augment = Augmenter(cfg.aug, meta["mean"], meta["std"], k, tuple(x.shape[2:]), seed=seed)
    batches = make_batches(bundle, "train", rt.device, train.batch_size, train=True, workers=0)
    result = fit(model, batches, None, augment, rt, optim, train, desc="few-shot head: ")
    moved = changed(result.model, keep)
    release(result.model)
    if moved:
        raise FewshotError(f"fine-tuning the head changed {moved[0]} outside fc; nothing was written")
    return result.model.cpu().eval()


def _measure(merged, g, f_sup, y_sup, k_old, base, emb, scale, fit, names) -> tuple[dict, dict]:
    """(metrics, accuracy): support top-1 of the merged head (in-sample; support_top1_heldout: on
    the calibration's stand-ins for unseen images, leave-one-out or shifted copies), old-class top-1 on the
    base test sample before and after the merge (overall and per data set: {id: {top1, n,
    per_class}}), the share of old test images now predicted as a new class, and the
    calibration's own figures."""
    with torch.no_grad():
        sup_pred = (merged.fc(f_sup) * g).argmax(1)
    metrics = {"support_top1": float((sup_pred == torch.as_tensor(y_sup) + k_old).double().mean()),
               "support_top1_heldout": fit["support_ok"], "calibration_old_kept": fit["base_kept"], "scale": scale}
    if base["test"] is None:
        return metrics, {}
    f_test, old_test = emb(base["test"][0])
    y = torch.as_tensor(base["test"][1])
    with torch.no_grad():
        after = (merged.fc(f_test) * g).argmax(1)
    metrics["old_top1_before"] = float((old_test.argmax(1) == y).double().mean())
    metrics["old_top1"] = float((after == y).double().mean())
    metrics["old_moved_to_new"] = float((after >= k_old).double().mean())
    accuracy = {}
    for d in dict.fromkeys(base["test_ids"].tolist()):
        sel = torch.as_tensor(base["test_ids"] == d)
        ok, yd = (after == y)[sel], y[sel]
        accuracy[d] = {"top1": float(ok.double().mean()), "n": int(sel.sum()),
                       "per_class": {names[c]: float(ok[yd == c].double().mean()) for c in yd.unique().tolist()}}
    return metrics, accuracy


def _save_support_manifest(path: Path, bundle, ids: list[str], seed: int) -> None:
    from resforge.data.splits import manifest_hash, save_manifest
    splits = {"train": list(ids), "val": [], "test": []}
    save_manifest(path, {"source": bundle.name, "fingerprint": bundle.fingerprint, "seed": seed,
                         "val_fraction": None, "splits": splits, "hash": manifest_hash(splits)})


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"
