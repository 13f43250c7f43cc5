"""explain(): image inputs of every kind, size policy, early exit, batched samples, errors."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from concept_attention import explain, load_image
from concept_attention.options import model_size


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny.flux_pipeline(seed=2)
    pipe.default_sample_size = 16  # native 32 px for the tiny model (vae scale 2)
    pipe.concept_attention_defaults = {"max_sequence_length": 16}
    return pipe


def picture(mode: str, size=(40, 24)) -> Image.Image:
    rgb = Image.fromarray((np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype("uint8"))
    if mode == "P":
        return rgb.convert("P", palette=Image.ADAPTIVE)
    return rgb.convert(mode)


def test_size_policy():
    assert model_size(40, 24, 32, 4) == (52, 32)  # shorter side -> 32, long side 53.3 -> 52
    assert model_size(1000, 1000, 1024, 16) == (1024, 1024)
    assert model_size(1920, 1080, 1024, 16) == (1824, 1024)
    assert model_size(3, 900, 32, 4) == (32, 9600)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK"])
@pytest.mark.parametrize("size", [(32, 32), (40, 24)])
def test_every_mode_and_shape_gives_the_right_grid(pipe, mode, size):
    maps = explain(pipe, picture(mode, size), ["dog", "sky"], num_samples=2)
    width, height = model_size(*size, 32, 4)
    assert maps.tensor.shape == (1, 2, height // 4, width // 4)
    assert maps.meta["original_size"] == list(size) and maps.meta["model_size"] == [width, height]
    assert maps.image.size == size and maps.image.mode == "RGB"
    assert maps.upsample(size[::-1]).shape == (1, 2, size[1], size[0])
    assert torch.allclose(maps.tensor.sum(1), torch.ones(1, height // 4, width // 4), atol=1e-5)


def test_paths_arrays_tensors_and_exif(tmp_path, pipe):
    image = picture("RGB", (40, 24))
    path = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    image.save(path, exif=exif)
    assert load_image(path).size == (24, 40)
    array = np.asarray(image)
    assert load_image(array).size == (40, 24)
    assert load_image(array.astype(np.float32) / 255.0).size == (40, 24)
    assert load_image(torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255).size == (40, 24)
    assert load_image(array[..., 0]).mode == "RGB"
    maps = explain(pipe, path, ["dog", "sky"], num_samples=1)
    assert maps.meta["original_size"] == [24, 40]


def test_bad_inputs(tmp_path, pipe):
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match="cannot read .*broken.png as an image"):
        explain(pipe, corrupt, ["dog"])
    with pytest.raises(FileNotFoundError, match="no image file"):
        explain(pipe, tmp_path / "missing.jpg", ["dog"])
    with pytest.raises(ValueError, match="empty"):
        explain(pipe, np.zeros((0, 5, 3), dtype=np.uint8), ["dog"])
    with pytest.raises(TypeError, match="cannot explain an image of type int"):
        explain(pipe, 42, ["dog"])
    with pytest.raises(ValueError, match="timestep"):
        explain(pipe, picture("RGB"), ["dog"], timestep=1.5)
    with pytest.raises(ValueError, match="num_samples"):
        explain(pipe, picture("RGB"), ["dog"], num_samples=0)
    with pytest.raises(ValueError, match="multiples of 4"):
        explain(pipe, picture("RGB"), ["dog"], size=(30, 32))
    truncated = io.BytesIO()
    picture("RGB", (64, 64)).save(truncated, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(truncated.getvalue()[:200])
    with pytest.raises(ValueError, match="cannot read"):
        explain(pipe, tmp_path / "cut.jpg", ["dog"])


def test_early_exit_and_batched_samples(pipe):
    transformer = pipe.transformer
    ran, batches = [], []
    handles = [block.register_forward_pre_hook(lambda m, a, i=i: ran.append(i))
               for i, block in enumerate(list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks))]
    handles.append(transformer.norm_out.register_forward_pre_hook(lambda m, a: ran.append("norm_out")))
    handles.append(transformer.x_embedder.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0])))
    try:
        maps = explain(pipe, picture("RGB"), ["dog", "sky"], num_samples=3, layers=[1, 2])
    finally:
        for h in handles:
            h.remove()
    assert ran == [0, 1, 2]  # blocks 3, the single block and the output layers never ran
    assert batches == [3]  # one batched forward for three noise samples
    assert maps.layers == [1, 2]
    # the looped variant gives the same maps
    looped = explain(pipe, picture("RGB"), ["dog", "sky"], num_samples=3, layers=[1, 2], batch_samples=False)
    assert torch.allclose(looped.tensor, maps.tensor, atol=1e-5)


def test_samples_are_averaged_and_seeded(pipe):
    image = picture("RGB")
    one = explain(pipe, image, ["dog", "sky"], num_samples=1, seed=1)
    again = explain(pipe, image, ["dog", "sky"], num_samples=1, seed=1)
    other = explain(pipe, image, ["dog", "sky"], num_samples=1, seed=2)
    assert torch.equal(one.tensor, again.tensor)
    assert not torch.allclose(one.tensor, other.tensor)
    both = explain(pipe, image, ["dog", "sky"], num_samples=2, seed=1, batch_samples=False)
    # sample 1 of seed 1 is the first draw; the average lies between the two draws
    assert both.tensor.shape == (1, 2, 8, 13)


def test_other_spaces_and_save_load_round_trip(tmp_path, pipe):
    from concept_attention import ConceptMaps

    maps = explain(pipe, picture("RGB"), ["dog", "traffic light", "sky"], num_samples=2,
                   space=["output", "cross_attention"])
    assert set(maps.others) == {"cross_attention"}
    out = maps.save(tmp_path / "run")
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["image.png", "dog.png", "dog_overlay.png", "traffic_light.png",
                            "traffic_light_overlay.png", "sky.png", "sky_overlay.png", "segmentation.png",
                            "figure.png", "maps.npz", "meta.json"])
    loaded = ConceptMaps.load(out)
    assert torch.equal(loaded.tensor, maps.tensor)
    assert torch.equal(loaded.others["cross_attention"].tensor, maps.others["cross_attention"].tensor)
    assert loaded.meta["prompt"] == "" and loaded.meta["timestep"] == 0.5 and loaded.meta["seed"] == 0
    assert loaded.image.size == (40, 24)
    import json

    meta = json.loads((out / "meta.json").read_text())
    assert meta["library_version"] and meta["layers"] == maps.layers


def test_figure_panels(pipe):
    import matplotlib

    matplotlib.use("Agg")
    maps = explain(pipe, picture("RGB"), ["dog", "sky", "grass"], num_samples=1, space=["output", "cross_attention"])
    labels = [axis.get_label() for axis in maps.figure().axes]
    assert sum(label.startswith("map:output:") for label in labels) == 3
    assert sum(label.startswith("map:cross_attention:") for label in labels) == 3
    single = [axis.get_label() for axis in maps.figure(compare=None).axes]
    assert sum(label.startswith("map:") for label in single) == 3 and not any("cross_attention" in x for x in single)
    with pytest.raises(ValueError, match="no 'value' maps"):
        maps.figure(compare="value")


def test_timestep_default_comes_from_the_pipeline(pipe):
    image = picture("RGB")
    plain = explain(pipe, image, ["cat", "sky"], num_samples=1)
    assert plain.meta["timestep"] == 0.5
    original = getattr(pipe, "concept_attention_defaults", None)
    pipe.concept_attention_defaults = {**(original or {}), "timestep": 0.8}
    try:
        tuned = explain(pipe, image, ["cat", "sky"], num_samples=1)
        given = explain(pipe, image, ["cat", "sky"], num_samples=1, timestep=0.5)
    finally:
        if original is None:
            del pipe.concept_attention_defaults
        else:
            pipe.concept_attention_defaults = original
    assert tuned.meta["timestep"] == 0.8
    assert not torch.allclose(tuned.tensor, plain.tensor)
    assert torch.equal(given.tensor, plain.tensor)
