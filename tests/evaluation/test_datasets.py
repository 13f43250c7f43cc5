"""Tests of the VOC and ImageNet-Segmentation loaders (real VOC samples, HDF5 fixture)."""

import inspect
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pickle
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from concept_attention.evaluation.datasets import (
    VOC_CLASSES,
    VOC_CONCEPTS,
    ImageNetSegmentation,
    VOCSegmentation,
    select_indices,
)
from concept_attention.evaluation.imagenet_names import (
    SynsetLabeler,
    WordNetNouns,
    read_synset_words,
    simple_noun,
)
from concept_attention.evaluation.metrics import binary_scores, multiclass_scores

VOC_SAMPLES = Path(__file__).resolve().parents[1] / "data" / "voc2012-val-samples"

# Classes of the 14 real samples (VOC names), as listed in tests/data/README.md.
EXPECTED_VOC = {
    "sample_0000": ["aeroplane"], "sample_0001": ["aeroplane"], "sample_0166": ["aeroplane"],
    "sample_0417": ["aeroplane"], "sample_0060": ["bird"], "sample_0114": ["bird"],
    "sample_0020": ["sheep"], "sample_0023": ["sheep"], "sample_0293": ["cow"],
    "sample_0008": ["horse"], "sample_0474": ["bus"],
    "sample_0120": ["bicycle", "bottle"], "sample_0294": ["car", "person"],
    "sample_0582": ["motorbike", "person"],
}

def needs_voc(test):
    """The 14 VOC samples are in the repository (tests/data); fail loudly if they are missing."""

    def checked(*args, **kwargs):
        assert VOC_SAMPLES.is_dir(), f"the VOC samples of this repository are missing at {VOC_SAMPLES}"
        return test(*args, **kwargs)

    checked.__name__ = test.__name__
    checked.__signature__ = inspect.signature(test)
    return checked


# ------------------------------------------------------------------------------------------
# Selection
# ------------------------------------------------------------------------------------------


def test_select_indices_round_robin():
    assert select_indices(10) == list(range(10))
    assert select_indices(10, shard_index=1, num_shards=3) == [1, 4, 7]
    assert select_indices(10, limit=5, shard_index=0, num_shards=2) == [0, 2, 4]
    shards = [select_indices(11, limit=9, shard_index=k, num_shards=4) for k in range(4)]
    assert sorted(sum(shards, [])) == list(range(9))
    with pytest.raises(ValueError):
        select_indices(5, shard_index=2, num_shards=2)


# ------------------------------------------------------------------------------------------
# PASCAL VOC (real samples)
# ------------------------------------------------------------------------------------------


def test_voc_concept_table():
    assert VOC_CLASSES[0] == "background" and len(VOC_CLASSES) == 21
    assert VOC_CONCEPTS["pottedplant"] == "potted plant"
    assert VOC_CONCEPTS["tvmonitor"] == "monitor"
    assert VOC_CONCEPTS["diningtable"] == "table"
    assert all(name.replace(" ", "").isalpha() for name in VOC_CONCEPTS.values())


@needs_voc
def test_voc_full_and_single_class_splits():
    full = VOCSegmentation(VOC_SAMPLES, mode="full")
    assert len(full) == 14
    seen = {}
    for s in full:
        assert s.image.mode == "RGB"
        assert s.image.size == (s.mask.shape[1], s.mask.shape[0])
        assert s.mask.dtype == np.uint8
        assert (s.mask == 255).any(), "void pixels must be preserved"
        assert s.class_indices == sorted(s.class_indices)
        assert s.class_names == [VOC_CONCEPTS[VOC_CLASSES[c]] for c in s.class_indices]
        seen[s.id] = [VOC_CLASSES[c] for c in s.class_indices]
    assert seen == EXPECTED_VOC
    counts = Counter(c for names in seen.values() for c in names)
    assert counts["aeroplane"] == 4 and counts["bird"] == 2 and counts["sheep"] == 2

    single = VOCSegmentation(VOC_SAMPLES, mode="single_class")
    assert len(single) == 11
    assert set(single.ids) == {k for k, v in EXPECTED_VOC.items() if len(v) == 1}
    # deciding presence on the reference's 224x224 nearest-resized mask keeps the same split
    assert VOCSegmentation(VOC_SAMPLES, mode="single_class", presence_size=(224, 224)).ids \
        == single.ids
    s = single[0]
    assert s.class_names == ["airplane"]


@needs_voc
def test_voc_shards_and_limit():
    full = VOCSegmentation(VOC_SAMPLES, mode="single_class")
    shards = [VOCSegmentation(VOC_SAMPLES, mode="single_class", shard_index=k, num_shards=3)
              for k in range(3)]
    ids = [sh.ids for sh in shards]
    assert sorted(sum(ids, [])) == sorted(full.ids)
    assert all(set(a).isdisjoint(b) for i, a in enumerate(ids) for b in ids[i + 1:])
    assert ids[1] == full.ids[1::3]  # round-robin by position, deterministic
    limited = VOCSegmentation(VOC_SAMPLES, mode="full", limit=5, shard_index=1, num_shards=2)
    assert limited.ids == VOCSegmentation(VOC_SAMPLES, limit=5).ids[1::2]
    assert len(VOCSegmentation(VOC_SAMPLES, limit=0)) == 0


@needs_voc
def test_voc_void_is_ignored_by_metrics():
    full = VOCSegmentation(VOC_SAMPLES, mode="full")
    s = full[full.ids.index("sample_0120")]  # bicycle + bottle
    # the binary mask of one class keeps 255 on void pixels
    b = s.binary_mask(VOC_CLASSES.index("bottle"))
    assert set(np.unique(b)) == {0, 1, 255}
    with pytest.raises(ValueError):
        s.binary_mask()  # two classes: must choose
    # a "soft map" that is perfect on valid pixels but 1 on every void pixel still scores 1
    soft = (b == 1).astype(np.float32)
    soft[b == 255] = 1.0
    scores = binary_scores(soft, b)
    assert scores.pixel_accuracy == 1.0 and scores.miou == 1.0 and scores.ap == 1.0
    assert scores.num_valid == int((s.mask != 255).sum())
    # multi-class: predicting garbage on void pixels does not matter
    pred = s.mask.astype(np.int64)
    pred[s.mask == 255] = 7
    m = multiclass_scores(pred, s.mask, num_classes=21)
    assert m.pixel_accuracy == 1.0 and m.miou == 1.0
    assert m.present.sum() == 3  # background, bicycle, bottle


def test_voc_missing_split(tmp_path):
    with pytest.raises(FileNotFoundError):
        VOCSegmentation(tmp_path)


# ------------------------------------------------------------------------------------------
# ImageNet-Segmentation (HDF5 fixture in the layout of gtsegs_ijcv.mat)
# ------------------------------------------------------------------------------------------

FIXTURE_IDS = ["n02085936_1234", "n01440764_77", "n03126707_5", "n02012849_9"]
FIXTURE_SIZES = [(5, 7), (6, 4), (3, 3), (4, 9)]  # (H, W), deliberately non-square
FIXTURE_LABELS = {
    "n02085936": "Maltese dog, Maltese terrier, Maltese",
    "n01440764": "tench, Tinca tinca",
    "n03126707": "crane",
    "n02012849": "crane",
}


def _fixture_arrays(k: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([yy * 10 + xx, 100 + yy, 200 + xx + k], axis=-1).astype(np.uint8)
    mask = ((yy + 2 * xx) % 3 == 0).astype(np.uint8)
    mask[0, -1] = 1  # asymmetric: catches a missing transpose
    mask[-1, 0] = 0
    return img, mask


def _write_gtsegs(path: Path) -> None:
    """Write a small MATLAB v7.3-style file: struct ``value`` of N x 1 cell fields."""
    import h5py
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        n = len(FIXTURE_IDS)
        img_refs = np.empty((n, 1), dtype=h5py.ref_dtype)
        gt_refs = np.empty((n, 1), dtype=h5py.ref_dtype)
        id_refs = np.empty((n, 1), dtype=h5py.ref_dtype)
        for k, (image_id, (h, w)) in enumerate(zip(FIXTURE_IDS, FIXTURE_SIZES, strict=True)):
            img, mask = _fixture_arrays(k, h, w)
            # MATLAB writes column-major: an H x W x 3 array appears as (3, W, H) in HDF5
            d_img = refs.create_dataset(f"img{k}", data=img.transpose(2, 1, 0))
            d_mask = refs.create_dataset(f"mask{k}", data=mask.T)
            cell = refs.create_dataset(f"cell{k}", data=np.array([[d_mask.ref]],
                                                                 dtype=h5py.ref_dtype))
            chars = np.array([ord(c) for c in image_id], dtype=np.uint16).reshape(-1, 1)
            d_id = refs.create_dataset(f"id{k}", data=chars)
            d_id.attrs["MATLAB_class"] = np.bytes_(b"char")
            img_refs[k, 0], gt_refs[k, 0], id_refs[k, 0] = d_img.ref, cell.ref, d_id.ref
        value = f.create_group("value")
        value.create_dataset("img", data=img_refs)
        value.create_dataset("gt", data=gt_refs)
        value.create_dataset("id", data=id_refs)


@pytest.fixture()
def gtsegs(tmp_path: Path) -> Path:
    path = tmp_path / "gtsegs_ijcv.mat"
    _write_gtsegs(path)
    return path


def test_imagenet_seg_reads_images_masks_and_names(gtsegs, tmp_path):
    ds = ImageNetSegmentation(gtsegs, synset_labels=FIXTURE_LABELS, wordnet_dir=tmp_path)
    assert len(ds) == len(FIXTURE_IDS) and ds.num_total == 4
    samples = list(ds)
    for k, s in enumerate(samples):
        h, w = FIXTURE_SIZES[k]
        img, mask = _fixture_arrays(k, h, w)
        assert s.id == FIXTURE_IDS[k]
        assert s.image.mode == "RGB" and s.image.size == (w, h)
        np.testing.assert_array_equal(np.asarray(s.image), img)
        np.testing.assert_array_equal(s.mask, mask)
        assert s.class_indices == [1]
        assert s.meta["wnid"] == FIXTURE_IDS[k].split("_")[0]
    assert [s.class_names for s in samples] == [["dog"], ["fish"], ["crane"], ["bird"]]
    assert samples[0].meta["label"] == "Maltese dog"
    # the binary mask feeds the binary metrics directly
    b = samples[0].binary_mask()
    assert binary_scores(b.astype(float), b).miou == 1.0
    ds.close()


def test_imagenet_seg_shards_limit_pickle(gtsegs, tmp_path):
    kw = dict(synset_labels=FIXTURE_LABELS, wordnet_dir=tmp_path)
    shards = [ImageNetSegmentation(gtsegs, shard_index=i, num_shards=3, **kw) for i in range(3)]
    ids = [[s.id for s in sh] for sh in shards]
    assert ids == [[FIXTURE_IDS[0], FIXTURE_IDS[3]], [FIXTURE_IDS[1]], [FIXTURE_IDS[2]]]
    lim = ImageNetSegmentation(gtsegs, limit=3, shard_index=0, num_shards=2, **kw)
    assert [s.id for s in lim] == [FIXTURE_IDS[0], FIXTURE_IDS[2]]
    clone = pickle.loads(pickle.dumps(lim))  # open file handle is not pickled
    assert clone[1].id == FIXTURE_IDS[2]


def test_imagenet_seg_label_sources(gtsegs, tmp_path):
    words = tmp_path / "synset_words.txt"
    words.write_text("".join(f"{k} {v}\n" for k, v in FIXTURE_LABELS.items()))
    assert read_synset_words(words)["n01440764"] == "tench, Tinca tinca"
    ds = ImageNetSegmentation(gtsegs, synset_labels=words, wordnet_dir=tmp_path, limit=2)
    assert [s.class_names[0] for s in ds] == ["dog", "fish"]
    # no source at all: the wnid is used, with a warning
    ds = ImageNetSegmentation(gtsegs, wordnet_dir=tmp_path, limit=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ds[0].class_names == ["n02085936"]
    assert caught


def _write_data_noun(path: Path) -> dict[str, str]:
    """A WordNet data.noun fragment whose offsets are true byte offsets; returns wnid->lemma."""
    out = b"  1 This software and database is being provided to you, the LICENSEE, by\n"
    entries = [("Maltese_dog 0 Maltese_terrier 0 Maltese 0", 3, "Maltese dog"),
               ("tench 0 Tinca_tinca 0", 2, "tench")]
    result = {}
    for words, count, first in entries:
        offset = len(out)
        line = f"{offset:08d} 05 n {count:02x} {words} 001 @ 02085374 n 0000 | a gloss  \n"
        out += line.encode()
        result[f"n{offset:08d}"] = first
    path.write_bytes(out)
    return result


def test_wordnet_reader(tmp_path):
    expected = _write_data_noun(tmp_path / "data.noun")
    wn = WordNetNouns(tmp_path / "data.noun")
    for wnid, lemma in expected.items():
        assert wn.lemmas(wnid)[0] == lemma
    assert wn.lemmas("n00000001") is None  # offset not at a line start
    labeler = SynsetLabeler(wordnet_dir=tmp_path)
    first = next(iter(expected))
    assert labeler.label(first) == "Maltese dog"
    assert simple_noun(labeler.label(first), first) == "dog"


def test_simple_noun_table_and_heuristic():
    assert simple_noun("Maltese dog, Maltese terrier, Maltese") == "dog"
    assert simple_noun("golden retriever") == "dog"
    assert simple_noun("tabby, tabby cat") == "cat"
    assert simple_noun("airliner") == "airplane"
    assert simple_noun("Cardigan") == "dog" and simple_noun("cardigan") == "sweater"
    assert simple_noun("crane", "n02012849") == "bird"
    assert simple_noun("crane", "n03126707") == "crane"
    # heuristic: last word of the first synonym, lowercased
    assert simple_noun("tiger shark, Galeocerdo cuvieri") == "shark"
    assert simple_noun("Some_Unknown Thing, other") == "thing"
