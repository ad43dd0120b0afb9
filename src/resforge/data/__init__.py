"""Data layer: decode, load, cache, split and scan image classification data.

Public API (everything returns/accepts uint8 (N, C, H, W) tensors inside a DataBundle):
    load_source(spec, ...) -> DataBundle          sources.py
    make_splits / save_manifest / load_manifest / subset   splits.py
    scan / format_scan                            scan.py
    decode_image / resize_image / ImageError      images.py
    FileImageDataset                              stream.py (streamed ImageFolder splits)
    DataLimits                                    limits.py (max classes / image side / bytes)
"""
from .cifar import download_cifar
from .images import IMAGE_EXTENSIONS, ImageError, decode_image, resize_image
from .limits import DataLimits
from .safe_pickle import UnsafePickleError, safe_load_pickle
from .scan import format_scan, scan
from .sources import DataBundle, Split, load_source
from .splits import load_manifest, make_splits, save_manifest, subset
from .stream import FileImageDataset

__all__ = [
    "DataBundle", "Split", "load_source", "download_cifar",
    "IMAGE_EXTENSIONS", "ImageError", "decode_image", "resize_image",
    "UnsafePickleError", "safe_load_pickle",
    "make_splits", "save_manifest", "load_manifest", "subset",
    "scan", "format_scan", "FileImageDataset", "DataLimits",
]
