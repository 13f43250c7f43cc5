"""Result folders (saving.py): exact round trips of every field, images and videos."""

import numpy as np
import pytest
import torch
from PIL import Image

from concept_attention import ConceptMaps
from concept_attention.saving import concept_stems, jsonable
from core.test_maps import make_maps


def test_save_load_round_trip_is_exact(tmp_path):
    maps = make_maps()
    maps.save(tmp_path / "out")
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["dog.png", "maps.npz", "meta.json", "sky.png", "traffic_light.png"]
    loaded = ConceptMaps.load(tmp_path / "out")
    assert torch.equal(loaded.tensor, maps.tensor) and torch.equal(loaded.per_layer, maps.per_layer)
    assert loaded.concepts == maps.concepts and loaded.layers == maps.layers
    assert loaded.steps == maps.steps and loaded.timesteps == maps.timesteps
    assert loaded.meta["prompt"] == "a dog"
    with pytest.raises(FileNotFoundError, match="no saved ConceptMaps"):
        ConceptMaps.load(tmp_path)


def assert_same_fields(loaded, maps):
    """Every dataclass field of ``loaded`` equals ``maps``'s (images and frames pixel for pixel)."""
    assert torch.equal(loaded.tensor, maps.tensor) and loaded.tensor.dtype == maps.tensor.dtype
    assert (loaded.per_layer is None) == (maps.per_layer is None)
    if maps.per_layer is not None:
        assert torch.equal(loaded.per_layer, maps.per_layer)
    for name in ("concepts", "layers", "timesteps", "steps", "space", "softmax", "meta"):
        assert getattr(loaded, name) == getattr(maps, name), name
    for name in ("image", "frames"):
        want, got = getattr(maps, name), getattr(loaded, name)
        assert (got is None) == (want is None), name
    if maps.image is not None:
        assert loaded.image.size == maps.image.size and loaded.image.mode == "RGB"
        assert np.array_equal(np.asarray(loaded.image), np.asarray(maps.image))
    if maps.frames is not None:
        assert len(loaded.frames) == len(maps.frames)
        for got, want in zip(loaded.frames, maps.frames):
            assert got.size == want.size and got.mode == "RGB"
            assert np.array_equal(np.asarray(got), np.asarray(want))
    assert loaded.others.keys() == maps.others.keys()
    for space, other in maps.others.items():
        assert_same_fields(loaded.others[space], other)


def test_save_load_round_trips_every_field_of_video_maps(tmp_path):
    g = torch.Generator().manual_seed(3)
    per_layer = torch.rand(2, 2, 3, 3, 2, 4, generator=g).softmax(dim=2)  # (layers, B, C, frames, h, w)
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)) for _ in range(9)]
    maps = ConceptMaps(tensor=per_layer.mean(0), concepts=["dog", "traffic light", "sky"], layers=[1, 3],
                       timesteps=[0.875, 0.3333333333333333], steps=[0, 2], space="output", softmax=True,
                       per_layer=per_layer, meta={"prompt": "a dog", "num_frames": 9, "concept_tokens": [1, 2, 1]},
                       frames=frames)
    maps.image = frames[0]
    maps.others = {"cross_attention": ConceptMaps(
        tensor=torch.rand(2, 3, 3, 2, 4, generator=g), concepts=list(maps.concepts), layers=[3], timesteps=[0.875],
        steps=[0], space="cross_attention", softmax=False, per_layer=torch.rand(1, 2, 3, 3, 2, 4, generator=g),
        meta={"prompt": "a dog", "note": "other"})}
    out = maps.save(tmp_path / "video", video_format="gif")
    assert sorted(p.name for p in (out / "frames").iterdir()) == [f"{i:04d}.png" for i in range(9)]
    loaded = ConceptMaps.load(out)
    assert loaded.is_video and loaded.grid == (3, 2, 4)
    assert_same_fields(loaded, maps)
    # frames given to save() (not set on the maps) are the ones written and restored
    maps.frames = None
    given = ConceptMaps.load(maps.save(tmp_path / "given", frames=frames[:5], video_format="gif"))
    assert [np.asarray(f).tolist() for f in given.frames] == [np.asarray(f).tolist() for f in frames[:5]]


def test_save_load_round_trips_every_field_of_image_maps(tmp_path):
    maps = make_maps()
    maps.image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    maps.others = {"value": ConceptMaps(tensor=torch.rand(2, 3, 4, 6), concepts=list(maps.concepts), layers=[3],
                                        space="value", softmax=False, meta={"prompt": "a dog"})}
    loaded = ConceptMaps.load(maps.save(tmp_path / "image", figure=False))
    assert loaded.frames is None
    assert_same_fields(loaded, maps)


def test_file_stems_are_distinct_and_never_reserved():
    assert concept_stems(["dog", "Dog?", "image", "traffic light", "traffic/light"]) == {
        "dog": "dog", "Dog?": "Dog", "image": "image_", "traffic light": "traffic_light",
        "traffic/light": "traffic_light_"}


def test_meta_becomes_json():
    assert jsonable({"a": (1, torch.tensor(2.5)), 3: object}) == {"a": [1, 2.5], "3": str(object)}



def test_pictures_are_written_at_a_readable_size(tmp_path):
    maps = make_maps(batch=1, concepts=("dog", "red", "sky"))
    out = maps.save(tmp_path / "grid")  # no image: the maps' 4×6 grid, enlarged by a whole factor
    assert max(Image.open(out / "dog.png").size) >= 256
    maps.image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    out = maps.save(tmp_path / "image", figure=False)
    for name in ("dog.png", "red.png", "sky_overlay.png", "segmentation.png"):
        assert min(Image.open(out / name).size) >= 256, name
    assert Image.open(out / "image.png").size == (64, 64)  # the image itself is kept as it is
    from concept_attention.viz import concept_palette

    colours = {tuple(c) for c in np.asarray(Image.open(out / "segmentation.png")).reshape(-1, 3).tolist()}
    assert colours <= {tuple(c) for c in concept_palette(maps.concepts).tolist()}
    nearest = np.asarray(Image.open(maps.save(tmp_path / "nearest", figure=False, interpolation="nearest") / "dog.png"))
    assert len(np.unique(nearest.reshape(-1, 3), axis=0)) <= 4 * 6  # one colour per patch
