"""Pictures (viz.py): heat maps, overlays, figures."""

import numpy as np
import pytest
from PIL import Image

from core.test_maps import make_maps


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


def test_figure_has_a_panel_per_concept_and_a_segmentation():
    import matplotlib.pyplot as plt

    maps = make_maps()
    figure = maps.figure(Image.new("RGB", (60, 40), (10, 200, 30)))
    titles = [axis.get_title() for axis in figure.axes]
    assert titles[:5] == ["image", "dog", "traffic light", "sky", "segmentation"]
    plt.close(figure)
    with pytest.raises(ValueError, match="needs the image"):
        maps.figure()

