"""ConceptMaps (core): access, segmentation, upsampling, layer subsets, replace, shape checks, views."""

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


def test_for_layers():
    maps = make_maps()
    assert torch.allclose(maps.for_layers([2]).tensor, maps.tensor * 0.5)
    assert torch.allclose(maps.for_layers([2, 3]).tensor, maps.tensor)
    with pytest.raises(ValueError, match="not among the recorded layers"):
        maps.for_layers([7])


def test_shape_validation():
    with pytest.raises(ValueError, match="2 concept names for 3 maps"):
        ConceptMaps(tensor=torch.zeros(1, 3, 2, 2), concepts=["a", "b"], layers=[0])


def test_replace_copies_lists_and_drops_attachments():
    maps = make_maps()
    maps.image = Image.new("RGB", (6, 4))
    copy = maps.replace(tensor=maps.tensor * 2)
    assert copy.image is None and copy.others == {} and copy.layers == maps.layers
    copy.layers.append(9)
    assert maps.layers == [2, 3]


def test_views_are_registered_by_the_package():
    from concept_attention.core import maps as core_maps

    assert {"to_pil", "overlay", "figure", "save", "load", "png"} <= set(core_maps._VIEWS)
    missing = core_maps._VIEWS.pop("figure")
    try:
        with pytest.raises(RuntimeError, match="import concept_attention"):
            make_maps().figure()
    finally:
        core_maps._VIEWS["figure"] = missing


def test_jupyter_shows_a_png_only_with_an_image():
    maps = make_maps()
    assert maps._repr_png_() is None
    maps.image = Image.new("RGB", (60, 40), (10, 200, 30))
    assert maps._repr_png_().startswith(b"\x89PNG")

