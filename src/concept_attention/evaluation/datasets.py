"""Loaders for the zero-shot segmentation benchmarks, reading the data sets' own formats.

Every loader is a sized, indexable, iterable sequence of :class:`SegmentationSample` and
accepts ``limit`` and a shard selection ``(shard_index, num_shards)``:

* ``limit`` keeps the first ``limit`` samples (after any split filtering), **then**
* sharding keeps positions ``shard_index, shard_index + num_shards, …`` of that list
  (round-robin), so the shards are disjoint, deterministic, balanced to within one sample, and
  together are exactly the ``limit``-ed set — per-shard metric accumulators can be merged.

PASCAL VOC 2012 (:class:`VOCSegmentation`) — standard layout under ``root``
(``root`` itself or ``root/VOCdevkit/VOC2012``): ``JPEGImages/<id>.jpg``,
``SegmentationClass/<id>.png`` (palette PNG read as indices: 0 = background,
1–20 = :data:`VOC_CLASSES`, 255 = void) and ``ImageSets/Segmentation/<split>.txt``.
``mode="single_class"`` keeps the images whose mask holds exactly one object class besides
background and void (the paper's split: 930 of the 1,449 val images); ``mode="full"`` keeps all.

ImageNet-Segmentation (:class:`ImageNetSegmentation`) — ``gtsegs_ijcv.mat`` (MATLAB v7.3, i.e.
HDF5, 4,276 images of 445 classes), read with h5py. Layout (as read by Chefer et al.'s
``Imagenet_Segmentation`` and by the ConceptAttention reference's ImageNet-Seg scripts):

* ``/value/img``: ``(N, 1)`` object references; each points to a ``uint8`` array stored
  transposed by MATLAB, shape ``(3, W, H)`` → ``transpose(2, 1, 0)`` gives ``H×W×3``.
* ``/value/gt``: ``(N, 1)`` references to ``1×1`` MATLAB cells — a ``(1, 1)`` reference dataset
  whose element points to the mask, stored ``(W, H)`` → ``.T`` gives ``H×W``; values {0, 1}.
* ``/value/id``: ``(N, 1)`` references to MATLAB char arrays (``uint16`` code units, shape
  ``(L, 1)``) holding the ImageNet image name ``<wnid>_<number>``. The class is the wnid; the
  reference turns it into a WordNet lemma and then a simple noun, as done here through
  :mod:`.imagenet_names`. (``/value/target`` is only touched by a commented-out line of the
  reference and is not needed.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from .imagenet_names import SynsetLabeler, simple_noun

__all__ = [
    "SegmentationSample",
    "VOC_CLASSES",
    "VOC_CONCEPTS",
    "VOC_IGNORE_INDEX",
    "VOCSegmentation",
    "ImageNetSegmentation",
    "select_indices",
]

#: PASCAL VOC class names, indexed by the mask value.
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)

#: VOC class name → plain word(s) used as the text concept. Only five differ from the VOC
#: names: run-together compounds are split or shortened to their head noun
#: (diningtable → table, pottedplant → potted plant, tvmonitor → monitor) and the British /
#: colloquial spellings get their common form (aeroplane → airplane, motorbike → motorcycle).
#: (The reference code uses 'plane', 'bike', 'table', 'motorcycle', 'pot', 'monitor'.)
VOC_CONCEPTS: dict[str, str] = {name: name for name in VOC_CLASSES}
VOC_CONCEPTS.update({
    "aeroplane": "airplane",
    "diningtable": "table",
    "motorbike": "motorcycle",
    "pottedplant": "potted plant",
    "tvmonitor": "monitor",
})

VOC_IGNORE_INDEX = 255


@dataclass
class SegmentationSample:
    """One evaluation sample.

    ``mask`` is an ``H×W`` ``uint8`` array of the image's size: VOC class indices with 255 for
    void pixels, or ImageNet-Seg's binary foreground mask (0/1). ``class_names`` are the text
    concepts of the object classes present (background excluded), in the order of
    ``class_indices`` (the mask values; ``[1]`` for ImageNet-Seg).
    """

    id: str
    image: Image.Image
    mask: np.ndarray
    class_names: list[str]
    class_indices: list[int]
    meta: dict[str, Any] = field(default_factory=dict)

    def binary_mask(self, class_index: int | None = None) -> np.ndarray:
        """Mask of one class as uint8 {0, 1} with 255 kept on void pixels.

        ``class_index`` defaults to the only object class (an error if there are several).
        """
        if class_index is None:
            if len(self.class_indices) != 1:
                raise ValueError(f"sample {self.id} has classes {self.class_indices}; "
                                 "pass class_index")
            class_index = self.class_indices[0]
        out = (self.mask == class_index).astype(np.uint8)
        out[self.mask == VOC_IGNORE_INDEX] = VOC_IGNORE_INDEX
        return out

    @property
    def ignore_mask(self) -> np.ndarray:
        """True on void pixels (value 255)."""
        return self.mask == VOC_IGNORE_INDEX


def select_indices(n: int, limit: int | None = None, shard_index: int = 0,
                   num_shards: int = 1) -> list[int]:
    """Positions ``0..n-1`` kept by ``limit`` (first) and the round-robin shard (second)."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"invalid shard {shard_index} of {num_shards}")
    if limit is not None and limit < 0:
        raise ValueError("limit must be non-negative")
    m = n if limit is None else min(n, limit)
    return list(range(shard_index, m, num_shards))


class _SampleSequence(Sequence[SegmentationSample]):
    """Shared sequence behaviour over ``self._keys`` (what ``_load`` needs per sample)."""

    _keys: list[Any]

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, i: int) -> SegmentationSample:  # type: ignore[override]
        if isinstance(i, slice):
            raise TypeError("slicing is not supported; use limit/shard arguments")
        return self._load(self._keys[i])

    def __iter__(self) -> Iterator[SegmentationSample]:
        for key in self._keys:
            yield self._load(key)

    def _load(self, key: Any) -> SegmentationSample:  # pragma: no cover - abstract
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# PASCAL VOC 2012
# --------------------------------------------------------------------------------------------


def _read_voc_mask(path: Path) -> np.ndarray:
    """Read a VOC ``SegmentationClass`` PNG as class indices (``uint8``, 255 = void)."""
    with Image.open(path) as im:
        if im.mode not in ("P", "L"):
            raise ValueError(f"{path}: expected a palette (P) or index (L) PNG, got {im.mode}")
        # np.asarray of a "P" image gives the palette indices, i.e. the class values.
        return np.array(im, dtype=np.uint8)


def _present_classes(mask: np.ndarray) -> list[int]:
    values = np.unique(mask)
    return [int(v) for v in values if v != 0 and v != VOC_IGNORE_INDEX]


class VOCSegmentation(_SampleSequence):
    """PASCAL VOC 2012 segmentation samples (see the module docstring).

    Args:
        root: the ``VOC2012`` directory (or a directory containing ``VOCdevkit/VOC2012``).
        split: image set name in ``ImageSets/Segmentation`` (``"val"`` for the paper).
        mode: ``"single_class"`` (exactly one object class) or ``"full"``.
        limit, shard_index, num_shards: subset selection (see :func:`select_indices`).
        presence_size: if given as ``(height, width)``, class presence for the split is decided
            on the mask resized to that size with nearest-neighbour sampling — the reference
            decides it on the 224×224 evaluation mask, where tiny objects can vanish. Default:
            the full-resolution mask. The returned mask is always full-resolution.
        ids: explicit image ids instead of the split file (e.g. a cached single-class list).
    """

    def __init__(self, root: str | os.PathLike[str], split: str = "val",
                 mode: Literal["single_class", "full"] = "full", *, limit: int | None = None,
                 shard_index: int = 0, num_shards: int = 1,
                 presence_size: tuple[int, int] | None = None,
                 ids: Sequence[str] | None = None) -> None:
        root = Path(root)
        if not (root / "JPEGImages").is_dir() and (root / "VOCdevkit" / "VOC2012").is_dir():
            root = root / "VOCdevkit" / "VOC2012"
        self.root = root
        self.mode = mode
        self.presence_size = presence_size
        if mode not in ("single_class", "full"):
            raise ValueError(f"mode must be 'single_class' or 'full', not {mode!r}")
        if ids is None:
            split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
            if not split_file.is_file():
                raise FileNotFoundError(f"VOC split file not found: {split_file}")
            ids = [ln.strip() for ln in split_file.read_text().splitlines() if ln.strip()]
        all_ids = list(ids)
        if mode == "single_class":
            all_ids = [i for i in all_ids if len(self._split_classes(i)) == 1]
        self.ids_all: list[str] = all_ids
        self._keys = [all_ids[k] for k in select_indices(len(all_ids), limit, shard_index,
                                                           num_shards)]

    @property
    def ids(self) -> list[str]:
        """Ids of the samples of this loader (after limit and sharding)."""
        return list(self._keys)

    def mask_path(self, image_id: str) -> Path:
        return self.root / "SegmentationClass" / f"{image_id}.png"

    def image_path(self, image_id: str) -> Path:
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def _split_classes(self, image_id: str) -> list[int]:
        mask = _read_voc_mask(self.mask_path(image_id))
        if self.presence_size is not None:
            h, w = self.presence_size
            mask = np.array(Image.fromarray(mask).resize((w, h), Image.NEAREST))
        return _present_classes(mask)

    def _load(self, image_id: str) -> SegmentationSample:
        mask = _read_voc_mask(self.mask_path(image_id))
        with Image.open(self.image_path(image_id)) as im:
            image = im.convert("RGB")
        if image.size != (mask.shape[1], mask.shape[0]):
            raise ValueError(f"{image_id}: image {image.size} and mask {mask.shape} differ")
        present = _present_classes(mask)
        return SegmentationSample(
            id=image_id,
            image=image,
            mask=mask,
            class_names=[VOC_CONCEPTS[VOC_CLASSES[c]] for c in present],
            class_indices=present,
            meta={"dataset": "voc2012", "voc_names": [VOC_CLASSES[c] for c in present]},
        )


# --------------------------------------------------------------------------------------------
# ImageNet-Segmentation (gtsegs_ijcv.mat)
# --------------------------------------------------------------------------------------------


def _matlab_string(arr: np.ndarray) -> str:
    """Decode a MATLAB char array (uint16 UTF-16 code units, any shape) to ``str``."""
    units = np.asarray(arr).astype(np.uint16).ravel(order="F")
    return units.tobytes().decode("utf-16-le").rstrip("\x00").strip()


class ImageNetSegmentation(_SampleSequence):
    """ImageNet-Segmentation samples from ``gtsegs_ijcv.mat`` (see the module docstring).

    Args:
        path: the ``.mat`` (HDF5) file.
        limit, shard_index, num_shards: subset selection (see :func:`select_indices`).
        synset_labels: wnid → label mapping, or a devkit ``synset_words.txt``-style file; by
            default WordNet's ``data.noun`` is used when found (see :mod:`.imagenet_names`).
        wordnet_dir: directory of WordNet's ``data.noun`` (default: standard locations).

    The HDF5 file is opened lazily in the process that first reads a sample, so the object can
    be handed to worker processes; :meth:`close` releases it.
    """

    def __init__(self, path: str | os.PathLike[str], *, limit: int | None = None,
                 shard_index: int = 0, num_shards: int = 1,
                 synset_labels: Mapping[str, str] | str | os.PathLike[str] | None = None,
                 wordnet_dir: str | os.PathLike[str] | None = None) -> None:
        import h5py  # noqa: F401  (fail early with a clear ImportError)

        self.path = Path(path)
        self.labeler = SynsetLabeler(synset_labels, wordnet_dir)
        self._file: Any = None
        with h5py.File(self.path, "r") as f:
            self.num_total = int(f["value/img"].shape[0])
        self._keys = select_indices(self.num_total, limit, shard_index, num_shards)

    def _h5(self) -> Any:
        if self._file is None:
            import h5py

            self._file = h5py.File(self.path, "r")
        return self._file

    def close(self) -> None:
        """Close the HDF5 file (it is reopened on the next access)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = None
        return state

    def _deref(self, ref: Any) -> Any:
        return self._h5()[ref]

    def _read_image(self, index: int) -> np.ndarray:
        arr = np.asarray(self._deref(self._h5()["value/img"][index, 0])[()])
        if arr.ndim == 2:  # grayscale, stored (W, H)
            arr = np.repeat(arr.T[:, :, None], 3, axis=2)
        elif arr.ndim == 3:
            arr = arr.transpose(2, 1, 0)  # (C, W, H) -> (H, W, C)
        else:
            raise ValueError(f"image {index}: unexpected stored shape {arr.shape}")
        if arr.dtype != np.uint8:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        return arr

    def _read_mask(self, index: int) -> np.ndarray:
        import h5py

        obj = self._deref(self._h5()["value/gt"][index, 0])
        # Normally a 1x1 cell (a dataset of references); accept a direct array as well.
        while h5py.check_dtype(ref=obj.dtype) is not None:
            obj = self._deref(obj[(0,) * obj.ndim])
        arr = np.asarray(obj[()])
        if arr.ndim != 2:
            raise ValueError(f"mask {index}: unexpected stored shape {arr.shape}")
        return (arr.T > 0).astype(np.uint8)

    def _read_id(self, index: int) -> str:
        f = self._h5()
        if "value/id" not in f:
            return str(index)
        return _matlab_string(self._deref(f["value/id"][index, 0])[()])

    def _load(self, index: int) -> SegmentationSample:
        image = self._read_image(index)
        mask = self._read_mask(index)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"sample {index}: image {image.shape[:2]} and mask {mask.shape} "
                             "differ")
        image_id = self._read_id(index)
        wnid = image_id.split("_")[0] if image_id.startswith("n") else ""
        label = self.labeler.label(wnid) if wnid else ""
        name = simple_noun(label, wnid) if label else ""
        return SegmentationSample(
            id=image_id,
            image=Image.fromarray(image, "RGB"),
            mask=mask,
            class_names=[name] if name else [],
            class_indices=[1],
            meta={"dataset": "imagenet-seg", "index": index, "wnid": wnid, "label": label},
        )
