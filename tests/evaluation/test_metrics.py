"""Tests of the segmentation metrics against hand-computed values and scikit-learn."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import math

import numpy as np
import pytest
import torch

from concept_attention.evaluation.metrics import (
    BinarySegmentationAccumulator,
    ConfusionMatrix,
    average_precision,
    binary_scores,
    confusion_matrix,
    mean_threshold,
    multiclass_scores,
    two_channel_average_precision,
)

# ------------------------------------------------------------------------------------------
# Average precision
# ------------------------------------------------------------------------------------------


def test_average_precision_hand_computed_with_ties():
    # scores sorted: 0.9 (pos), 0.9 (neg) tie -> one threshold: P=1/2, R=1/2
    #                0.5 (pos)                -> P=2/3, R=1
    #                0.1 (neg)                -> P=2/4, R=1 (dR = 0)
    # AP = 1/2 * 1/2 + 1/2 * 2/3 = 7/12
    ap = average_precision([0.9, 0.9, 0.1, 0.5], [1, 0, 0, 1])
    assert ap == pytest.approx(7 / 12, abs=1e-12)


def test_average_precision_special_cases():
    assert math.isnan(average_precision([0.1, 0.2, 0.3], [0, 0, 0]))  # undefined
    assert average_precision([0.1, 0.2, 0.3], [1, 1, 1]) == 1.0
    # constant scores: one threshold, AP = precision = prevalence
    assert average_precision([0.5] * 4, [1, 0, 1, 0]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        average_precision([0.1, float("nan")], [1, 0])
    with pytest.raises(ValueError):
        average_precision([0.1, 0.2], [1, 0, 1])


@pytest.mark.parametrize("seed", range(8))
def test_average_precision_matches_sklearn(seed):
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(seed)
    for _ in range(25):
        n = int(rng.integers(2, 2000))
        labels = rng.random(n) < rng.uniform(0.05, 0.95)
        if not labels.any():
            labels[0] = True
        # coarse rounding creates many ties; also an integer-valued and a 2-D case
        scores = np.round(rng.normal(size=n) + labels * rng.uniform(0, 2), int(rng.integers(0, 4)))
        assert average_precision(scores, labels) == pytest.approx(
            average_precision_score(labels, scores), abs=1e-12)
    img = rng.random((32, 48)).astype(np.float32)
    gt = rng.random((32, 48)) < img
    assert average_precision(img, gt) == pytest.approx(
        average_precision_score(gt.ravel(), img.ravel()), abs=1e-12)
    ints = rng.integers(0, 5, size=300)
    lab = rng.random(300) < 0.3
    assert average_precision(ints, lab) == pytest.approx(average_precision_score(lab, ints))


def test_two_channel_ap_hand_computed_and_sklearn():
    from sklearn.metrics import average_precision_score

    # soft [0, .5, 1] (already min-max normalised), gt [0, 1, 1]
    # pooled scores [1-s, s] = [1, .5, 0, 0, .5, 1], labels [1, 0, 0, 0, 1, 1]
    # score 1 (two positives): P=1, R=2/3; score .5 (one pos, one neg): P=3/4, R=1
    # AP = 2/3 * 1 + 1/3 * 3/4 = 11/12
    soft = np.array([[0.0, 0.5, 1.0]])
    gt = np.array([[0, 1, 1]])
    assert two_channel_average_precision(soft, gt) == pytest.approx(11 / 12)
    # min-max normalisation: an affine rescaling does not change it
    assert two_channel_average_precision(soft * 4 + 3, gt) == pytest.approx(11 / 12)
    rng = np.random.default_rng(3)
    s = rng.random((20, 20))
    g = rng.random((20, 20)) < 0.4
    sn = (s - s.min()) / (s.max() - s.min())
    ref = average_precision_score(np.r_[~g.ravel(), g.ravel()], np.r_[1 - sn.ravel(), sn.ravel()])
    assert two_channel_average_precision(s, g) == pytest.approx(ref, abs=1e-12)


# ------------------------------------------------------------------------------------------
# Binary protocol
# ------------------------------------------------------------------------------------------

# 3x3 example, void pixel at (2, 0) (gt 255) carrying a high soft value.
SOFT = np.array([[0.9, 0.8, 0.1],
                 [0.7, 0.48, 0.1],
                 [0.9, 0.0, 0.6]])
GT = np.array([[1, 1, 0],
               [0, 1, 0],
               [255, 0, 0]])


def test_binary_scores_hand_computed():
    # threshold = mean of all 9 values = 4.58 / 9 = 0.5089 (the void pixel counts here; the
    # mean over the 8 valid pixels would be 0.46 and would turn (1, 1) = 0.48 foreground).
    # prediction fg = (0,0) (0,1) (1,0) (2,2); gt fg = (0,0) (0,1) (1,1)
    # TP = 2, FP = 2 [(1,0), (2,2)], FN = 1 [(1,1)], TN = 3 [(0,2), (1,2), (2,1)]
    # accuracy = 5/8; IoU fg = 2/5; IoU bg = 3/6; mIoU = 0.45
    # AP over valid pixels: ranking 0.9+ 0.8+ 0.7- 0.6- 0.48+ 0.1- 0.1- 0.0-
    #   = 1/3 * 1 + 1/3 * 1 + 1/3 * 3/5 = 13/15
    s = binary_scores(SOFT, GT)
    assert s.threshold == pytest.approx(4.58 / 9)
    assert s.num_valid == 8
    assert s.pixel_accuracy == pytest.approx(5 / 8)
    assert s.iou_foreground == pytest.approx(2 / 5)
    assert s.iou_background == pytest.approx(3 / 6)
    assert s.miou == pytest.approx(0.45)
    assert s.ap == pytest.approx(13 / 15)
    np.testing.assert_array_equal(s.confusion, [[3, 2], [1, 2]])


def test_binary_scores_ignore_mask_equivalent_to_ignore_index():
    gt_bool = GT == 1
    s1 = binary_scores(SOFT, GT)
    s2 = binary_scores(SOFT, gt_bool, ignore_mask=GT == 255)
    s3 = binary_scores(torch.tensor(SOFT), torch.tensor(gt_bool), torch.tensor(GT == 255))
    for s in (s2, s3):
        assert s.pixel_accuracy == s1.pixel_accuracy
        assert s.miou == s1.miou
        assert s.ap == s1.ap
        assert s.ap_two_channel == s1.ap_two_channel
    # without the void information the void pixel is a false positive
    s4 = binary_scores(SOFT, gt_bool)
    assert s4.num_valid == 9 and s4.pixel_accuracy == pytest.approx(5 / 9)


def test_mean_threshold_is_strict():
    pred, t = mean_threshold(np.array([[0.0, 1.0], [1.0, 2.0]]))
    assert t == 1.0
    np.testing.assert_array_equal(pred, [[False, False], [False, True]])


def test_constant_soft_map():
    # constant map -> nothing above the mean -> empty prediction
    # gt fg 2 of 4: accuracy 1/2; IoU fg = 0/2; IoU bg = 2/4; AP = prevalence = 1/2
    # two-channel AP: normalised map is all zeros -> all 8 pooled scores tie, 4 positive -> 1/2
    s = binary_scores(np.full((2, 2), 0.3), np.array([[1, 1], [0, 0]]))
    assert s.pixel_accuracy == 0.5
    assert s.iou_foreground == 0.0
    assert s.iou_background == 0.5
    assert s.miou == 0.25
    assert s.ap == 0.5
    assert s.ap_two_channel == 0.5


def test_empty_prediction_and_empty_gt():
    # both empty: foreground absent from gt and prediction -> IoU fg NaN, excluded from mIoU
    s = binary_scores(np.zeros((3, 3)), np.zeros((3, 3), dtype=int))
    assert math.isnan(s.iou_foreground)
    assert s.iou_background == 1.0 and s.miou == 1.0 and s.pixel_accuracy == 1.0
    assert math.isnan(s.ap)
    # the reference's pooled AP stays defined: the background channel (1 - 0 = 1) is all positive
    assert s.ap_two_channel == 1.0
    # empty gt, some predicted foreground: IoU fg = 0 (false positive), AP undefined
    s = binary_scores(np.array([[0.0, 1.0], [0.0, 0.0]]), np.zeros((2, 2), dtype=bool))
    assert s.iou_foreground == 0.0
    assert s.iou_background == pytest.approx(3 / 4)
    assert s.miou == pytest.approx(3 / 8)
    assert math.isnan(s.ap)


def test_all_foreground_gt():
    # gt all fg; soft [[0,1],[2,3]] -> mean 1.5 -> pred fg at 2, 3
    # acc 2/4; IoU fg 2/4; IoU bg: inter 0, union 2 (predicted bg) -> 0; mIoU 1/4; AP 1
    s = binary_scores(np.array([[0.0, 1.0], [2.0, 3.0]]), np.ones((2, 2), dtype=int))
    assert s.pixel_accuracy == 0.5
    assert s.iou_foreground == 0.5
    assert s.iou_background == 0.0
    assert s.miou == 0.25
    assert s.ap == 1.0


def test_all_void_and_pred_mask_override():
    s = binary_scores(np.ones((2, 2)), np.full((2, 2), 255))
    assert s.num_valid == 0
    assert all(math.isnan(v) for v in (s.pixel_accuracy, s.miou, s.ap, s.ap_two_channel))
    # pred_mask replaces the mean threshold: perfect prediction although the map is poor
    gt = np.array([[1, 0], [0, 1]])
    s = binary_scores(np.array([[0.0, 1.0], [0.0, 0.0]]), gt, pred_mask=gt.astype(bool))
    assert s.pixel_accuracy == 1.0 and s.miou == 1.0 and math.isnan(s.threshold)


def test_binary_scores_validation():
    with pytest.raises(ValueError):
        binary_scores(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError):
        binary_scores(np.array([[np.nan, 0.0]]), np.array([[1, 0]]))
    with pytest.raises(ValueError):
        binary_scores(np.zeros((1, 2)), np.array([[2, 0]]))  # not binary


# ------------------------------------------------------------------------------------------
# Multi-class protocol
# ------------------------------------------------------------------------------------------


def test_multiclass_hand_computed():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 0, 2]])  # the 2 at the void pixel is not counted
    # valid (gt, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,0) -> accuracy 3/5
    # IoU0 = 1 / (2 + 2 - 1) = 1/3; IoU1 = 2 / (2 + 3 - 2) = 2/3; IoU2 = 0 / (1 + 0) = 0
    s = multiclass_scores(pred, gt, num_classes=3)
    assert s.pixel_accuracy == pytest.approx(0.6)
    np.testing.assert_allclose(s.iou_per_class, [1 / 3, 2 / 3, 0.0])
    assert s.miou == pytest.approx(1 / 3)
    np.testing.assert_array_equal(s.confusion, [[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    # a class absent from both gt and prediction: NaN, not counted in the mean
    s4 = multiclass_scores(pred, gt, num_classes=4)
    assert math.isnan(s4.iou_per_class[3]) and not s4.present[3]
    assert s4.miou == pytest.approx(1 / 3)
    # a class present only in the prediction: IoU 0 and counted
    pred2 = pred.copy()
    pred2[0, 0] = 3
    s5 = multiclass_scores(pred2, gt, num_classes=4)
    assert s5.iou_per_class[3] == 0.0 and s5.present[3]
    # IoU0 now 0/ (2 + 1 - 0) = 0 -> mean of [0, 2/3, 0, 0]
    assert s5.miou == pytest.approx((2 / 3) / 4)


def test_multiclass_validation_and_void_prediction():
    gt = np.array([[0, 255]])
    # out-of-range label at a void pixel is fine, at a valid pixel it is an error
    assert multiclass_scores(np.array([[0, 99]]), gt, 2).pixel_accuracy == 1.0
    with pytest.raises(ValueError):
        multiclass_scores(np.array([[5, 0]]), gt, 2)
    with pytest.raises(ValueError):
        confusion_matrix(np.array([[0, 0]]), np.array([[0, 7]]), 2)
    s = multiclass_scores(np.zeros((2, 2), int), np.full((2, 2), 255), 3)
    assert math.isnan(s.pixel_accuracy) and math.isnan(s.miou) and s.num_valid == 0


# ------------------------------------------------------------------------------------------
# Accumulators
# ------------------------------------------------------------------------------------------


def test_confusion_matrix_dataset_vs_per_image():
    # image A: gt [[0,0],[1,1]], pred [[0,0],[1,0]] -> acc 3/4, IoU0 2/3, IoU1 1/2, mIoU 7/12
    # image B: gt all 1, pred all 1 -> acc 1, IoU0 NaN, IoU1 1, mIoU 1
    # dataset: confusion [[2,0],[1,5]] -> acc 7/8, IoU0 2/3, IoU1 5/6, mIoU 3/4
    # per-image means: acc (3/4 + 1)/2 = 7/8, mIoU (7/12 + 1)/2 = 19/24
    cm = ConfusionMatrix(2)
    a = cm.update(np.array([[0, 0], [1, 0]]), np.array([[0, 0], [1, 1]]))
    assert a.miou == pytest.approx(7 / 12)
    cm.update(np.ones((1, 4), int), np.ones((1, 4), int))
    np.testing.assert_array_equal(cm.matrix, [[2, 0], [1, 5]])
    summ = cm.summary()
    assert summ["num_images"] == 2
    assert summ["pixel_accuracy"] == pytest.approx(7 / 8)
    np.testing.assert_allclose(summ["iou_per_class"], [2 / 3, 5 / 6])
    assert summ["miou"] == pytest.approx(3 / 4)
    assert summ["mean_image_pixel_accuracy"] == pytest.approx(7 / 8)
    assert summ["mean_image_miou"] == pytest.approx(19 / 24)


def test_confusion_matrix_merge_equals_single_pass_and_roundtrip():
    rng = np.random.default_rng(0)
    images = [(rng.integers(0, 4, (6, 5)), rng.integers(0, 4, (6, 5))) for _ in range(7)]
    for _, gt in images:
        gt[0, 0] = 255
    whole = ConfusionMatrix(4)
    shards = [ConfusionMatrix(4) for _ in range(3)]
    for i, (pred, gt) in enumerate(images):
        whole.update(pred, gt)
        shards[i % 3].update(pred, gt)
    merged = ConfusionMatrix(4)
    for sh in shards:
        merged.merge(ConfusionMatrix.from_state_dict(json.loads(json.dumps(sh.state_dict()))))
    np.testing.assert_array_equal(merged.matrix, whole.matrix)
    a, b = merged.summary(), whole.summary()
    for key in ("pixel_accuracy", "miou", "mean_image_pixel_accuracy", "mean_image_miou"):
        assert a[key] == pytest.approx(b[key])
    with pytest.raises(ValueError):
        merged.merge(ConfusionMatrix(3))


def test_binary_accumulator():
    acc = BinarySegmentationAccumulator()
    s1 = acc.update(SOFT, GT)  # the hand-computed image above
    # second image: perfect, gt fg 2 of 4 -> acc 1, IoU fg 1, IoU bg 1, AP 1
    s2 = acc.update(np.array([[1.0, 1.0], [0.0, 0.0]]), np.array([[1, 1], [0, 0]]))
    assert s2.miou == 1.0 and s2.ap == 1.0
    # third image: no foreground -> AP undefined, skipped in mean_ap
    acc.update(np.zeros((2, 2)), np.zeros((2, 2), int))
    summ = acc.summary()
    # dataset confusion: [[3,2],[1,2]] + [[2,0],[0,2]] + [[4,0],[0,0]] = [[9,2],[1,4]]
    # acc 13/16; IoU bg 9/12; IoU fg 4/7
    assert summ["pixel_accuracy"] == pytest.approx(13 / 16)
    assert summ["iou_background"] == pytest.approx(9 / 12)
    assert summ["iou_foreground"] == pytest.approx(4 / 7)
    assert summ["miou"] == pytest.approx((9 / 12 + 4 / 7) / 2)
    assert summ["miou_reference_imagenet"] == pytest.approx((13 / 16) / (2 - 13 / 16))
    assert summ["mean_ap"] == pytest.approx((13 / 15 + 1.0) / 2)
    assert summ["num_ap_undefined"] == 1
    assert summ["mean_image_miou"] == pytest.approx((s1.miou + 1.0 + 1.0) / 3)
    other = BinarySegmentationAccumulator.from_state_dict(
        json.loads(json.dumps(acc.state_dict())))
    merged = BinarySegmentationAccumulator().merge(other).merge(other)
    assert len(merged) == 6
    assert merged.summary()["miou"] == pytest.approx(summ["miou"])


def test_reference_imagenet_miou_identity():
    # The reference ImageNet-Seg script computes its IoU helper on the stacked two-channel
    # tensors [1 - pred, pred] and [1 - gt, gt] (values shifted by +1, no argmax). Re-derive
    # that computation here and check it equals acc / (2 - acc), as the summary reports.
    rng = np.random.default_rng(1)
    pred = (rng.random((2, 16, 16)) < 0.5).astype(int)
    gt = (rng.random((2, 16, 16)) < 0.4).astype(int)
    inter = np.zeros(2)
    union = np.zeros(2)
    for p, g in zip(pred, gt, strict=True):
        ps, gs = np.stack([1 - p, p]) + 1, np.stack([1 - g, g]) + 1
        for k, v in enumerate((1, 2)):
            i = np.sum((ps == gs) & (ps == v))
            inter[k] += i
            union[k] += np.sum(ps == v) + np.sum(gs == v) - i
    quirky_miou = np.mean(inter / union)
    acc = BinarySegmentationAccumulator()
    for p, g in zip(pred, gt, strict=True):
        acc.update(p.astype(float), g, pred_mask=p)
    summ = acc.summary()
    assert summ["miou_reference_imagenet"] == pytest.approx(quirky_miou)
    assert summ["miou"] != pytest.approx(quirky_miou)
