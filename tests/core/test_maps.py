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
