"""Evaluation of saliency maps as zero-shot segmentations (paper §5.2).

* :mod:`.metrics` — binary (mean-threshold, pixel accuracy, mIoU, AP) and multi-class
  (pixel accuracy, mIoU) protocols, plus mergeable dataset-level accumulators.
* :mod:`.datasets` — loaders for PASCAL VOC 2012 (single-class split / full set) and
  ImageNet-Segmentation (``gtsegs_ijcv.mat``) in their on-disk formats (the latter needs h5py).
* :mod:`.imagenet_names` — ImageNet labels → simple nouns usable as text concepts.
"""

from .datasets import (
    VOC_CLASSES,
    VOC_CONCEPTS,
    ImageNetSegmentation,
    SegmentationSample,
    VOCSegmentation,
)
from .imagenet_names import SynsetLabeler, simple_noun
from .metrics import (
    BinaryScores,
    BinarySegmentationAccumulator,
    ConfusionMatrix,
    MulticlassScores,
    average_precision,
    binary_scores,
    confusion_matrix,
    iou_from_confusion,
    mean_threshold,
    multiclass_scores,
    two_channel_average_precision,
)

__all__ = [
    "VOC_CLASSES",
    "VOC_CONCEPTS",
    "ImageNetSegmentation",
    "SegmentationSample",
    "SynsetLabeler",
    "VOCSegmentation",
    "simple_noun",
    "BinaryScores",
    "BinarySegmentationAccumulator",
    "ConfusionMatrix",
    "MulticlassScores",
    "average_precision",
    "binary_scores",
    "confusion_matrix",
    "iou_from_confusion",
    "mean_threshold",
    "multiclass_scores",
    "two_channel_average_precision",
]
