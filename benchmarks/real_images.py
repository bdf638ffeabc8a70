#!/usr/bin/env python
"""Materialise real images as an ImageFolder-style directory for benchmarks.

Two offline sources are supported:

``photos``
    The photographs bundled inside scikit-image (``skimage.data``), written as
    ``OUT/photos/<name>.png`` (a single class).  Only images that ship inside
    the wheel are used; the ones that need ``pooch`` and a download are skipped.

``fashion-mnist``
    The Debian package ``dataset-fashion-mnist`` (gzip'ed IDX files), written
    as ``OUT/<class_name>/<index>.png`` for the first ``--limit`` images of the
    chosen split.

Examples::

    python benchmarks/real_images.py photos /tmp/real/photos
    python benchmarks/real_images.py fashion-mnist /tmp/real/fmnist --split test --limit 1000

The module can also be imported: ``load_photos()`` returns the photos as uint8
arrays and ``read_idx()`` parses an IDX file.
"""

from __future__ import annotations

import argparse
import gzip
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

# Photographs (not synthetic test patterns) that scikit-image ships inside its
# wheel.  Loaders are looked up lazily so that a missing/renamed one in another
# scikit-image version is skipped instead of breaking the whole set.
PHOTO_NAMES: tuple[str, ...] = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "rocket",
    "motorcycle_left",
    "motorcycle_right",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "moon",
    "coins",
    "clock",
    "cell",
    "brick",
    "grass",
    "gravel",
    "microaneurysms",
    "page",
    "text",
)

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "tshirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)

# Where Debian's dataset-fashion-mnist installs its files (`dpkg -L`).
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
INSTALL_HINT = (
    "Fashion-MNIST files not found. Install the Debian package:\n"
    "    sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist\n"
    f"(it puts the IDX files in {FASHION_MNIST_DEBIAN_DIR}), or point --data-dir / "
    "$FASHION_MNIST_DIR at a folder holding {files}."
)


# --------------------------------------------------------------------------- photos


def _photo_loader(name: str) -> Callable[[], np.ndarray] | None:
    """Return a zero-argument loader for ``name`` or None if this skimage lacks it."""
    import skimage.data

    if name.startswith("motorcycle_"):
        # stereo_motorcycle() returns (left, right, disparity).
        index = 0 if name.endswith("left") else 1
        return lambda: skimage.data.stereo_motorcycle()[index]
    return getattr(skimage.data, name, None)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """Convert a skimage image of any dtype to uint8 grey (H, W) or RGB (H, W, 3)."""
    from skimage.util import img_as_ubyte

    if image.dtype != np.uint8:
        image = img_as_ubyte(image)
    if image.ndim == 3 and image.shape[2] == 4:  # drop alpha
        image = image[..., :3]
    return np.ascontiguousarray(image)


def load_photos(names: tuple[str, ...] = PHOTO_NAMES, verbose: bool = False) -> dict[str, np.ndarray]:
    """Load the bundled scikit-image photos that are available offline.

    Images that need an optional download (``pooch``) or are missing from the
    installed scikit-image are skipped; set ``verbose`` to print why.
    """
    photos: dict[str, np.ndarray] = {}
    for name in names:
        loader = _photo_loader(name)
        if loader is None:
            if verbose:
                print(f"skip {name}: not in this scikit-image", file=sys.stderr)
            continue
        try:
            photos[name] = _to_uint8(loader())
        except Exception as exc:  # noqa: BLE001 - any failure just means "not offline"
            if verbose:
                print(f"skip {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return photos


def write_photos(out: Path) -> int:
    """Write the offline scikit-image photos to ``out/photos/<name>.png``."""
    from PIL import Image

    photos = load_photos(verbose=True)
    if not photos:
        raise SystemExit("no scikit-image photo could be loaded; is scikit-image installed?")
    class_dir = out / "photos"
    class_dir.mkdir(parents=True, exist_ok=True)
    for name, image in photos.items():
        Image.fromarray(image).save(class_dir / f"{name}.png")
        print(f"{class_dir / name}.png  {image.shape}")
    return len(photos)


# --------------------------------------------------------------------- fashion-mnist


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip'ed) into a numpy array.

    Format: 2 zero bytes, a dtype code, the number of dimensions, then one
    big-endian uint32 per dimension, then the data in C order (big-endian).
    """
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in dtypes:
        raise ValueError(f"{path}: not an IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=dtypes[code], offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, found {array.size} values")
    return array.reshape(shape).astype(dtypes[code].replace(">", "="))


def find_fashion_mnist(split: str, data_dir: Path | None = None) -> tuple[Path, Path]:
    """Locate the (images, labels) IDX files of ``split``; exit with install help if absent."""
    candidates = [data_dir] if data_dir else []
    if os.environ.get("FASHION_MNIST_DIR"):
        candidates.append(Path(os.environ["FASHION_MNIST_DIR"]))
    candidates.append(FASHION_MNIST_DEBIAN_DIR)
    images_name, labels_name = FASHION_MNIST_FILES[split]
    for folder in candidates:
        images, labels = folder / images_name, folder / labels_name
        if images.is_file() and labels.is_file():
            return images, labels
    raise SystemExit(INSTALL_HINT.format(files=f"{images_name} and {labels_name}"))


def write_fashion_mnist(out: Path, split: str = "test", limit: int = 1000, data_dir: Path | None = None) -> int:
    """Write the first ``limit`` images of ``split`` as ``out/<class_name>/<index>.png``."""
    from PIL import Image

    images_path, labels_path = find_fashion_mnist(split, data_dir)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise SystemExit(f"unexpected shapes: images {images.shape}, labels {labels.shape}")
    n = len(images) if limit <= 0 else min(limit, len(images))
    for name in FASHION_MNIST_CLASSES:
        (out / name).mkdir(parents=True, exist_ok=True)
    width = len(str(len(images) - 1))  # zero-pad so file order == dataset order
    for index in range(n):
        class_name = FASHION_MNIST_CLASSES[int(labels[index])]
        Image.fromarray(images[index]).save(out / class_name / f"{index:0{width}d}.png")
    counts = np.bincount(labels[:n], minlength=len(FASHION_MNIST_CLASSES))
    print(f"wrote {n} {split} images from {images_path.parent} to {out}")
    print("  " + ", ".join(f"{c}={k}" for c, k in zip(FASHION_MNIST_CLASSES, counts, strict=True)))
    return n


# ------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="source", required=True)

    p = sub.add_parser("photos", help="scikit-image's bundled photographs")
    p.add_argument("out", type=Path, help="output root (ImageFolder layout)")

    f = sub.add_parser("fashion-mnist", help="Fashion-MNIST from Debian's dataset-fashion-mnist")
    f.add_argument("out", type=Path, help="output root (ImageFolder layout)")
    f.add_argument("--split", choices=sorted(FASHION_MNIST_FILES), default="test")
    f.add_argument("--limit", type=int, default=1000, help="first N images (<=0: all)")
    f.add_argument("--data-dir", type=Path, default=None, help="folder with the *-idx?-ubyte.gz files")

    args = parser.parse_args(argv)
    if args.source == "photos":
        n = write_photos(args.out)
        print(f"wrote {n} photos to {args.out / 'photos'}")
    else:
        write_fashion_mnist(args.out, args.split, args.limit, args.data_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
