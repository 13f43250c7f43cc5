"""Segmentation metrics of the zero-shot segmentation protocol (paper §5.2).

Two protocols are implemented, vectorised with numpy (torch tensors are accepted and moved to
the CPU):

**Binary** (ImageNet-Segmentation, PASCAL VOC single-class split) — :func:`binary_scores`.
One soft saliency map (``H×W`` floats, already at the mask's size) is scored against one
binary ground-truth mask:

* the map is binarised at its own mean: foreground ⇔ ``soft > mean(soft)`` (strict, the mean
  taken over *all* pixels of the map, so the prediction does not depend on the annotation).
  This is the rule of Chefer et al.'s ImageNet-Seg evaluation (``Res.gt(Res.mean())``),
  which the ConceptAttention reference code re-uses (``mean_value_threshold=True``).
  A constant map therefore predicts no foreground at all;
* pixel accuracy of that binary prediction;
* IoU of the foreground and of the background class and their mean (mIoU);
* AP: average precision of the soft map against the mask, with exactly scikit-learn's
  ``average_precision_score`` definition (step-wise sum over distinct thresholds,
  ``AP = Σ_n (R_n − R_{n−1}) P_n``, no interpolation) — :func:`average_precision`;
* ``ap_two_channel``: the AP as the reference code actually computes it (Chefer et al.'s
  ``get_ap_scores``): the map is min-max normalised, the scores ``[1 − s, s]`` of the two
  channels are pooled with the one-hot labels ``[gt == 0, gt == 1]`` and a single AP is taken
  over the ``2·N`` pooled samples. Reported for comparability with published numbers.

Void pixels (``ignore_mask`` and/or ground-truth value ``ignore_index``) are excluded from
every metric (accuracy, IoUs, both APs); they still take part in the threshold (see above).

**Multi-class** (PASCAL VOC full set) — :func:`multiclass_scores`: pixel accuracy and IoU per
class of a label map against a ground-truth label map, void (``ignore_index``) excluded.

Conventions for undefined quantities (documented once, used everywhere):

* IoU of a class whose union is empty on the valid pixels (absent from both the ground truth
  and the prediction) is **NaN**, and mIoU is the mean over the classes *present in the ground
  truth or in the prediction* (NaNs skipped). A class present in the prediction only has
  IoU 0 and counts (it is a false positive); a class absent from both is neither rewarded nor
  penalised.
* AP with no positive pixel is **NaN** (scikit-learn returns 0 with a warning; the reference
  code maps it to 0 through ``np.nan_to_num``). Dataset means skip NaN images and report how
  many were skipped.
* An image with no valid pixel has NaN accuracy, IoUs and APs and contributes no counts.

**Aggregation over a data set.** :class:`ConfusionMatrix` accumulates pixel counts, so the
*dataset-level* scores (sum of intersections / sum of unions per class, then the mean over
classes; correct pixels / labelled pixels) can be computed incrementally and merged across
shards (:meth:`ConfusionMatrix.merge`). It also keeps the per-image scores for *per-image
averages*. :class:`BinarySegmentationAccumulator` does the same for the binary protocol.

Which aggregation the paper uses: its numbers come from the reference code, which follows
Chefer et al. — pixel accuracy and mIoU are **dataset-level** (``total_correct / total_label``;
``total_inter / total_union`` per class summed over all images, then the mean over the two
classes), while mAP is the **per-image mean** of AP. For the PASCAL VOC multi-class table the
reference likewise uses dataset-level accuracy and dataset-level mIoU over the classes whose
summed union is non-zero. ``summary()`` reports both aggregations; the keys without the
``mean_image_`` prefix follow the paper.

Caveat for comparing with the paper's ImageNet-Seg mIoU: the reference ImageNet-Seg script
feeds the stacked ``[1 − mask, mask]`` / ``[1 − gt, gt]`` tensors to an IoU helper whose argmax
is commented out, so each "class" IoU there is (TP + TN) / (2N − TP − TN) and its mIoU equals
``acc / (2 − acc)`` of the dataset-level pixel accuracy. The binary accumulator reports that
value as ``miou_reference_imagenet`` next to the true mIoU. (Its VOC single-class script calls
the helper on the plain masks, i.e. computes the true IoUs.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "BinaryScores",
    "MulticlassScores",
    "ConfusionMatrix",
    "BinarySegmentationAccumulator",
    "average_precision",
    "mean_threshold",
    "binary_scores",
    "two_channel_average_precision",
    "confusion_matrix",
    "multiclass_scores",
    "iou_from_confusion",
]


def _to_numpy(x: Any) -> np.ndarray:
    """Return ``x`` as a numpy array (torch tensors are detached and moved to the CPU)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _nanmean(values: np.ndarray) -> float:
    """Mean over the finite entries; NaN when there is none (and no warning)."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


# --------------------------------------------------------------------------------------------
# Average precision
# --------------------------------------------------------------------------------------------


def average_precision(scores: Any, labels: Any) -> float:
    """Average precision of ``scores`` for the binary ``labels`` (any shape, flattened).

    Same definition as ``sklearn.metrics.average_precision_score``: the scores are swept from
    high to low, one operating point per *distinct* score value (tied pixels enter together),
    and ``AP = Σ_n (R_n − R_{n−1}) · P_n`` with ``R_0 = 0`` — a step-wise sum, no interpolation.
    Returns NaN when there is no positive label (undefined). Raises ``ValueError`` on
    non-finite scores or mismatched sizes.
    """
    s = _to_numpy(scores).astype(np.float64, copy=False).ravel()
    y = _to_numpy(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in size: {s.size} vs {y.size}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values")
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    # Last position of each run of equal scores = one threshold per distinct value.
    ends = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(y, dtype=np.int64)[ends]
    predicted = ends + 1
    precision = tp / predicted
    recall = tp / n_pos
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def two_channel_average_precision(soft_map: Any, gt_mask: Any, valid: Any | None = None) -> float:
    """AP as computed by the reference code (Chefer et al.'s ``get_ap_scores``).

    The map is min-max normalised to ``s ∈ [0, 1]`` (a constant map becomes all zeros, as the
    reference's ``nan_to_num`` does), then one AP is taken over the pooled ``2·N`` samples
    ``[1 − s, s]`` with labels ``[gt == 0, gt == 1]``. ``valid`` (bool, same shape) restricts
    the pixels used.
    """
    s = _to_numpy(soft_map).astype(np.float64, copy=False)
    gt = _to_numpy(gt_mask).astype(bool)
    lo, hi = float(s.min()), float(s.max())
    s = (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)
    if valid is not None:
        v = _to_numpy(valid).astype(bool)
        s, gt = s[v], gt[v]
    return average_precision(np.concatenate([1.0 - s.ravel(), s.ravel()]),
                             np.concatenate([~gt.ravel(), gt.ravel()]))


# --------------------------------------------------------------------------------------------
# Confusion matrices and IoU
# --------------------------------------------------------------------------------------------


def confusion_matrix(pred_labels: Any, gt_labels: Any, num_classes: int,
                     ignore_index: int | None = 255, valid: Any | None = None) -> np.ndarray:
    """``num_classes × num_classes`` pixel counts, rows = ground truth, columns = prediction.

    Pixels whose ground truth equals ``ignore_index`` (or where ``valid`` is False) are not
    counted. Raises ``ValueError`` when a counted pixel has a ground-truth or predicted label
    outside ``[0, num_classes)``.
    """
    pred = _to_numpy(pred_labels)
    gt = _to_numpy(gt_labels)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    keep = np.ones(gt.shape, dtype=bool) if valid is None else _to_numpy(valid).astype(bool)
    if keep.shape != gt.shape:
        raise ValueError(f"valid mask {keep.shape} and ground truth {gt.shape} differ in shape")
    if ignore_index is not None:
        keep &= gt != ignore_index
    g = gt[keep].astype(np.int64)
    p = pred[keep].astype(np.int64)
    for name, arr in (("ground-truth", g), ("predicted", p)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            bad = np.unique(arr[(arr < 0) | (arr >= num_classes)]).tolist()
            raise ValueError(f"{name} labels outside [0, {num_classes}) on non-void pixels: {bad}")
    counts = np.bincount(g * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def iou_from_confusion(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class ``(iou, intersection, union)``; IoU is NaN where the union is 0."""
    confusion = np.asarray(confusion, dtype=np.int64)
    inter = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    return iou, inter, union


def _accuracy(confusion: np.ndarray) -> float:
    total = int(confusion.sum())
    return float(np.trace(confusion) / total) if total else float("nan")


# --------------------------------------------------------------------------------------------
# Binary protocol
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BinaryScores:
    """Scores of one soft map against one binary mask (see the module docstring)."""

    pixel_accuracy: float
    iou_foreground: float
    iou_background: float
    miou: float
    ap: float
    ap_two_channel: float
    threshold: float
    num_valid: int
    confusion: np.ndarray = field(repr=False)  # 2×2, rows gt (bg, fg), columns prediction


def mean_threshold(soft_map: Any) -> tuple[np.ndarray, float]:
    """Binarise a soft map at its own mean: returns ``(soft > mean, mean)``."""
    s = _to_numpy(soft_map).astype(np.float64, copy=False)
    t = float(s.mean())
    return s > t, t


def _binary_truth(soft: np.ndarray, gt_mask: Any, ignore_mask: Any | None, ignore_index: int | None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(ground truth as bool, valid pixels) after checking shapes, values and void pixels."""
    gt_raw = _to_numpy(gt_mask)
    if soft.ndim != 2 or soft.shape != gt_raw.shape:
        raise ValueError(f"soft map {soft.shape} and mask {gt_raw.shape} must be equal 2-D shapes")
    if not np.all(np.isfinite(soft)):
        raise ValueError("soft map contains NaN or infinite values")
    valid = np.ones(gt_raw.shape, dtype=bool)
    if ignore_mask is not None:
        ign = _to_numpy(ignore_mask).astype(bool)
        if ign.shape != gt_raw.shape:
            raise ValueError(f"ignore mask {ign.shape} and mask {gt_raw.shape} differ in shape")
        valid &= ~ign
    if gt_raw.dtype != bool and ignore_index is not None:
        valid &= gt_raw != ignore_index
    if gt_raw.dtype != bool and (valid & (gt_raw != 0) & (gt_raw != 1)).any():
        raise ValueError("binary ground truth must contain only 0, 1 (and ignore_index)")
    return gt_raw.astype(bool) & valid, valid


def binary_scores(soft_map: Any, gt_mask: Any, ignore_mask: Any | None = None, *,
                  pred_mask: Any | None = None, ignore_index: int | None = 255) -> BinaryScores:
    """Binary-protocol scores of one soft map (``H×W``) against one ground-truth mask.

    Args:
        soft_map: saliency map, already resized to the mask's size; must be finite.
        gt_mask: ground truth, bool or integers in {0, 1}; pixels equal to ``ignore_index``
            (e.g. VOC's 255) are void.
        ignore_mask: optional bool map, True = void pixel (excluded from all metrics).
        pred_mask: optional binary prediction to score instead of the mean-thresholded map
            (the reference's VOC single-class run takes it from an argmax over concepts); the
            APs are still computed from ``soft_map``.
        ignore_index: ground-truth value marking void pixels (None: no such value).
    """
    soft = _to_numpy(soft_map).astype(np.float64, copy=False)
    gt, valid = _binary_truth(soft, gt_mask, ignore_mask, ignore_index)

    if pred_mask is None:
        pred, threshold = mean_threshold(soft)
    else:
        pred = _to_numpy(pred_mask).astype(bool)
        if pred.shape != gt.shape:
            raise ValueError(f"pred mask {pred.shape} and mask {gt.shape} differ in shape")
        threshold = float("nan")

    conf = confusion_matrix(pred.astype(np.int64), gt.astype(np.int64), 2, None, valid)
    iou, _, _ = iou_from_confusion(conf)
    n_valid = int(valid.sum())
    if n_valid:
        ap = average_precision(soft[valid], gt[valid])
        ap2 = two_channel_average_precision(soft, gt, valid)
    else:
        ap = ap2 = float("nan")
    return BinaryScores(
        pixel_accuracy=_accuracy(conf),
        iou_foreground=float(iou[1]),
        iou_background=float(iou[0]),
        miou=_nanmean(iou),
        ap=ap,
        ap_two_channel=ap2,
        threshold=threshold,
        num_valid=n_valid,
        confusion=conf,
    )


# --------------------------------------------------------------------------------------------
# Multi-class protocol
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MulticlassScores:
    """Scores of one label map; ``iou_per_class[c]`` is NaN for a class absent from both."""

    pixel_accuracy: float
    miou: float
    iou_per_class: np.ndarray
    present: np.ndarray  # bool: class in the ground truth or the prediction (valid pixels)
    num_valid: int
    confusion: np.ndarray = field(repr=False)


def multiclass_scores(pred_labels: Any, gt_labels: Any, num_classes: int,
                      ignore_index: int | None = 255) -> MulticlassScores:
    """Pixel accuracy, per-class IoU and mIoU of a predicted label map.

    Pixels whose ground truth is ``ignore_index`` are excluded (whatever is predicted there).
    mIoU averages the IoU over the classes present in the ground truth *or* the prediction on
    the valid pixels; a class absent from both has IoU NaN and is left out of the mean
    (class 0 = background counts as a class like any other).
    """
    conf = confusion_matrix(pred_labels, gt_labels, num_classes, ignore_index)
    iou, _, union = iou_from_confusion(conf)
    return MulticlassScores(
        pixel_accuracy=_accuracy(conf),
        miou=_nanmean(iou),
        iou_per_class=iou,
        present=union > 0,
        num_valid=int(conf.sum()),
        confusion=conf,
    )


# --------------------------------------------------------------------------------------------
# Accumulators
# --------------------------------------------------------------------------------------------


class ConfusionMatrix:
    """Dataset-level accumulator of a multi-class confusion matrix plus per-image scores.

    ``update`` adds one image; ``merge`` adds another accumulator (e.g. a shard computed in
    another process — sums of counts are exact, so the merged result does not depend on the
    sharding). Dataset-level IoU of class c = Σ intersections / Σ unions over the images;
    mIoU = mean over classes with a non-zero summed union. Per-image averages are the means
    of the per-image accuracies and mIoUs (NaN images skipped).
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        if num_classes < 1:
            raise ValueError("num_classes must be positive")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.image_accuracy: list[float] = []
        self.image_miou: list[float] = []

    def __len__(self) -> int:
        return len(self.image_accuracy)

    def update(self, pred_labels: Any, gt_labels: Any) -> MulticlassScores:
        """Score one image, add it to the totals and return its scores."""
        scores = multiclass_scores(pred_labels, gt_labels, self.num_classes, self.ignore_index)
        self.add(scores.confusion, scores.pixel_accuracy, scores.miou)
        return scores

    def add(self, confusion: np.ndarray, accuracy: float, miou: float) -> None:
        """Add one image given its confusion matrix and per-image scores."""
        confusion = np.asarray(confusion, dtype=np.int64)
        if confusion.shape != self.matrix.shape:
            raise ValueError(f"confusion {confusion.shape} != {self.matrix.shape}")
        self.matrix += confusion
        self.image_accuracy.append(float(accuracy))
        self.image_miou.append(float(miou))

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add ``other``'s counts and per-image scores to this accumulator (in place)."""
        if other.num_classes != self.num_classes:
            raise ValueError("cannot merge accumulators with different num_classes")
        self.matrix += other.matrix
        self.image_accuracy.extend(other.image_accuracy)
        self.image_miou.extend(other.image_miou)
        return self

    def iou(self) -> np.ndarray:
        """Dataset-level IoU per class (NaN where the summed union is 0)."""
        return iou_from_confusion(self.matrix)[0]

    def miou(self) -> float:
        """Dataset-level mIoU over classes with a non-zero summed union."""
        return _nanmean(self.iou())

    def pixel_accuracy(self) -> float:
        """Dataset-level pixel accuracy: correct / labelled pixels over all images."""
        return _accuracy(self.matrix)

    def summary(self) -> dict[str, Any]:
        """Both aggregations; keys without ``mean_image_`` are dataset-level (the paper's)."""
        return {
            "num_images": len(self),
            "pixel_accuracy": self.pixel_accuracy(),
            "miou": self.miou(),
            "iou_per_class": self.iou().tolist(),
            "mean_image_pixel_accuracy": _nanmean(np.array(self.image_accuracy)),
            "mean_image_miou": _nanmean(np.array(self.image_miou)),
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (to save a shard's result and merge it later)."""
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index,
                "matrix": self.matrix.tolist(), "image_accuracy": list(self.image_accuracy),
                "image_miou": list(self.image_miou)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "ConfusionMatrix":
        """Inverse of :meth:`state_dict`."""
        obj = cls(int(state["num_classes"]), state.get("ignore_index"))
        obj.matrix = np.asarray(state["matrix"], dtype=np.int64).reshape(obj.matrix.shape)
        obj.image_accuracy = [float(v) for v in state["image_accuracy"]]
        obj.image_miou = [float(v) for v in state["image_miou"]]
        return obj


def _reference_imagenet_miou(pixel_accuracy: float) -> float:
    """The reference ImageNet-Seg script's "mIoU": ``acc / (2 − acc)`` (see module docstring)."""
    return pixel_accuracy / (2.0 - pixel_accuracy)


class BinarySegmentationAccumulator:
    """Accumulates the binary protocol over a data set (mergeable across shards).

    ``summary()`` gives the paper's aggregation — dataset-level pixel accuracy and mIoU (mean of
    background and foreground IoU from summed counts), per-image mean AP (``mean_ap``; also
    ``mean_ap_two_channel``, the reference code's AP) — and the per-image means of accuracy and
    mIoU. Images with undefined AP (no foreground pixel) are skipped in the AP means and
    counted in ``num_ap_undefined``.
    """

    def __init__(self) -> None:
        self.confusion = ConfusionMatrix(2, ignore_index=None)
        self.image_ap: list[float] = []
        self.image_ap_two_channel: list[float] = []

    def __len__(self) -> int:
        return len(self.image_ap)

    def update(self, soft_map: Any, gt_mask: Any, ignore_mask: Any | None = None, *,
               pred_mask: Any | None = None, ignore_index: int | None = 255) -> BinaryScores:
        """Score one image with :func:`binary_scores`, accumulate and return its scores."""
        s = binary_scores(soft_map, gt_mask, ignore_mask, pred_mask=pred_mask,
                          ignore_index=ignore_index)
        self.add(s)
        return s

    def add(self, scores: BinaryScores) -> None:
        """Accumulate already computed :class:`BinaryScores`."""
        self.confusion.add(scores.confusion, scores.pixel_accuracy, scores.miou)
        self.image_ap.append(scores.ap)
        self.image_ap_two_channel.append(scores.ap_two_channel)

    def merge(self, other: "BinarySegmentationAccumulator") -> "BinarySegmentationAccumulator":
        """Add another accumulator's images (in place)."""
        self.confusion.merge(other.confusion)
        self.image_ap.extend(other.image_ap)
        self.image_ap_two_channel.extend(other.image_ap_two_channel)
        return self

    def summary(self) -> dict[str, Any]:
        """Dataset-level accuracy/mIoU, per-image mean APs, and per-image means."""
        iou = self.confusion.iou()
        ap = np.array(self.image_ap, dtype=np.float64)
        return {
            "num_images": len(self),
            "pixel_accuracy": self.confusion.pixel_accuracy(),
            "miou": _nanmean(iou),
            "miou_reference_imagenet": _reference_imagenet_miou(self.confusion.pixel_accuracy()),
            "iou_background": float(iou[0]),
            "iou_foreground": float(iou[1]),
            "mean_ap": _nanmean(ap),
            "mean_ap_two_channel": _nanmean(np.array(self.image_ap_two_channel)),
            "num_ap_undefined": int(np.isnan(ap).sum()),
            "mean_image_pixel_accuracy": _nanmean(np.array(self.confusion.image_accuracy)),
            "mean_image_miou": _nanmean(np.array(self.confusion.image_miou)),
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        return {"confusion": self.confusion.state_dict(), "image_ap": list(self.image_ap),
                "image_ap_two_channel": list(self.image_ap_two_channel)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "BinarySegmentationAccumulator":
        """Inverse of :meth:`state_dict`."""
        obj = cls()
        obj.confusion = ConfusionMatrix.from_state_dict(state["confusion"])
        obj.image_ap = [float(v) for v in state["image_ap"]]
        obj.image_ap_two_channel = [float(v) for v in state["image_ap_two_channel"]]
        return obj
