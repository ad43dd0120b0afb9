"""Read images from files on demand (streamed ImageFolder splits) for a torch DataLoader."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import decode_image, resize_image


class FileImageDataset(Dataset):
    """files[i] -> (uint8 tensor (C, H, W), int label). Plain attributes: safe to send to workers.

    A file that cannot be decoded raises ImageError naming it (a DataLoader re-raises it in the
    main process as ImageError with the worker's traceback).
    """

    def __init__(self, files, labels, image_size, channels: int,
                 resize: str = "shorter-center-crop"):
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        self.files = [str(f) for f in files]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.channels = int(channels)
        self.resize = resize

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        arr = decode_image(self.files[i], self.channels)               # (H0, W0, C)
        arr = resize_image(arr, self.image_size, self.resize)         # (H, W, C)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))), int(self.labels[i])

    @classmethod
    def from_split(cls, bundle, split: str) -> "FileImageDataset":
        """Dataset over a streamed split of a DataBundle (load_source(..., stream=True))."""
        sp = bundle.splits[split]
        if sp.files is None:
            raise ValueError(f"split '{split}' of {bundle.name} has no file list; "
                             "it is an in-memory source, use its images array directly")
        return cls(sp.files, sp.labels, bundle.image_size, bundle.channels,
                   bundle.extra.get("resize", "shorter-center-crop"))
