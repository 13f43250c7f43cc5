"""The command-line interface end to end on a tiny local pipeline directory."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from concept_attention import ConceptMaps
from concept_attention.cli import main
from concept_attention.cli.parsing import UsageError, parse_indices, parse_size


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


def test_parsers():
    assert parse_indices("9-12", "--layers") == [9, 10, 11, 12]
    assert parse_indices("0,2-3,2", "--layers") == [0, 2, 3]
    assert parse_size("1024x768") == (1024, 768)
    for bad in ("9-", "a", "5-2"):
        with pytest.raises(UsageError):
            parse_indices(bad, "--layers")
    with pytest.raises(UsageError):
        parse_size("1024")


def test_generate_writes_documented_files(model_dir, tmp_path, capsys):
    out = tmp_path / "gen"
    code = main(["generate", "a dog by a tree", "--concepts", "dog,tree,sky", "--model", str(model_dir),
                 "--out", str(out), "--layers", "2-3", "--size", "48x32"])
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["image.png", "dog.png", "dog_overlay.png", "tree.png", "tree_overlay.png", "sky.png",
                            "sky_overlay.png", "segmentation.png", "figure.png", "maps.npz", "meta.json"])
    maps = ConceptMaps.load(out)
    assert maps.tensor.shape == (1, 3, 8, 12) and maps.layers == [2, 3] and maps.steps == [0, 1]
    assert maps.meta["prompt"] == "a dog by a tree" and maps.meta["seed"] == 0
    assert Image.open(out / "image.png").size == (48, 32)
    assert "cross_attention" in maps.others
    assert str(out) in capsys.readouterr().out


def test_explain_writes_documented_files(model_dir, tmp_path):
    image = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(1).random((30, 50, 3)) * 255).astype("uint8")).save(image)
    out = tmp_path / "exp"
    code = main(["explain", str(image), "--concepts", "dog,sky", "--model", str(model_dir), "--out", str(out),
                 "--samples", "2", "--no-figure"])
    assert code == 0
    assert (out / "dog_overlay.png").is_file() and not (out / "figure.png").exists()
    maps = ConceptMaps.load(out)
    assert maps.meta["num_samples"] == 2 and maps.meta["original_size"] == [50, 30]


def test_explain_takes_a_gif_as_an_image_for_an_image_model(model_dir, tmp_path):
    image = tmp_path / "still.gif"
    Image.fromarray((np.random.default_rng(2).random((30, 50, 3)) * 255).astype("uint8")).save(image)
    out = tmp_path / "gif"
    code = main(["explain", str(image), "--concepts", "dog,sky", "--model", str(model_dir), "--out", str(out),
                 "--samples", "1", "--no-figure"])
    assert code == 0
    assert ConceptMaps.load(out).meta["original_size"] == [50, 30]


@pytest.mark.parametrize(
    "argv,code,message",
    [
        (["generate", "x", "--concepts", " , "], 2, "--concepts is empty"),
        (["generate", "x", "--concepts", "a,a"], 2, "duplicate concept"),
        (["generate", "x", "--concepts", "a", "--layers", "7"], 2, "out of range"),
        (["generate", "x", "--concepts", "a", "--size", "30x30"], 2, "multiples of 4"),
        (["generate", "x", "--concepts", "a", "--steps", "0"], 2, "--steps"),
        (["generate", "x", "--concepts", "a", "--frames", "9"], 2, "num_frames is for video models"),
        (["explain", "missing.png", "--concepts", "a"], 2, "no image file"),
    ],
)
def test_usage_errors(model_dir, argv, code, message, capsys):
    assert main(argv + ["--model", str(model_dir)]) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unloadable_models(tmp_path, capsys):
    assert main(["generate", "x", "--concepts", "a", "--model", str(tmp_path)]) == 1
    assert "not a diffusers pipeline directory" in capsys.readouterr().err
    assert main(["generate", "x", "--concepts", "a", "--model", "nobody/no-such-model"]) == 1
    err = capsys.readouterr().err
    assert "cannot load 'nobody/no-such-model'" in err and len(err.strip().splitlines()) == 1


def test_entry_point_help_and_models():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    helped = subprocess.run([sys.executable, "-m", "concept_attention.cli", "generate", "--help"],
                            capture_output=True, text=True, env=env)
    assert helped.returncode == 0 and "examples:" in helped.stdout
    usage = subprocess.run([sys.executable, "-m", "concept_attention.cli", "generate"], capture_output=True,
                           text=True, env=env)
    assert usage.returncode == 2
    models = subprocess.run([sys.executable, "-m", "concept_attention.cli", "models"], capture_output=True,
                            text=True, env=env)
    assert models.returncode == 0 and "FluxTransformer2DModel" in models.stdout
    from concept_attention import __version__

    version = subprocess.run([sys.executable, "-m", "concept_attention.cli", "--version"], capture_output=True,
                             text=True, env=env)
    assert version.returncode == 0 and version.stdout.strip() == f"concept-attention {__version__}"


# ---------------------------------------------------------------- checked before any model work (issue 18)
@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command loads a model."""
    import concept_attention.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was reported")

    monkeypatch.setattr(loading, "load_pipeline", refuse)


def test_output_and_step_mistakes_are_reported_before_the_model_loads(tmp_path, capsys, no_model):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [
        (["generate", "x", "--concepts", "a", "--out", str(a_file)], "is a file; give a folder"),
        (["generate", "x", "--concepts", "a", "--out", str(a_file / "below")], "cannot write to --out"),
        (["generate", "x", "--concepts", "a", "--steps", "4", "--timesteps", "50-60"], "beyond the 4 denoising steps"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_an_absurd_size_is_refused_at_once(model_dir, tmp_path, capsys):
    import resource
    import time

    Image.new("RGB", (40, 30)).save(tmp_path / "photo.png")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    code = main(["explain", str(tmp_path / "photo.png"), "--concepts", "a,b", "--model", str(model_dir),
                 "--size", "100000x100000", "--out", str(tmp_path / "out")])
    seconds = time.perf_counter() - started
    err = capsys.readouterr().err
    assert code == 2 and "at most about" in err and len(err.strip().splitlines()) == 1, err
    assert seconds < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 500_000  # kB: nothing huge was allocated
    assert main(["generate", "x", "--concepts", "a", "--model", str(model_dir), "--size", "100000x100000",
                 "--out", str(tmp_path / "gen")]) == 2
    assert "needs about" in capsys.readouterr().err


def test_ctrl_c_gives_one_line_and_exit_code_130(model_dir, tmp_path, capsys, monkeypatch):
    import concept_attention.generation as generation

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generation, "generate", interrupted)
    assert main(["generate", "x", "--concepts", "a", "--model", str(model_dir), "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "concept-attention generate: interrupted"


def test_concepts_the_model_cannot_read_are_reported(model_dir, tmp_path, capsys):
    assert main(["generate", "x", "--concepts", "🐶,日本,dog", "--model", str(model_dir),
                 "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "warning: concepts '🐶' and '日本' encode to the same tokens" in err
    assert "warning: concept '🐶' is mostly unknown" in err


def test_a_models_notice_is_shown_with_its_maps(model_dir, tmp_path, capsys):
    import json
    import shutil

    noted = tmp_path / "noted-model"
    shutil.copytree(model_dir, noted)
    config = json.loads((noted / "concept_attention.json").read_text())
    notice = "trained maps: in blocks 1 and 2 caption words' attention was a training target"
    (noted / "concept_attention.json").write_text(json.dumps({**config, "notice": notice}))
    out = tmp_path / "gen"
    assert main(["generate", "a dog", "--concepts", "dog,sky", "--model", str(noted), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = " ".join((captured.out + captured.err).split())
    assert f"note on this model: {notice}" in printed
    assert ConceptMaps.load(out).meta["model_notice"] == notice
    assert main(["generate", "a dog", "--concepts", "dog,sky", "--model", str(model_dir), "--out", str(tmp_path / "plain")]) == 0
    assert "note on this model" not in "".join(capsys.readouterr())
    assert "model_notice" not in ConceptMaps.load(tmp_path / "plain").meta
