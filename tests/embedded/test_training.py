"""The embedded model's training script: resumable, sticky recipe switches, frozen parts stay frozen."""
import csv
import sys
from pathlib import Path

import pytest
import torch
from repo_scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
VAE = ROOT / "checkpoints" / "embedded" / "vae"


@pytest.fixture(scope="module")
def train_module():
    sys.path.insert(0, str(ROOT / "scripts"))
    yield load_script("scripts/train_embedded.py", "train_embedded")
    sys.path.remove(str(ROOT / "scripts"))


def run(module, ckpt_dir, *extra):
    module.main(["--ckpt-dir", str(ckpt_dir), "--vae", str(VAE), "--batch-size", "2", "--workers", "0",
                 "--threads", "1", "--warmup", "2", *extra])


def loss_rows(ckpt_dir):
    with open(ckpt_dir / "loss.csv") as f:
        return list(csv.DictReader(f))


def test_resume_continues_and_switches_are_sticky(train_module, tmp_path):
    assert VAE.is_dir(), "the trained VAE of this repository (checkpoints/embedded/vae) is missing"
    run(train_module, tmp_path, "--max-steps", "2")
    assert [int(r["step"]) for r in loss_rows(tmp_path)] == [1, 2]
    first = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)
    assert first["step"] == 2 and not first["args"]["freeze_t5"]

    run(train_module, tmp_path, "--resume", "--max-steps", "4", "--zero-pooled", "--freeze-t5", "--t-logit-mean", "1.1",
        "--t-high-frac", "0.5", "--two-object-frac", "0.8", "--decay-start", "3", "--decay-steps", "100")
    run(train_module, tmp_path, "--resume", "--max-steps", "5")  # flags not repeated: still on
    rows = loss_rows(tmp_path)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert all(float(r["loss"]) > 0 for r in rows)
    last = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)
    assert last["step"] == 5
    assert last["args"]["zero_pooled"] and last["args"]["freeze_t5"]
    assert last["args"]["t_logit_mean"] == 1.1 and last["args"]["t_high_frac"] == 0.5
    assert last["args"]["t_high_mean"] == 3.0 and last["args"]["two_object_frac"] == 0.8
    assert last["args"]["history"] == [{"step": 2, "change": "zero_pooled"}, {"step": 2, "change": "freeze_t5"},
                                       {"step": 2, "change": "t_logit_mean=1.1"},
                                       {"step": 2, "change": "t_high_frac=0.5"},
                                       {"step": 2, "change": "two_object_frac=0.8"},
                                       {"step": 2, "change": "decay_start=3"},
                                       {"step": 2, "change": "decay_steps=100"}]
    assert last["args"]["decay_start"] == 3 and last["args"]["decay_steps"] == 100
    assert float(rows[-1]["lr"]) < float(rows[2]["lr"])  # step 5 is in the decay, also after a resume without flags

    # the frozen T5 is exactly the seeded initial encoder, the pooled projection exactly zero
    fresh = train_module.load_models(str(VAE), seed=0)
    for name, value in fresh.text_encoder_2.state_dict().items():
        assert torch.equal(last["model"]["text_encoder_2"][name], value), name
    pooled = last["model"]["transformer"]
    assert not pooled["time_text_embed.text_embedder.linear_1.weight"].any()
    assert not pooled["time_text_embed.text_embedder.linear_1.bias"].any()
    # ... and so are their EMA copies
    pipe = train_module.load_ema_pipeline(tmp_path / "last.pt", str(VAE))
    assert not pipe.transformer.time_text_embed.text_embedder.linear_1.weight.any()
    for name, value in fresh.text_encoder_2.state_dict().items():
        assert torch.equal(pipe.text_encoder_2.state_dict()[name], value), name
    # the transformer did train
    assert not torch.equal(pooled["x_embedder.weight"], first["model"]["transformer"]["x_embedder.weight"])


def test_learning_rate_schedule(train_module):
    args = train_module.parse_args(["--lr", "1e-3", "--warmup", "10", "--decay-start", "100", "--decay-steps", "50",
                                    "--lr-final", "1e-4"])
    assert train_module.lr_at(0, args) == pytest.approx(1e-4)
    assert train_module.lr_at(50, args) == pytest.approx(1e-3)
    assert train_module.lr_at(125, args) == pytest.approx(5.5e-4)
    assert train_module.lr_at(500, args) == pytest.approx(1e-4)


def test_noise_level_mixture(train_module):
    g = torch.Generator().manual_seed(0)
    plain = train_module.sample_noise_levels(20000, g)
    assert abs(float(plain.median()) - 0.5) < 0.02
    mixed = train_module.sample_noise_levels(20000, g, t_logit_mean=0.0, t_high_frac=0.5, t_high_mean=3.0)
    high = float((mixed > 0.95).float().mean())
    assert 0.25 < high < 0.30  # half of the draws centre on sigmoid(3) = 0.953
    assert float((plain > 0.95).float().mean()) < 0.01


def test_two_object_fraction(train_module):
    from concept_attention.scenes.render import render_scene

    import numpy as np

    images, _ = train_module.make_batch(0, 7, 8, two_object_frac=0.0)
    seeds = np.random.default_rng([0, 7, 0xDA7A]).integers(0, train_module.HELDOUT_SEED_BASE, 8)
    original = np.stack([render_scene(int(s)).image for s in seeds])
    assert torch.equal(images, torch.from_numpy(original))  # 0 = the original stream, bit for bit

    forced, forced_captions = train_module.make_batch(0, 7, 16, caption_mode="full", two_object_frac=1.0)
    scenes = [render_scene(s) for s in range(200)]
    assert all(" and " in c for c in forced_captions)  # every scene has two objects
    assert torch.equal(forced, train_module.make_batch(0, 7, 16, caption_mode="full", two_object_frac=1.0)[0])
    natural = sum(train_module.binding_scene(sc) for sc in scenes) / len(scenes)
    assert 0.05 < natural < 0.5  # so forcing changes the distribution
    pairs = [c.split(" on ")[0].split(" and ") for c in forced_captions]
    assert all(a.split()[1] != b.split()[1] and a.split()[2] != b.split()[2] for a, b in pairs)


def test_compile_flag_compiles_the_transformer_in_place(train_module, tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    run(train_module, tmp_path, "--max-steps", "1", "--compile")
    assert compiled == ["FluxTransformer2DModel"]
