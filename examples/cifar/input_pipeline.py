"""CIFAR-10 in its canonical python-pickle layout, with augmentation done in JAX on the device.

Where the data is looked for, in order:

1. ``data_dir`` (the ``--config.data_dir`` flag), if given;
2. the environment variable ``NORMZOO_DATA``;
3. the cache directory ``~/.cache/normzoo`` (override with ``NORMZOO_CACHE``), where the
   official ``cifar-10-python.tar.gz`` is downloaded when missing and its md5 verified
   before it is extracted.

Each of these may point at ``cifar-10-batches-py/`` itself or at the folder that holds it.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
META_FILE = "batches.meta"
IMAGES_PER_FILE = 10000

# Per-channel mean and std of the CIFAR-10 training images, in [0, 1] units.
MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
STD = np.array([0.2470, 0.2435, 0.2616], np.float32)


class DataError(RuntimeError):
    """CIFAR-10 could not be found or read; the message says where we looked and what to do."""


@dataclass
class Cifar10:
    train_images: np.ndarray  # (N, 32, 32, 3) uint8
    train_labels: np.ndarray  # (N,) int32
    test_images: np.ndarray
    test_labels: np.ndarray
    label_names: list[str]
    source: Path


def _candidates(data_dir: str | None) -> list[tuple[str, Path]]:
    out = []
    if data_dir:
        out.append(("--config.data_dir", Path(data_dir).expanduser()))
    if os.environ.get("NORMZOO_DATA"):
        out.append(("$NORMZOO_DATA", Path(os.environ["NORMZOO_DATA"]).expanduser()))
    out.append(("cache", cache_dir()))
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("NORMZOO_CACHE", "~/.cache/normzoo")).expanduser()


def _resolve(path: Path) -> Path:
    return path if path.name == FOLDER or (path / META_FILE).exists() else path / FOLDER


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(dest: Path, url: str = URL, md5: str = MD5) -> Path:
    """Downloads the archive into ``dest``, verifies its md5, extracts it; returns the folder."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / "cifar-10-python.tar.gz"
    if not archive.exists() or md5sum(archive) != md5:
        fd, tmp = tempfile.mkstemp(dir=dest, suffix=".part")
        os.close(fd)
        try:
            with urllib.request.urlopen(url) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
        except OSError as e:
            os.unlink(tmp)
            raise DataError(
                f"could not download CIFAR-10 from {url} ({e}). Download "
                f"cifar-10-python.tar.gz by hand and extract it into {dest}, or point "
                "--config.data_dir / $NORMZOO_DATA at an existing cifar-10-batches-py folder."
            ) from None
        got = md5sum(Path(tmp))
        if got != md5:
            os.unlink(tmp)
            raise DataError(
                f"the download from {url} has md5 {got}, expected {md5}: the file is corrupt or "
                "not CIFAR-10. Nothing was extracted; try again, or download it by hand."
            )
        os.replace(tmp, archive)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(dest, filter="data")
    return dest / FOLDER


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        data = np.asarray(d[b"data"], np.uint8)
        labels = np.asarray(d[b"labels"], np.int32)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated or corrupt pickle, wrong content
        raise DataError(
            f"{path} is not a readable CIFAR-10 batch ({type(e).__name__}: {e}). The file is "
            "truncated or corrupt: delete the folder and download cifar-10-python.tar.gz again."
        ) from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(
            f"{path} holds data of shape {data.shape} with {len(labels)} labels; a CIFAR-10 "
            "batch holds (N, 3072) uint8 images and N labels. Re-download the data."
        )
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def load(data_dir: str | None = None, *, allow_download: bool = True, expected_per_file: int | None = IMAGES_PER_FILE) -> Cifar10:
    """Loads CIFAR-10 from the first place that has it (see the module docstring).

    Args:
      data_dir: explicit location (highest priority).
      allow_download: download into the cache when no location has the data.
      expected_per_file: images each batch file must hold (None: any); catches partial data.

    Raises:
      DataError: nothing found (the message lists every place looked in), or a file is
        missing, truncated or corrupt.
    """
    looked = []
    for origin, base in _candidates(data_dir):
        folder = _resolve(base)
        looked.append(f"{origin}: {folder}")
        if (folder / META_FILE).exists() or any((folder / f).exists() for f in TRAIN_FILES):
            return _load_folder(folder, expected_per_file)
    if allow_download:
        return _load_folder(download(cache_dir()), expected_per_file)
    raise DataError(
        "CIFAR-10 was not found. Looked in:\n  " + "\n  ".join(looked) + "\nFix: pass "
        "--config.data_dir=/path/to/cifar-10-batches-py, set NORMZOO_DATA, or allow the "
        f"download into {cache_dir()}."
    )


def _load_folder(folder: Path, expected_per_file: int | None) -> Cifar10:
    missing = [f for f in TRAIN_FILES + TEST_FILES + [META_FILE] if not (folder / f).exists()]
    if missing:
        raise DataError(
            f"{folder} is missing {', '.join(missing)}; a complete cifar-10-batches-py folder has "
            f"{', '.join(TRAIN_FILES + TEST_FILES + [META_FILE])}. Re-extract cifar-10-python.tar.gz."
        )
    parts = {}
    for name in TRAIN_FILES + TEST_FILES:
        imgs, labels = _read_batch(folder / name)
        if expected_per_file is not None and len(imgs) != expected_per_file:
            raise DataError(
                f"{folder / name} holds {len(imgs)} images, expected {expected_per_file}: the data "
                "is partial. Re-download cifar-10-python.tar.gz."
            )
        parts[name] = (imgs, labels)
    try:
        with open(folder / META_FILE, "rb") as f:
            meta = pickle.load(f, encoding="bytes")
        names = [n.decode() for n in meta[b"label_names"]]
    except Exception as e:
        raise DataError(f"{folder / META_FILE} is unreadable ({type(e).__name__}: {e}); re-download the data.") from None
    return Cifar10(
        train_images=np.concatenate([parts[n][0] for n in TRAIN_FILES]),
        train_labels=np.concatenate([parts[n][1] for n in TRAIN_FILES]),
        test_images=parts["test_batch"][0],
        test_labels=parts["test_batch"][1],
        label_names=names,
        source=folder,
    )


def write_fake(folder: Path, per_file: int = 20, seed: int = 0) -> Path:
    """Writes a tiny dataset in the canonical format (for tests and dry runs)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in TRAIN_FILES + TEST_FILES:
        labels = rng.integers(0, 10, per_file)
        # Class-dependent colour so that a model can learn something from the fake data.
        imgs = rng.integers(0, 64, (per_file, 3, 32, 32)) + (labels * 19)[:, None, None, None]
        d = {b"batch_label": name.encode(), b"labels": labels.tolist(),
             b"data": imgs.astype(np.uint8).reshape(per_file, 3072), b"filenames": [b"x.png"] * per_file}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f)
    with open(folder / META_FILE, "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072,
                     b"num_cases_per_batch": per_file}, f)
    return folder


def standardize(images: jax.Array) -> jax.Array:
    """uint8 NHWC -> float32, per-channel standardized with the training-set statistics."""
    return (images.astype(jnp.float32) / 255.0 - MEAN) / STD


def augment(key: jax.Array, images: jax.Array, mode: str = "crop_flip", pad: int = 4) -> jax.Array:
    """CIFAR augmentation on the device, reproducible from ``key``.

    ``mode``: ``"crop_flip"`` (the standard: zero-pad by ``pad``, random 32x32 crop, random
    horizontal flip), ``"flip"`` (flips only, better for very short schedules) or ``"none"``.
    Works on uint8 or float NHWC batches.
    """
    if mode not in ("crop_flip", "flip", "none"):
        raise ValueError(f"augment mode {mode!r} is not one of 'crop_flip', 'flip', 'none'.")
    if mode == "none":
        return images
    n, h, w, _ = images.shape
    k_crop, k_flip = jax.random.split(key)
    out = images
    if mode == "crop_flip":
        padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        offsets = jax.random.randint(k_crop, (n, 2), 0, 2 * pad + 1)
        crop = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1])))
        out = crop(padded, offsets)
    flip = jax.random.bernoulli(k_flip, 0.5, (n,))
    return jnp.where(flip[:, None, None, None], out[:, :, ::-1], out)
