"""Video maps: frame mapping, frame averaging, MP4/GIF export (decoded back), generate and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_video_flux2 as tv
from concept_attention import video
from concept_attention.core.maps import ConceptMaps

CONCEPTS = ["dog", "tree", "sky"]


def video_maps(batch=2, frames=3, h=2, w=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    per_layer = torch.rand(2, batch, len(CONCEPTS), frames, h, w, generator=g).softmax(dim=2)
    maps = ConceptMaps(tensor=per_layer.mean(0), concepts=list(CONCEPTS), layers=[2, 3], steps=[0, 1],
                       per_layer=per_layer)
    maps.others = {"cross_attention": ConceptMaps(tensor=torch.rand(batch, 3, frames, h, w, generator=g),
                                                  concepts=list(CONCEPTS), layers=[2, 3], space="cross_attention")}
    return maps


def rgb_frames(count=9, size=(25, 17)):
    return [Image.new("RGB", size, (20 * i % 255, 100, 200)) for i in range(count)]


# ---------------------------------------------------------------- frames
def test_frame_indices_follow_the_causal_vae_grouping():
    assert video.frame_indices(9, 3) == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert video.frame_indices(49, 13)[:6] == [0, 1, 1, 1, 1, 2] and video.frame_indices(49, 13)[-1] == 12
    assert video.frame_indices(3, 3) == [0, 1, 2]
    assert video.frame_indices(4, 3) == [0, 0, 1, 2]  # not causal-shaped: proportional
    assert video.frame_indices(5, 1) == [0] * 5


def test_mean_over_frames_gives_one_map_per_video():
    maps = video_maps()
    assert maps.is_video and maps.grid == (3, 2, 3)
    single = maps.mean_over_frames()
    assert not single.is_video
    assert single.tensor.shape == (2, 3, 2, 3)
    assert torch.allclose(single.tensor, maps.tensor.mean(dim=2))
    assert torch.allclose(single.tensor.sum(1), torch.ones(2, 2, 3), atol=1e-6)
    assert torch.allclose(single.per_layer, maps.per_layer.mean(dim=3))
    assert torch.allclose(single.others["cross_attention"].tensor, maps.others["cross_attention"].tensor.mean(2))
    assert single.meta["frames_averaged"] == 3
    assert torch.allclose(single.for_layers([3]).tensor, maps.for_layers([3]).tensor.mean(2))
    with pytest.raises(ValueError, match="video maps"):
        single.mean_over_frames()


# ---------------------------------------------------------------- export
def needs_mp4(test):
    """MP4 tests need imageio[ffmpeg], which the test extra installs: fail loudly if it is missing."""

    def checked(*args, **kwargs):
        assert video.has_mp4_writer(), 'imageio[ffmpeg] (the "video" extra, part of ".[test]") is not installed'
        return test(*args, **kwargs)

    checked.__name__ = test.__name__
    checked.__signature__ = __import__("inspect").signature(test)
    return checked


@needs_mp4
def test_save_writes_decodable_mp4_per_concept_and_contact_sheet(tmp_path):
    maps = video_maps()
    maps.frames = rgb_frames()
    out = maps.save(tmp_path / "run", batch_index=1)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["video_files"]["dog"] == "dog.mp4" and meta["shape"] == [2, 3, 3, 2, 3]
    for concept in CONCEPTS:
        decoded = video.read_video(out / f"{concept}.mp4")
        assert decoded.shape == (9, 18, 26, 3)  # all frames, size rounded up to even for H.264
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.width > 4 * 100 and sheet.height > 4 * 80  # video row + 3 concept rows, 4 columns
    loaded = ConceptMaps.load(out)
    assert torch.equal(loaded.tensor, maps.tensor) and loaded.is_video


@needs_mp4
def test_heat_follows_the_maps_over_frames(tmp_path):
    tensor = torch.zeros(1, 2, 3, 2, 2)
    tensor[0, 0, :, 0, 0] = 1.0  # "dog" lives top-left in every frame ...
    tensor[0, 0, 2] = 0.0
    tensor[0, 0, 2, 1, 1] = 1.0  # ... but bottom-right in the last latent frame
    tensor[0, 1] = 1.0 - tensor[0, 0]
    maps = ConceptMaps(tensor=tensor, concepts=["dog", "sky"], layers=[0])
    frames = video.heat_frames(maps, "dog", cmap="gray")
    assert len(frames) == 3 and frames[0].shape == (32, 32, 3)
    assert frames[0][4, 4, 0] > 200 and frames[0][28, 28, 0] < 50
    assert frames[2][4, 4, 0] < 50 and frames[2][28, 28, 0] > 200
    path = video.write_video(tmp_path / "dog.mp4", frames)
    decoded = video.read_video(path)
    assert decoded.shape == (3, 32, 32, 3)
    assert decoded[2, 28, 28, 0] > 150 and decoded[2, 4, 4, 0] < 100


def test_gif_fallback_without_the_video_extra(tmp_path, monkeypatch):
    monkeypatch.setattr(video, "has_mp4_writer", lambda: False)
    maps = video_maps(batch=1)
    maps.frames = rgb_frames(count=5, size=(24, 16))
    with pytest.warns(UserWarning, match="imageio"):
        out = maps.save(tmp_path)
    decoded = video.read_video(out / "sky.gif")
    assert decoded.shape == (5, 16, 24, 3)
    with pytest.raises(ImportError, match="video"):
        video.write_video(tmp_path / "x.mp4", [np.zeros((4, 4, 3), np.uint8)])


def test_gif_export_without_source_frames(tmp_path):
    maps = video_maps(batch=1)
    out = maps.save(tmp_path, video_format="gif")
    decoded = video.read_video(out / "tree.gif")
    assert decoded.shape == (3, 2 * video.PIXELS_PER_PATCH, 3 * video.PIXELS_PER_PATCH, 3)
    assert (out / "contact_sheet.png").is_file()
    with pytest.raises(ValueError, match="video_format"):
        maps.save(tmp_path / "bad", video_format="avi")


def test_to_frames_accepts_arrays_and_tensors():
    array = np.random.default_rng(0).random((4, 8, 10, 3)).astype(np.float32)
    assert [f.size for f in video.to_frames(array)] == [(10, 8)] * 4
    assert len(video.to_frames(torch.rand(4, 3, 8, 10))) == 4
    with pytest.raises(ValueError, match="frames, H, W"):
        video.to_frames(np.zeros((8, 10, 3)))


# ---------------------------------------------------------------- generate and CLI with a video pipeline
@pytest.fixture(scope="module")
def cog_dir(tmp_path_factory):
    pipe = tv.cogvideox_pipeline(rope=True)
    directory = tmp_path_factory.mktemp("cog")
    pipe.save_pretrained(directory)
    return directory


def test_generate_and_cli_write_videos(cog_dir, tmp_path, capsys):
    from concept_attention.cli import main
    from concept_attention.generation import generate
    from concept_attention.loading import load_pipeline

    pipe = load_pipeline(cog_dir)
    maps = generate(pipe, "a dog by a tree", ["dog", "tree", "sky"], steps=2)
    assert maps.is_video and maps.tensor.shape == (1, 3, 3, 4, 4)  # 9 frames of 32x32 -> 3 x 4 x 4 tokens
    assert len(maps.frames) == 9 and maps.frames[0].size == (32, 32) and maps.image is None
    assert maps.meta["num_frames"] == 9
    code = main(["generate", "a dog by a tree", "--model", str(cog_dir), "--concepts", "dog,tree",
                 "--steps", "2", "--out", str(tmp_path / "cli")])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "cli" / "meta.json").read_text())
    written = meta["video_files"]["dog"]  # dog.mp4, or dog.gif without the "video" extra
    assert written == ("dog.mp4" if video.has_mp4_writer() else "dog.gif")
    decoded = video.read_video(tmp_path / "cli" / written)
    assert decoded.shape == (9, 32, 32, 3)
    assert (tmp_path / "cli" / "contact_sheet.png").is_file()
