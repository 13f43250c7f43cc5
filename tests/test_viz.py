"""Pictures (viz.py): heat maps, overlays, figures, colour scales and the concept palette."""

import numpy as np
import pytest
import torch
from PIL import Image

from concept_attention import ConceptMaps
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
    peak = np.unravel_index(maps.upsample((60, 90))[0, 2].argmax().item(), (60, 90))
    assert np.abs(full[peak] - heat[peak]).max() <= 1  # fully covered where the map peaks
    with pytest.raises(ValueError, match="alpha"):
        maps.overlay(image, "sky", alpha=2)


def test_to_pil_nearest_shows_the_raw_patch_grid():
    maps = make_maps()
    blocky = np.asarray(maps.to_pil("dog", size=(40, 60), interpolation="nearest"))
    grid = np.asarray(maps.to_pil("dog"))
    assert np.array_equal(blocky[::10, ::10], grid)  # every 10×10 block is one patch's colour
    assert np.array_equal(blocky, np.repeat(np.repeat(grid, 10, axis=0), 10, axis=1))
    with pytest.raises(ValueError, match="interpolation"):
        maps.to_pil("dog", size=(40, 60), interpolation="cubic-ish")


def by_label(figure, prefix):
    return [axis for axis in figure.axes if axis.get_label().startswith(prefix)]


def test_figure_has_a_panel_per_concept_and_a_segmentation():
    import matplotlib.pyplot as plt

    maps = make_maps()
    figure = maps.figure(Image.new("RGB", (60, 40), (10, 200, 30)))
    assert [axis.get_title() for axis in by_label(figure, "image")] == ["image"]
    assert [axis.get_title() for axis in by_label(figure, "map:output:")] == ["dog", "traffic light", "sky"]
    assert [axis.get_title() for axis in by_label(figure, "segmentation")] == ["segmentation"]
    assert len(by_label(figure, "colorbar:output")) == 1
    plt.close(figure)
    with pytest.raises(ValueError, match="needs the image"):
        maps.figure()
    with pytest.raises(ValueError, match="normalization"):
        maps.figure(Image.new("RGB", (60, 40)), normalize="bogus")


def legend_entries(figure):
    """(names, RGB uint8 colours) of the figure's legend."""
    (legend,) = [axis.get_legend() for axis in figure.axes if axis.get_legend() is not None]
    handles = getattr(legend, "legend_handles", None) or legend.legendHandles
    colours = [tuple(int(round(255 * c)) for c in handle.get_facecolor()[:3]) for handle in handles]
    return [text.get_text() for text in legend.get_texts()], colours


def rendered(figure):
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3]


def panel_pixels(figure, pixels, axis, inset=3):
    """The pixels inside ``axis`` (a few pixels in from its edges)."""
    box = axis.get_window_extent()
    height = pixels.shape[0]
    top, bottom = int(np.ceil(height - box.y1)) + inset, int(np.floor(height - box.y0)) - inset
    left, right = int(np.ceil(box.x0)) + inset, int(np.floor(box.x1)) - inset
    return pixels[top:bottom, left:right].reshape(-1, 3)


def test_segmentation_panels_use_exactly_the_legend_colours():
    import matplotlib.pyplot as plt

    maps = make_maps(batch=1, concepts=("dog", "red", "grass", "sky", "blue"), h=8, w=8, seed=2)
    maps.others = {"cross_attention": make_maps(batch=1, concepts=maps.concepts, h=8, w=8, seed=3)
                   .replace(space="cross_attention")}
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8))
    figure = maps.figure(image)
    names, colours = legend_entries(figure)
    assert names == maps.concepts
    pixels = rendered(figure)
    panels = [axis for axis in figure.axes if axis.get_title().startswith("segmentation")]
    assert len(panels) == 2
    for axis in panels:
        seen = {tuple(int(v) for v in colour) for colour in np.unique(panel_pixels(figure, pixels, axis), axis=0)}
        assert seen <= set(colours), sorted(seen - set(colours))[:5]
        assert len(seen) >= 2  # the panel really shows several regions
    plt.close(figure)


def test_fifty_concepts_wrap_with_a_complete_legend_of_distinct_colours():
    import matplotlib.pyplot as plt

    names = [f"concept {i}" for i in range(50)]
    maps = make_maps(batch=1, concepts=names, h=4, w=4)
    figure = maps.figure(Image.new("RGB", (32, 32), (90, 90, 90)))
    width, height = figure.get_size_inches() * 110  # the dpi maps.save writes figure.png at
    assert width <= 2500, (width, height)
    legend_names, colours = legend_entries(figure)
    assert legend_names == names
    assert len(set(colours)) == 50
    plt.close(figure)


def peaked_maps() -> ConceptMaps:
    """Three concepts whose maps peak at 0.244 ("low") and 0.418 ("high")."""
    low = torch.full((4, 4), 0.05)
    low[1, 1] = 0.244
    high = torch.full((4, 4), 0.05)
    high[2, 3] = 0.418
    rest = 1.0 - low - high
    return ConceptMaps(tensor=torch.stack([low, high, rest])[None], concepts=["low", "high", "rest"], layers=[0])


def top_colour(maps, concept, **options):
    picture = np.asarray(maps.to_pil(concept, **options)).reshape(-1, 3)
    return tuple(picture[maps[concept][0].flatten().argmax()])


def test_one_colour_scale_per_figure_with_a_colour_bar():
    import matplotlib.pyplot as plt

    maps = peaked_maps()
    assert top_colour(maps, "low") != top_colour(maps, "high")  # shared scale: 0.244 is not 0.418
    assert top_colour(maps, "low", normalize="per_concept") == top_colour(maps, "high", normalize="per_concept")
    image = Image.new("RGB", (16, 16), (128, 128, 128))
    figure = maps.figure(image)
    (bar,) = by_label(figure, "colorbar")
    assert bar.get_ylim() == pytest.approx((0.0, float(maps.tensor.max())), abs=1e-6)  # reads real values
    drawn = [np.asarray(axis.get_images()[0].get_array()) for axis in by_label(figure, "map:")]
    assert not np.array_equal(drawn[0].max(axis=(0, 1)), drawn[1].max(axis=(0, 1)))
    plt.close(figure)
    figure = maps.figure(image, normalize="per_concept")
    texts = [text.get_text() for text in figure.texts] + [axis.get_title() for axis in figure.axes]
    assert any("per-map" in text for text in texts)
    assert by_label(figure, "map:")[0].get_title().startswith("low (0.05–0.24)")
    plt.close(figure)


def test_a_models_notice_is_written_above_its_figure():
    import matplotlib.pyplot as plt

    maps, image = make_maps(), Image.new("RGB", (60, 40))
    plain = maps.figure(image)
    maps.meta["model_notice"] = "trained maps: blocks 1 and 2 were a training target"
    noted = maps.figure(image)
    both = maps.figure(image, normalize="per_concept")
    always = [t.get_text() for t in plain.texts]
    added = lambda figure: [t for t in figure.texts if t.get_text() not in always]
    assert [t.get_text() for t in added(noted)] == ["trained maps: blocks 1 and 2 were a training target"]
    assert [t.get_text()[:8] for t in added(both)] == ["trained ", "per-map "]
    assert noted.get_size_inches()[1] > plain.get_size_inches()[1]  # room made for the line
    heights = [t.get_position()[1] for t in added(both)]
    assert heights[0] > heights[1]  # one line under the other
    for figure in (plain, noted, both):
        plt.close(figure)


def test_colour_word_concepts_are_drawn_in_their_colour():
    import matplotlib.pyplot as plt

    maps = make_maps(batch=1, concepts=("dog", "red", "blue", "green", "tree"))
    figure = maps.figure(Image.new("RGB", (32, 32)), compare=None)
    names, colours = legend_entries(figure)
    plt.close(figure)
    red, blue, green = (np.array(colours[names.index(name)], dtype=int) for name in ("red", "blue", "green"))
    assert red[0] > red[1] + 80 and red[0] > red[2] + 80
    assert blue[2] > blue[0] + 80 and blue[2] > blue[1] + 40
    assert green[1] > green[0] + 60 and green[1] > green[2] + 60
    assert len(set(colours)) == len(colours)


def test_palette_shades_repeated_colour_words_and_never_repeats():
    from concept_attention.viz import colour_distance, concept_palette, label_palette

    palette = concept_palette(["red car", "red apple", "dark blue", "reddish dog", "sky"]).astype(int)
    for colour in palette[[0, 1, 3]]:
        assert colour[0] > colour[1] + 60 and colour[0] > colour[2] + 60  # all three reddish
    assert palette[2][2] > palette[2][0] + 40
    assert len({tuple(c) for c in palette}) == 5
    many = label_palette(120)
    assert len({tuple(c) for c in many.tolist()}) == 120
    assert min(colour_distance(many[i], np.delete(many, i, axis=0)).min() for i in range(120)) > 3
    things = concept_palette(["sky", "grass", "green", "circle"]).astype(int)
    assert things[0][2] > things[0][0] + 60  # sky: bluish
    for colour in things[1:3]:  # grass and the colour word green: both green, not the same green
        assert colour[1] > colour[0] + 50 and colour[1] > colour[2] + 50
    assert tuple(things[1]) != tuple(things[2])
