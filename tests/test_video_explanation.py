"""explain_video(): real videos on tiny CogVideoX pipelines — frames, exactness, samples, errors, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tiny
import tiny_video_flux2 as tv
from concept_attention import ConceptAttention, ConceptMaps, explain, explain_video, video
from concept_attention.options import frame_count, valid_frame_counts

CONCEPTS = ["dog", "tree", "sky"]


def clip(frames: int = 11, width: int = 48, height: int = 32, seed: int = 0) -> np.ndarray:
    """A random (F, H, W, 3) uint8 video; every frame differs."""
    return (np.random.default_rng(seed).random((frames, height, width, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module", params=[False, True], ids=["sincos", "rope"])
def cog(request):
    pipe = tv.cogvideox_pipeline(seed=1, rope=request.param)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def cog_rope():
    pipe = tv.cogvideox_pipeline(seed=2, rope=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------- frame policy
def test_frame_counts_follow_the_causal_vae_and_temporal_patches():
    assert valid_frame_counts(4, 1, 49)[:3] == [5, 9, 13] and valid_frame_counts(4, 1, 49)[-1] == 49
    assert valid_frame_counts(4, 2, 81)[:3] == [5, 13, 21] and valid_frame_counts(4, 2, 81)[-1] == 77  # 1.5: even
    assert valid_frame_counts(4, 1, 4) == []
    assert frame_count(11, 4, 1) == 9 and frame_count(9, 4, 1) == 9 and frame_count(60, 4, 2) == 53
    assert frame_count(11, 4, 1, num_frames=5) == 5
    with pytest.raises(ValueError, match="has 4 frames; this model needs at least 5 .*5, 9, 13, 17"):
        frame_count(4, 4, 1)
    with pytest.raises(ValueError, match=r"num_frames=9 is not accepted by this model: use 5, 13, 21, 29"):
        frame_count(20, 4, 2, num_frames=9)
    with pytest.raises(ValueError, match="only 11 frames"):
        frame_count(11, 4, 1, num_frames=13)


def test_shape_frames_and_meta_on_a_non_square_video(cog):
    source = clip(11)
    maps = explain_video(cog, source, CONCEPTS, num_samples=1)
    # the model's native length is 9 frames (4k+1): the first 9 of 11; 48x32 px -> 12x8 latents -> 6x4 patches
    assert maps.tensor.shape == (1, 3, 3, 4, 6) and maps.is_video
    assert len(maps.frames) == 9 and all(np.array_equal(np.asarray(f), s) for f, s in zip(maps.frames, source))
    assert maps.image is None
    assert torch.allclose(maps.tensor.sum(1), torch.ones(1, 3, 4, 6), atol=1e-5)
    meta = maps.meta
    assert meta["mode"] == "explain_video" and meta["num_frames"] == 9 and meta["latent_frames"] == 3
    assert meta["timestep"] == 0.5 and meta["model_timestep"] == 500.0 and maps.timesteps == [500.0]
    assert meta["original_size"] == [48, 32] and meta["model_size"] == [48, 32]
    shorter = explain_video(cog, source, CONCEPTS, num_samples=1, num_frames=5)
    assert shorter.tensor.shape == (1, 3, 2, 4, 6) and len(shorter.frames) == 5
    eight = explain_video(cog, source[:8], CONCEPTS, num_samples=1)  # 8 frames: the first 5 are used
    assert eight.tensor.shape == (1, 3, 2, 4, 6) and eight.meta["num_frames"] == 5
    resized = explain_video(cog, source, CONCEPTS, num_samples=1, size=(32, 24))
    assert resized.tensor.shape == (1, 3, 3, 3, 4) and resized.meta["model_size"] == [32, 24]


def test_cogvideox_15_temporal_patches_take_an_even_number_of_latent_frames():
    base = tv.cogvideox_pipeline(seed=3, rope=True)
    components = {**base.components, "transformer": tv.cogvideox_transformer(seed=3, rope=True, patch_size_t=2)}
    pipe = type(base)(**components)
    source = clip(15, width=32, height=32)
    maps = explain_video(pipe, source, CONCEPTS, num_samples=1)
    assert maps.meta["num_frames"] == 5 and maps.tensor.shape == (1, 3, 1, 4, 4)  # 9 is native, 9 -> 3 latents: odd
    longer = explain_video(pipe, source, CONCEPTS, num_samples=1, num_frames=13)
    assert longer.meta["latent_frames"] == 4 and longer.tensor.shape == (1, 3, 2, 4, 4)
    with pytest.raises(ValueError, match=r"64x32 px is beyond this model's RoPE table \(at most 32x32 px\)"):
        explain_video(pipe, source, CONCEPTS, num_samples=1, size=(64, 32))


# ---------------------------------------------------------------- exactness
def independent_inputs(pipe, source, frames, prompt, t, seed, samples, width=48, height=32):
    """The noised latents and text rebuilt by hand: VAE mode, (B, F, C, h, w), DDPM noising at round(t·999)."""
    pixels = pipe.video_processor.preprocess_video(video.to_frames(source[:frames]), height=height, width=width)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mode().permute(0, 2, 1, 3, 4) * pipe.vae.config.scaling_factor
    noise = torch.randn((samples, *latents.shape[1:]), generator=torch.Generator().manual_seed(seed))
    step = int(t * 999 + 0.5)
    alpha = pipe.scheduler.alphas_cumprod[step]
    noised = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
    with torch.no_grad():
        text = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=16)[0]
    rope = pipe.transformer.config.use_rotary_positional_embeddings
    rotary = pipe._prepare_rotary_positional_embeddings(height, width, latents.shape[1], "cpu") if rope else None
    return [
        {"hidden_states": noised[i : i + 1], "encoder_hidden_states": text, "timestep": torch.tensor([step]),
         "image_rotary_emb": rotary, "return_dict": False}
        for i in range(samples)
    ]


def test_maps_equal_an_independent_session_and_outputs_are_unchanged(cog):
    source = clip(11, seed=5)
    per_sample = independent_inputs(cog, source, 9, "a dog", 0.7, seed=3, samples=2)
    transformer = cog.transformer
    with torch.no_grad():
        before = [transformer(**inputs)[0] for inputs in per_sample]
    maps = explain_video(cog, source, CONCEPTS, prompt="a dog", timestep=0.7, num_samples=2, seed=3,
                         space=["output", "value"])  # prompt length: the transformer's max_text_seq_length (16)
    assert maps.meta["model_timestep"] == 699.0
    sessions = []
    for inputs, plain in zip(per_sample, before):
        with torch.no_grad(), ConceptAttention(cog, CONCEPTS, space=["output", "value"]) as session:
            watched = transformer(**inputs)[0]
        assert torch.equal(watched, plain)  # the concept stream does not change the output
        sessions.append(session.maps)
    expected = torch.stack([m.tensor for m in sessions]).mean(0)  # the mean of single-sample runs
    assert torch.allclose(maps.tensor, expected, atol=1e-5)
    expected_value = torch.stack([m.others["value"].tensor for m in sessions]).mean(0)
    assert torch.allclose(maps.others["value"].tensor, expected_value, atol=1e-5)
    # the early exit leaves nothing behind: same outputs, original processors, no hooks
    with torch.no_grad():
        after = [transformer(**inputs)[0] for inputs in per_sample]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    for block in transformer.transformer_blocks:
        assert type(block.attn1.processor).__name__ == "CogVideoXAttnProcessor2_0"
        assert not block._forward_hooks and not block._forward_pre_hooks


def test_early_exit_and_one_batched_forward(cog_rope):
    transformer = cog_rope.transformer
    ran, batches = [], []
    handles = [block.register_forward_pre_hook(lambda m, a, i=i: ran.append(i))
               for i, block in enumerate(transformer.transformer_blocks)]
    handles.append(transformer.norm_final.register_forward_pre_hook(lambda m, a: ran.append("norm_final")))
    handles.append(transformer.patch_embed.register_forward_pre_hook(lambda m, a: batches.append(a[1].shape[0])))
    try:
        maps = explain_video(cog_rope, clip(9), CONCEPTS, num_samples=3, layers=[1])
    finally:
        for handle in handles:
            handle.remove()
    assert ran == [0, 1] and batches == [3] and maps.layers == [1]


def test_samples_batched_or_looped_see_the_same_noise_and_are_seeded(cog_rope):
    source = clip(9, seed=7)
    batched = explain_video(cog_rope, source, CONCEPTS, num_samples=3, seed=4)
    looped = explain_video(cog_rope, source, CONCEPTS, num_samples=3, seed=4, batch_samples=False)
    assert looped.steps == [0, 1, 2] and batched.steps == [0]
    assert torch.allclose(looped.tensor, batched.tensor, atol=1e-5)
    again = explain_video(cog_rope, source, CONCEPTS, num_samples=3, seed=4)
    other = explain_video(cog_rope, source, CONCEPTS, num_samples=3, seed=5)
    assert torch.equal(again.tensor, batched.tensor)
    assert not torch.allclose(other.tensor, batched.tensor, atol=1e-4)


def test_inputs_of_every_kind(cog_rope, tmp_path):
    source = clip(9, seed=8)
    reference = explain_video(cog_rope, source, CONCEPTS, num_samples=1)
    pictures = video.to_frames(source)
    as_tensor = torch.from_numpy(source).permute(0, 3, 1, 2).float() / 255.0
    gif = video.write_video(tmp_path / "clip.gif", list(source))
    for given in (pictures, as_tensor):
        assert torch.allclose(explain_video(cog_rope, given, CONCEPTS, num_samples=1).tensor, reference.tensor,
                              atol=1e-5)
    from_file = explain_video(cog_rope, gif, CONCEPTS, num_samples=1)  # GIF: palette-quantised frames
    assert from_file.tensor.shape == reference.tensor.shape and len(from_file.frames) == 9


def test_overlay_videos_keep_the_source_frame_rate(cog_rope, tmp_path):
    source = video.write_video(tmp_path / "clip.mp4", list(clip(9, seed=11)), fps=4.0)
    maps = explain_video(cog_rope, source, CONCEPTS, num_samples=1)
    assert maps.meta["fps"] == pytest.approx(4.0)
    out = maps.save(tmp_path / "run", figure=False)
    assert video.video_fps(out / "dog.mp4") == pytest.approx(4.0)
    assert ConceptMaps.load(out).meta["fps"] == pytest.approx(4.0)
    gif = video.write_video(tmp_path / "clip.gif", list(clip(9, seed=11)), fps=5.0)
    assert explain_video(cog_rope, gif, CONCEPTS, num_samples=1).meta["fps"] == pytest.approx(5.0)
    assert "fps" not in explain_video(cog_rope, clip(9), CONCEPTS, num_samples=1).meta  # arrays carry no rate
    explain_video(cog_rope, clip(9), CONCEPTS, num_samples=1).save(tmp_path / "array", figure=False)
    assert video.video_fps(tmp_path / "array" / "dog.mp4") == pytest.approx(8.0)  # the default


def test_the_video_to_video_pipeline_gives_the_same_maps(cog_rope):
    from diffusers import CogVideoXVideoToVideoPipeline

    source = clip(9, seed=10)
    v2v = CogVideoXVideoToVideoPipeline(**cog_rope.components)
    expected = explain_video(cog_rope, source, CONCEPTS, num_samples=1)
    assert torch.equal(explain_video(v2v, source, CONCEPTS, num_samples=1).tensor, expected.tensor)


# ---------------------------------------------------------------- errors
def test_errors_are_clear(cog_rope, tmp_path):
    with pytest.raises(ValueError, match="has 3 frames; this model needs at least 5"):
        explain_video(cog_rope, clip(3), CONCEPTS)
    with pytest.raises(ValueError, match="num_frames=8 is not accepted by this model: use 5, 9, 13, 17"):
        explain_video(cog_rope, clip(11), CONCEPTS, num_frames=8)
    with pytest.raises(ValueError, match="only 11 frames"):
        explain_video(cog_rope, clip(11), CONCEPTS, num_frames=13)
    for bad in (0.0, 1.5, "0.5", True):
        with pytest.raises(ValueError, match=r"timestep must be a number in \(0, 1\]"):
            explain_video(cog_rope, clip(9), CONCEPTS, timestep=bad)
    with pytest.raises(ValueError, match="num_samples"):
        explain_video(cog_rope, clip(9), CONCEPTS, num_samples=0)
    with pytest.raises(ValueError, match="multiples of 8"):
        explain_video(cog_rope, clip(9), CONCEPTS, size=(30, 32))
    with pytest.raises(FileNotFoundError, match="no video file at"):
        explain_video(cog_rope, tmp_path / "missing.mp4", CONCEPTS)
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a real video")
    with pytest.raises(ValueError, match="cannot read .*broken.mp4 as a video"):
        explain_video(cog_rope, tmp_path / "broken.mp4", CONCEPTS)
    with pytest.raises(ValueError, match="video has no frames"):
        explain_video(cog_rope, [], CONCEPTS)


def test_models_of_the_wrong_kind_are_refused():
    with pytest.raises(TypeError, match="FluxPipeline is an image model: videos need a video model"):
        explain_video(tiny.flux_pipeline(), clip(9), CONCEPTS)
    cog = tv.cogvideox_pipeline(rope=True)
    with pytest.raises(TypeError, match="CogVideoXPipeline is a video model: give it a video"):
        explain(cog, clip(1)[0], CONCEPTS)
    with pytest.raises(TypeError, match="image-to-video or control model"):
        explain_video(tv.cogvideox_pipeline(image_to_video=True), clip(9), CONCEPTS)
    sincos = tv.cogvideox_pipeline(rope=False)
    with pytest.raises(ValueError, match="position table has 16 text rows: max_sequence_length must be 16"):
        explain_video(sincos, clip(9), CONCEPTS, max_sequence_length=32)


# ---------------------------------------------------------------- saving and the command line
@pytest.fixture(scope="module")
def cog_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cog-explain")
    tv.cogvideox_pipeline(seed=6, rope=True).save_pretrained(directory)
    return directory


def test_save_writes_heat_videos_over_the_source_frames(cog_rope, tmp_path):
    maps = explain_video(cog_rope, clip(11), CONCEPTS, num_samples=1)
    out = maps.save(tmp_path / "run", video_format="gif")
    for concept in CONCEPTS:
        assert video.read_video(out / f"{concept}.gif").shape == (9, 32, 48, 3)
    assert (out / "contact_sheet.png").is_file() and len(list((out / "frames").iterdir())) == 9
    loaded = ConceptMaps.load(out)
    assert torch.equal(loaded.tensor, maps.tensor) and len(loaded.frames) == 9
    assert loaded.meta["mode"] == "explain_video"


def test_cli_explains_a_video_file(cog_dir, tmp_path, capsys):
    from concept_attention.cli import main

    assert video.has_mp4_writer(), 'imageio[ffmpeg] (the "video" extra, part of ".[test]") is not installed'
    source = video.write_video(tmp_path / "clip.mp4", list(clip(11, seed=9)))
    out = tmp_path / "explained"
    code = main(["explain", str(source), "--model", str(cog_dir), "--concepts", "dog,sky", "--samples", "1",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((out / "meta.json").read_text())
    assert meta["video_files"]["dog"] == "dog.mp4" and meta["shape"] == [1, 2, 3, 4, 6]
    assert video.read_video(out / "dog.mp4").shape == (9, 32, 48, 3)
    assert meta["meta"]["source"] == str(source) and meta["meta"]["num_samples"] == 1
    assert "cross_attention" in meta["other_spaces"] and (out / "contact_sheet.png").is_file()
    gif = video.write_video(tmp_path / "clip.gif", list(clip(11, seed=9)))
    code = main(["explain", str(gif), "--model", str(cog_dir), "--concepts", "dog,sky", "--frames", "5",
                 "--out", str(tmp_path / "short")])
    assert code == 0, capsys.readouterr().err
    assert video.read_video(tmp_path / "short" / "sky.mp4").shape == (5, 32, 48, 3)
    assert ConceptMaps.load(tmp_path / "short").meta["num_samples"] == 2  # explain_video's default


def test_cli_generates_a_video_with_a_chosen_frame_count(cog_dir, tmp_path, capsys):
    from concept_attention.cli import main

    out = tmp_path / "generated"
    code = main(["generate", "a dog", "--model", str(cog_dir), "--concepts", "dog,sky", "--steps", "2",
                 "--size", "48x32", "--frames", "9", "--out", str(out), "--no-figure"])
    assert code == 0, capsys.readouterr().err
    assert video.read_video(out / "dog.mp4").shape == (9, 32, 48, 3)
    assert ConceptMaps.load(out).meta["num_frames"] == 9
    assert main(["generate", "a dog", "--model", str(cog_dir), "--concepts", "dog", "--frames", "7"]) == 2
    assert "num_frames=7 is not accepted" in capsys.readouterr().err


@pytest.mark.parametrize(
    "file,model,extra,message",
    [
        ("clip.mp4", "flux", [], "FluxPipeline is an image model"),
        ("photo.png", "cog", [], "CogVideoXPipeline is a video model"),
        ("missing.mp4", "cog", [], "no video file at"),
        ("photo.png", "cog", ["--frames", "5"], "--frames is for videos"),
        ("clip.mp4", "cog", ["--frames", "6"], "num_frames=6 is not accepted"),
    ],
)
def test_cli_mistakes_give_one_line(file, model, extra, message, cog_dir, tiny_model_dir, tmp_path, capsys):
    from PIL import Image

    from concept_attention.cli import main

    video.write_video(tmp_path / "clip.mp4", list(clip(9)))
    Image.fromarray(clip(1)[0]).save(tmp_path / "photo.png")
    directory = tiny_model_dir if model == "flux" else cog_dir
    code = main(["explain", str(tmp_path / file), "--model", str(directory), "--concepts", "dog", *extra])
    err = capsys.readouterr().err  # (loading a model also prints progress bars)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err
    assert last.startswith("concept-attention explain: error: ") and message in last
