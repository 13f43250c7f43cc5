"""The embedded model's training script: resumable, sticky recipe, binding objective, compact checkpoint, export."""
import csv
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from repo_scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
VAE = ROOT / "checkpoints" / "embedded" / "vae"


@pytest.fixture(scope="module")
def train_module():
    return load_script("scripts/train_embedded.py", "train_embedded")


def run(module, ckpt_dir, *extra):
    module.main(["--ckpt-dir", str(ckpt_dir), "--vae", str(VAE), "--batch-size", "3", "--workers", "0",
                 "--threads", "1", "--warmup", "2", *extra])


def loss_rows(ckpt_dir):
    with open(ckpt_dir / "loss.csv") as f:
        return list(csv.DictReader(f))


def test_resume_continues_with_the_recorded_recipe(train_module, tmp_path):
    assert VAE.is_dir(), "the trained VAE of this repository (checkpoints/embedded/vae) is missing"
    run(train_module, tmp_path, "--max-steps", "2")
    first = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)
    assert first["step"] == 2 and first["args"]["binding_weight"] == 1.0 and first["args"]["history"] == []

    run(train_module, tmp_path, "--resume", "--max-steps", "3", "--binding-weight", "0.5", "--decay-start", "2",
        "--decay-steps", "100")
    run(train_module, tmp_path, "--resume", "--max-steps", "4")  # not repeated: still in force
    rows = loss_rows(tmp_path)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r["loss"]) > 0 for r in rows)
    last = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)
    assert last["step"] == 4 and last["args"]["binding_weight"] == 0.5
    assert last["args"]["history"] == [{"step": 2, "change": "binding_weight=0.5"},
                                       {"step": 2, "change": "decay_start=2"},
                                       {"step": 2, "change": "decay_steps=100"}]
    assert float(rows[-1]["lr"]) < float(rows[1]["lr"])  # in the decay after a resume without flags
    # the transformer trained; the frozen parts are exactly the seeded ones
    assert not torch.equal(last["ema"]["x_embedder.weight"], first["ema"]["x_embedder.weight"])
    assert "time_text_embed.text_embedder.linear_1.weight" not in last["ema"]
    pipe = train_module.load_ema_pipeline(tmp_path / "last.pt", str(VAE))
    fresh = train_module.load_models(str(VAE), seed=0)
    for name, value in fresh.text_encoder_2.state_dict().items():
        assert torch.equal(pipe.text_encoder_2.state_dict()[name], value), name
    assert not pipe.transformer.time_text_embed.text_embedder.linear_1.weight.any()


def test_tied_can_only_be_chosen_at_the_start(train_module, tmp_path):
    run(train_module, tmp_path, "--max-steps", "1")
    with pytest.raises(SystemExit, match="tied"):
        run(train_module, tmp_path, "--resume", "--max-steps", "2", "--tied", "1")


def test_export_is_a_plain_flux_pipeline_without_heads(train_module, tmp_path):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    run(train_module, tmp_path / "run", "--max-steps", "1", "--tied", "1")
    export = load_script("scripts/export_embedded.py").export
    out = export(str(tmp_path / "run" / "last.pt"), str(tmp_path / "export"), vae_dir=str(VAE))
    assert "notice" not in json.loads((out / "concept_attention.json").read_text())
    pipe = FluxPipeline.from_pretrained(out)
    reference = FluxTransformer2DModel.from_config(pipe.transformer.config)
    assert set(pipe.transformer.state_dict()) == set(reference.state_dict())  # no binding heads, nothing extra
    assert not any("head" in name for name in pipe.transformer.state_dict())
    attn = pipe.transformer.transformer_blocks[0].attn
    assert torch.equal(attn.add_q_proj.weight, attn.to_q.weight)  # tied in training ...
    assert attn.add_q_proj.weight.data_ptr() != attn.to_q.weight.data_ptr()  # ... plain weights once exported
    ckpt = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=False)
    heads = train_module.BindingHeads(len(pipe.transformer.transformer_blocks), pipe.transformer.inner_dim)
    assert set(ckpt["heads"]) == set(heads.state_dict())  # the heads live only in the training checkpoint


def test_binding_loss_reads_the_named_word(train_module):
    from concept_attention.scenes.training import BindingTarget

    torch.manual_seed(0)
    heads = train_module.BindingHeads(2, 8)
    states = [torch.randn(2, 6, 8, requires_grad=True) for _ in range(2)]
    targets = [(BindingTarget(1, 0, 2), BindingTarget(4, 1, 3)), ()]
    loss, accuracy = heads(states, targets)
    loss.backward()
    for state in states:
        touched = state.grad.abs().sum(-1) > 0
        assert touched.nonzero().tolist() == [[0, 1], [0, 4]]  # only the named words' states
    other, _ = heads(states, [(BindingTarget(1, 0, 1), BindingTarget(4, 1, 3)), ()])
    assert not torch.isclose(loss, other)
    none, acc = heads(states, [(), ()])
    assert float(none) == 0.0 and acc != acc  # no targets: zero loss, accuracy nan
    assert 0.0 <= accuracy <= 1.0


def test_noise_levels_low_for_binding_captions(train_module):
    from concept_attention.scenes.training import BindingTarget

    targets = [(BindingTarget(1, 0, 0),) if i % 2 else () for i in range(20000)]
    sigma = train_module.sample_noise_levels(targets, torch.Generator().manual_seed(0), 0.5, 3.0, 0.8)
    binding, other = sigma[1::2], sigma[0::2]
    assert float(binding.max()) <= 0.8 and abs(float(binding.mean()) - 0.4) < 0.01
    assert 0.25 < float((other > 0.95).float().mean()) < 0.30  # half centred on sigmoid(3) = 0.953


def test_learning_rate_schedule(train_module):
    args = train_module.parse_args(["--lr", "1e-3", "--warmup", "10", "--decay-start", "100", "--decay-steps", "50",
                                    "--lr-final", "1e-4"])
    assert train_module.lr_at(0, args) == pytest.approx(1e-4)
    assert train_module.lr_at(50, args) == pytest.approx(1e-3)
    assert train_module.lr_at(125, args) == pytest.approx(5.5e-4)
    assert train_module.lr_at(500, args) == pytest.approx(1e-4)


def test_compact_moments_round_trip(train_module):
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(1000))
    opt = torch.optim.AdamW([param], lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        (param ** 2 * torch.logspace(-6, 0, 1000)).sum().backward()
        opt.step()
    before = {k: v.clone() for k, v in opt.state[param].items()}
    compact = train_module.compact_optimizer_state(opt)
    restored = torch.optim.AdamW([param], lr=1e-3)
    train_module.restore_optimizer_state(restored, compact)
    after = restored.state[param]
    scale = before["exp_avg"].abs().max()
    assert (after["exp_avg"] - before["exp_avg"]).abs().max() <= scale / 127
    assert bool((after["exp_avg_sq"] > 0).all())  # never 0: an update never blows up
    assert bool((after["exp_avg_sq"].sqrt() >= before["exp_avg_sq"].sqrt() - before["exp_avg_sq"].sqrt().max() / 255).all())
    codes = train_module.quantize(torch.randn(7, 300))
    assert codes["codes"].dtype == torch.int8 and train_module.dequantize(codes).shape == (7, 300)


def test_checkpoint_is_small(train_module, tmp_path):
    run(train_module, tmp_path, "--max-steps", "1")
    assert (tmp_path / "last.pt").stat().st_size < 15e6


def test_compile_flag_compiles_every_block_in_place(train_module, tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    run(train_module, tmp_path, "--max-steps", "1", "--compile")
    assert compiled == ["FluxTransformerBlock"] * 4 + ["FluxSingleTransformerBlock"] * 2


def test_batches_are_a_function_of_seed_and_step(train_module):
    a, b = train_module.make_batch(0, 7, 4), train_module.make_batch(0, 7, 4)
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    assert not torch.equal(a[0], train_module.make_batch(0, 8, 4)[0])
    assert a[0].shape[1:] == (128, 128, 3) and np.asarray(a[0]).dtype == np.uint8


def test_concept_stream_objective_leaves_the_image_alone(train_module):
    from concept_attention.scenes.training import render_training_scene

    scene = next(sc for sc in (render_training_scene(s) for s in range(50)) if len(sc.objects) == 2
                 and sc.objects[0].colour != sc.objects[1].colour and sc.objects[0].shape != sc.objects[1].shape)
    targets = dict(zip(train_module.CONCEPT_WORDS, train_module.concept_targets(scene)))
    shapes, colours = train_module.SHAPES, train_module.COLOURS
    for obj in scene.objects:
        assert targets[obj.colour] == shapes.index(obj.shape) and targets[obj.shape] == colours.index(obj.colour)
    absent = [w for w in colours if w not in {o.colour for o in scene.objects}]
    assert all(targets[w] == train_module.ABSENT for w in absent)
    assert targets[scene.background] == 0 and sum(v == 0 for w, v in targets.items() if w in ("grass", "sky", "wall")) == 1

    pipe = train_module.load_models(str(VAE), seed=0)
    blocks, width = len(pipe.transformer.transformer_blocks), pipe.transformer.inner_dim
    heads, concept_heads = train_module.BindingHeads(blocks, width), train_module.ConceptHeads(blocks, width)
    states = train_module.TextStates(pipe.transformer)
    images, captions, caption_targets, concept_targets, _ = train_module.make_batch(0, 3, 3)
    rows = train_module.encode_concept_rows(pipe)
    assert rows.shape == (len(train_module.CONCEPT_WORDS), pipe.transformer.config.joint_attention_dim)
    sigma = torch.tensor([0.2, 0.5, 0.95])
    with torch.no_grad():
        plain = train_module.training_losses(pipe, heads, states, images, captions, caption_targets,
                                             train_module.RECIPE_DEFAULTS, torch.Generator().manual_seed(0), sigma)
        with_stream = train_module.training_losses(pipe, heads, states, images, captions, caption_targets,
                                                   train_module.RECIPE_DEFAULTS, torch.Generator().manual_seed(0),
                                                   sigma, concept=(rows, concept_heads, concept_targets))
    assert torch.allclose(plain[0], with_stream[0], atol=1e-6)  # the masked concept rows do not touch the image
    assert states.states[0].shape[1] == 16 + len(train_module.CONCEPT_WORDS)
    assert with_stream[3] > 0 and 0.0 <= with_stream[4] <= 1.0


def test_region_weights_cover_each_named_words_region(train_module):
    from concept_attention.scenes.training import render_training_scene, word_regions

    scene = next(s for s in (render_training_scene(seed, 128) for seed in range(50)) if len(s.objects) == 2)
    caption = " ".join([scene.objects[1].phrase(), "and", scene.objects[0].phrase(), "on", scene.background])
    weights = train_module.region_weights(scene, caption)
    assert weights.shape == (16, 256)
    named = {position for position, _ in word_regions(scene, caption)}
    assert {i for i in range(16) if weights[i].any()} == named == {1, 2, 5, 6, 8}
    obj = scene.objects[1]  # named first
    assert weights[1].reshape(16, 16)[int(obj.centre[1]) // 8, int(obj.centre[0]) // 8] == 1.0
    assert weights[1].sum() == pytest.approx(obj.mask.sum() / 64)
    assert np.allclose(weights[1] + weights[5] + weights[8], 1.0)  # the regions tile the image
    batch = train_module.make_batch(0, 3, 3)
    assert batch[4].shape == (3, 16, 256)


def test_grounding_loss_reads_the_attention_flux_computes(train_module, monkeypatch):
    import diffusers.models.transformers.transformer_flux as flux

    pipe = train_module.load_models(str(VAE), seed=0)
    recorded, dispatch = [], flux.dispatch_attention_fn
    monkeypatch.setattr(flux, "dispatch_attention_fn", lambda q, k, v, **kw: recorded.append((q, k)) or dispatch(q, k, v, **kw))
    inputs = train_module.BlockInputs(pipe.transformer, [1, 2])
    blocks, width = len(pipe.transformer.transformer_blocks), pipe.transformer.inner_dim
    states = train_module.TextStates(pipe.transformer)
    images, captions, targets, concepts, regions = train_module.make_batch(0, 11, 4)
    sigma = torch.tensor([0.1, 0.3, 0.5, 0.9])
    rows = train_module.encode_concept_rows(pipe)
    train_module.training_losses(pipe, train_module.BindingHeads(blocks, width), states, images, captions, targets,
                                 train_module.RECIPE_DEFAULTS, torch.Generator().manual_seed(0), sigma,
                                 concept=(rows, train_module.ConceptHeads(blocks, width), concepts))
    batch, position = (regions.sum(-1) > 0).nonzero(as_tuple=True)
    text = 16 + len(train_module.CONCEPT_WORDS)
    for index in (1, 2):
        query, key = recorded[index]
        expected = torch.einsum("nhd,nkhd->nhk", query[batch, position], key[batch, text:]) * query.shape[-1] ** -0.5
        block = pipe.transformer.transformer_blocks[index]
        mine = train_module.word_image_log_attention(block, inputs.inputs[index], batch, position)
        torch.testing.assert_close(mine, expected.log_softmax(-1), atol=1e-5, rtol=0)

    keep = sigma <= 0.8
    loss, share = train_module.grounding_loss(pipe.transformer, inputs, regions, keep)
    loss.backward()
    grad = pipe.transformer.transformer_blocks[1].attn.add_q_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0 and 0.0 < share < 1.0
    assert pipe.transformer.transformer_blocks[3].attn.add_q_proj.weight.grad is None  # after the grounded blocks
    assert regions[3].any() and train_module.grounding_loss(pipe.transformer, inputs, regions, torch.ones(4) > 0)[0] != loss
    # (the high-noise sample's words count only when it is kept)
    none = train_module.grounding_loss(pipe.transformer, inputs, regions, torch.zeros(4, dtype=torch.bool))
    assert float(none[0]) == 0.0 and none[1] != none[1]


def test_grounding_share_is_one_when_attention_is_on_the_region(train_module):
    class Attention:  # a stand-in whose log-attention is given
        blocks = [0]
        inputs = {0: None}

    model = types.SimpleNamespace(transformer_blocks=[None])
    regions = torch.zeros(1, 16, 4)
    regions[0, 2] = torch.tensor([1.0, 0.5, 0.0, 0.0])
    on_region = torch.tensor([[[0.0, -40.0, -40.0, -40.0]]])
    original = train_module.word_image_log_attention
    try:
        train_module.word_image_log_attention = lambda block, inputs, batch, position: on_region.log_softmax(-1)
        loss, share = train_module.grounding_loss(model, Attention(), regions, torch.ones(1, dtype=torch.bool))
        assert share == pytest.approx(1.0) and float(loss) == pytest.approx(0.0, abs=1e-6)
        train_module.word_image_log_attention = lambda block, inputs, batch, position: on_region.flip(-1).log_softmax(-1)
        loss, share = train_module.grounding_loss(model, Attention(), regions, torch.ones(1, dtype=torch.bool))
        assert share == pytest.approx(0.0, abs=1e-6) and float(loss) > 10
    finally:
        train_module.word_image_log_attention = original


def test_grounding_is_a_recorded_recipe_change(train_module, tmp_path):
    run(train_module, tmp_path, "--max-steps", "1")
    run(train_module, tmp_path, "--resume", "--max-steps", "2", "--grounding-weight", "0.5")
    run(train_module, tmp_path, "--resume", "--max-steps", "3")
    last = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)
    assert last["args"]["grounding_weight"] == 0.5 and last["args"]["grounding_blocks"] == "1,2"
    assert last["args"]["history"] == [{"step": 1, "change": "grounding_weight=0.5"}]
    rows = loss_rows(tmp_path)
    shares = [float(r["grounding_share"]) for r in rows[1:] if r["grounding_share"] != "nan"]
    assert rows[0]["grounding_share"] == "nan" and shares and all(0 < share < 1 for share in shares)


def test_export_of_a_grounded_run_carries_the_notice(train_module, tmp_path):
    run(train_module, tmp_path / "run", "--max-steps", "1", "--grounding-weight", "0.5")
    export = load_script("scripts/export_embedded.py").export
    out = export(str(tmp_path / "run" / "last.pt"), str(tmp_path / "export"), vae_dir=str(VAE))
    defaults = json.loads((out / "concept_attention.json").read_text())
    assert defaults["grounded_blocks"] == [1, 2]
    assert "blocks 1 and 2" in defaults["notice"] and "training target" in defaults["notice"]
    from concept_attention import generate
    from concept_attention.loading import load_pipeline

    maps = generate(load_pipeline(str(out)), "a red circle", ["red", "circle"], steps=1)
    assert maps.meta["model_notice"] == defaults["notice"]
