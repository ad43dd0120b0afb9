"""Training throughput: resforge's pipeline against a plain PyTorch reference, in one process.

resforge: the split as one uint8 tensor, batch-wide augmentation (flip + 4-px translate),
          channels_last, bf16 autocast where the CPU has native bf16 (else fp32), resforge's
          train_one_epoch.
reference: the usual per-image Dataset (numpy -> float tensor, random crop + flip per image)
          + DataLoader, fp32, NCHW, a textbook training step.
Both train the same architecture with SGD at the same batch size on the same CIFAR-10 images;
the ratio is what matters (this machine is noisy), so the two are interleaved over rounds.

    python bench/train_speed.py --data ../shared/data/cifar-10-binary.tar.xz [--steps 30] [--rounds 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from resforge.config import AugConfig, OptimConfig
from resforge.data import load_source
from resforge.data.augment import Augmenter
from resforge.data.loader import TensorBatches
from resforge.models import create_model
from resforge.training.device import make_runtime
from resforge.training.loop import FitState, Updater, soft_cross_entropy, train_one_epoch
from resforge.training.optim import build_optimizer, build_scheduler

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class PerImageCifar(Dataset):
    """What most CIFAR scripts do: per-image conversion, crop and flip in Python."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = torch.from_numpy(np.array(self.images[i])).float() / 255        # (3, 32, 32)
        x = (x - self.mean) / self.std
        x = F.pad(x, (4, 4, 4, 4))
        dy, dx = np.random.randint(0, 9, 2)
        x = x[:, dy:dy + 32, dx:dx + 32]
        if np.random.rand() < 0.5:
            x = x.flip(2)
        return x, int(self.labels[i])


def reference_images_per_s(arch: str, images, labels, steps: int, batch: int) -> float:
    model = create_model(arch, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loader = DataLoader(PerImageCifar(images, labels), batch_size=batch, shuffle=True, drop_last=True)
    model.train()
    seen, t0 = 0, None
    for i, (x, y) in enumerate(loader):
        if i == 2:                                   # two warm-up steps excluded
            seen, t0 = 0, time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(y)
        if i + 1 == steps + 2:
            break
    return seen / (time.perf_counter() - t0)


def resforge_images_per_s(arch: str, images, labels, steps: int, batch: int) -> tuple[float, str]:
    rt = make_runtime("auto", "auto", True)
    model = create_model(arch, num_classes=10).to(rt.device, memory_format=torch.channels_last)
    n = (steps + 2) * batch
    batches = TensorBatches(images[:n], labels[:n], rt.device, batch, shuffle=True, drop_last=True)
    augment = Augmenter(AugConfig(flip="random", translate=4), MEAN, STD, 10, (32, 32))
    ocfg = OptimConfig(lr=0.05, schedule="constant")
    opt = build_optimizer(model.parameters(), ocfg)
    sched = build_scheduler(opt, ocfg, 1, len(batches))
    warm = TensorBatches(images[:2 * batch], labels[:2 * batch], rt.device, batch, shuffle=True, drop_last=True)
    kw = dict(epoch=0, seed=0, state=FitState(), progress=False)
    updater = Updater(opt, sched)
    train_one_epoch(model, warm, augment, updater, rt, soft_cross_entropy(0.0), **kw)
    stats = train_one_epoch(model, batches, augment, updater, rt, soft_cross_entropy(0.0), **kw)
    return stats["images"] / stats["seconds"], rt.describe()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="CIFAR-10 archive or folder")
    ap.add_argument("--archs", default="resnet20,resnet18")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions (median reported)")
    a = ap.parse_args()
    torch.manual_seed(0)
    np.random.seed(0)
    train = load_source(a.data).splits["train"]
    images, labels = np.asarray(train.images), np.asarray(train.labels)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {a.batch}, "
          f"{a.steps} timed steps x {a.rounds} rounds")
    print(f"{'model':<10} {'reference img/s':>16} {'resforge img/s':>15} {'ratio':>7}  resforge runtime")
    for arch in a.archs.split(","):
        ref, ours, desc = [], [], ""
        for _ in range(a.rounds):
            ref.append(reference_images_per_s(arch, images, labels, a.steps, a.batch))
            r, desc = resforge_images_per_s(arch, images, labels, a.steps, a.batch)
            ours.append(r)
        r_ref, r_ours = statistics.median(ref), statistics.median(ours)
        print(f"{arch:<10} {r_ref:>16.0f} {r_ours:>15.0f} {r_ours / r_ref:>6.2f}x  {desc}")


if __name__ == "__main__":
    main()
