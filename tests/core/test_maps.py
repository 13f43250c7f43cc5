"""ConceptMaps: access, segmentation, upsampling, colouring, overlays, save/load."""

import numpy as np
import pytest
import torch
from PIL import Image

from concept_attention import ConceptMaps


def make_maps(batch=2, concepts=("dog", "traffic light", "sky"), h=4, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensor = torch.rand(batch, len(concepts), h, w, generator=g).softmax(dim=1)
    per_layer = torch.stack([tensor * 0.5, tensor * 1.5])
    return ConceptMaps(tensor=tensor, concepts=list(concepts), layers=[2, 3], timesteps=[1.0, 0.5],
                       steps=[0, 1], per_layer=per_layer, meta={"prompt": "a dog"})


def test_access_and_segment():
    maps = make_maps()
    assert maps["dog"].shape == (2, 4, 6)
    assert torch.equal(maps["sky"], maps[2]) and torch.equal(maps[-1], maps[2])
    with pytest.raises(KeyError, match="unknown concept 'cat'"):
        maps["cat"]
    seg = maps.segment()
    assert seg.dtype == torch.long and seg.shape == (2, 4, 6)
    assert torch.equal(seg, maps.tensor.argmax(1))
    assert maps.grid == (4, 6) and len(maps) == 3


def test_upsample_and_normalize():
    maps = make_maps()
    up = maps.upsample((40, 60))
    assert up.shape == (2, 3, 40, 60)
    # bilinear upsampling keeps values inside the original range
    assert up.min() >= maps.tensor.min() - 1e-6 and up.max() <= maps.tensor.max() + 1e-6
    per = maps.normalized("per_concept")
    assert torch.allclose(per.amax(dim=(2, 3)), torch.ones(2, 3))
    glob = maps.normalized("global")
    assert torch.allclose(glob.amax(dim=(1, 2, 3)), torch.ones(2))
    with pytest.raises(ValueError, match="normalization"):
        maps.normalized("bogus")


def test_to_pil_and_overlay_sizes():
    maps = make_maps()
    heat = maps.to_pil("dog")
    assert heat.size == (6, 4) and heat.mode == "RGB"
    assert maps.to_pil("dog", size=(20, 30)).size == (30, 20)
    image = Image.new("RGB", (90, 60), (10, 200, 30))
    over = maps.overlay(image, "sky", batch_index=1, alpha=0.4)
    assert over.size == (90, 60)
    # alpha 0 returns the image, alpha 1 the heat map
    assert np.array_equal(np.asarray(maps.overlay(image, "sky", alpha=0.0)), np.asarray(image))
    full = np.asarray(maps.overlay(image, "sky", alpha=1.0)).astype(int)
    heat = np.asarray(maps.to_pil("sky", size=(60, 90))).astype(int)
    peak = np.unravel_index(maps.upsample((60, 90))[0, 2].argmax(), (60, 90))
    assert np.abs(full[peak] - heat[peak]).max() <= 1  # fully covered where the map peaks
    with pytest.raises(ValueError, match="alpha"):
        maps.overlay(image, "sky", alpha=2)


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


def test_for_layers():
    maps = make_maps()
    assert torch.allclose(maps.for_layers([2]).tensor, maps.tensor * 0.5)
    assert torch.allclose(maps.for_layers([2, 3]).tensor, maps.tensor)
    with pytest.raises(ValueError, match="not among the recorded layers"):
        maps.for_layers([7])


def test_shape_validation():
    with pytest.raises(ValueError, match="2 concept names for 3 maps"):
        ConceptMaps(tensor=torch.zeros(1, 3, 2, 2), concepts=["a", "b"], layers=[0])


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
