"""The web app on a video model (tiny CogVideoX): frame choices, video uploads, heat-map videos, errors."""

from __future__ import annotations

import socket
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tiny_video_flux2 as tv
from concept_attention import video
from concept_attention.app import ConceptApp, UserInputError, build_app
from concept_attention.generation import generate
from concept_attention.options import checked_num_frames

CONCEPTS = ["dog", "tree", "sky"]


@pytest.fixture(scope="module")
def cog():
    pipe = tv.cogvideox_pipeline(seed=3, rope=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def app(cog):
    return ConceptApp(cog)


def write_clip(path: Path, frames: int = 11, width: int = 48, height: int = 32) -> Path:
    pixels = (np.random.default_rng(0).random((frames, height, width, 3)) * 255).astype(np.uint8)
    return video.write_video(path, list(pixels), fps=10.0)


def check_views(views: tuple, concepts: list[str], frames: int, shown: tuple[int, int]) -> None:
    clip, gallery, sheet, cross, archive = views
    assert video.read_video(clip).shape[0] == frames  # the video shown has every frame
    assert [caption for _, caption in gallery] == concepts
    for path, _ in gallery:
        heat = video.read_video(path)
        assert heat.shape[:3] == (frames, *shown)  # small frames enlarged for the page
    assert [caption for _, caption in cross] == [f"{c} (cross-attention)" for c in concepts]
    assert isinstance(sheet, Image.Image) and sheet.width > sheet.height / 2
    names = zipfile.ZipFile(archive).namelist()
    assert {"maps.npz", "meta.json", "contact_sheet.png"} <= set(names)
    assert sum(name.endswith(".mp4") for name in names) == len(concepts)


def test_the_app_knows_it_serves_a_video_model(app, cog):
    assert app.video and app.frame_counts() == [5, 9]  # sample_frames 9, causal VAE ratio 4
    assert app.adapter.native_frame_size(cog) == (32, 32)  # 8 latents x VAE scale 4


def test_generate_a_video_with_a_chosen_frame_count(app):
    views = app.run_generate("a dog by a tree", CONCEPTS, 0, 2, 24, 16, 9)
    check_views(views, CONCEPTS, 9, (160, 240))  # 16 x 24 frames, x10


def test_frames_that_need_no_enlarging_are_encoded_once(app):
    clip, gallery, sheet, cross, archive = app.run_generate("a dog", ["dog", "sky"], 0, 1, 256, 256, 5)
    for path, _ in gallery:  # the page shows the zip's own heat-map videos
        assert Path(path).parent.name == "concept-maps"
        assert video.read_video(path).shape[1:3] == (256, 256)
    assert all(Path(path).parent.name == "cross" for path, _ in cross)  # not in the zip: made for the page
    assert not (Path(archive).parent / "shown" / "maps").exists()
    assert sheet.width > sheet.height / 2


def test_explain_an_uploaded_video(app, tmp_path):
    upload = write_clip(tmp_path / "clip.mp4")
    views = app.run_explain(str(upload), ["dog", "sky"], "", 0.5, 1, 0, 3, 0)  # 0: all that fit (9 of 11)
    check_views(views, ["dog", "sky"], 9, (160, 240))  # 32 x 48, x5
    views = app.run_explain(str(upload), ["dog"], "", 0.5, 1, 2, 3, 5)
    check_views(views, ["dog"], 5, (160, 240))


def test_user_mistakes_are_messages(app, tmp_path):
    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_text("not a video")
    with pytest.raises(UserInputError, match="Cannot use this upload"):
        app.run_explain(str(not_a_video), ["dog"], "", 0.5, 1, 0, 3, 0)
    with pytest.raises(UserInputError, match="Upload a video first"):
        app.run_explain(None, ["dog"], "", 0.5, 1, 0, 3, 0)
    short = write_clip(tmp_path / "short.mp4", frames=3)
    with pytest.raises(UserInputError, match="needs at least 5"):
        app.run_explain(str(short), ["dog"], "", 0.5, 1, 0, 3, 0)
    with pytest.raises(UserInputError, match="only 11 frames"):
        app.run_explain(str(write_clip(tmp_path / "clip.mp4")), ["dog"], "", 0.5, 1, 0, 3, 13)
    with pytest.raises(UserInputError, match="num_frames=6 is not accepted"):
        app.run_generate("a dog", ["dog"], 0, 2, 24, 16, 6)


def test_num_frames_is_checked_and_only_for_video_models(cog, flux_pipe):
    assert checked_num_frames(cog, 9) == 9
    with pytest.raises(ValueError, match="5, 9, 13, 17"):
        checked_num_frames(cog, 7)
    with pytest.raises(ValueError, match="num_frames is for video models"):
        generate(flux_pipe, "a dog", ["dog"], steps=1, num_frames=5)


def test_the_page_serves_video_tabs_over_the_api(cog, tmp_path):
    from gradio_client import Client, handle_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build_app(cog)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        tabs = [c.get("props", {}).get("label") for c in client.config["components"] if c.get("type") == "tabitem"]
        assert {"Generate a video", "Explain a video"} <= set(tabs)
        clip, gallery, sheet, cross, archive = client.predict(
            prompt="a dog", concepts=["dog", "sky"], seed=0, steps=2, width=24, height=16, frames=9,
            api_name="/generate")
        assert video.read_video(clip).shape[0] == 9
        assert [item["caption"] for item in gallery] == ["dog", "sky"] and len(cross) == 2
        upload = write_clip(tmp_path / "up.mp4")
        result = client.predict(file=handle_file(str(upload)), concepts=["tree"], prompt="", timestep=0.5, samples=1,
                                layer_start=0, layer_end=3, frames=9, api_name="/explain")
        assert [item["caption"] for item in result[1]] == ["tree"]
        with pytest.raises(Exception, match="6 is not in the list of choices"):  # the page offers valid counts only
            client.predict(prompt="a dog", concepts=["dog"], seed=0, steps=2, width=24, height=16, frames=6,
                           api_name="/generate")
    finally:
        demo.close()
