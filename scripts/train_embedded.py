#!/usr/bin/env python
"""Train the embedded model (v2, a small FLUX.1 pipeline) on rendered scenes, resumably.

Denoising exactly as ``diffusers.FluxPipeline`` samples (rectified flow):
  latents x0 = (vae.encode(img).latent_dist.mean - shift_factor) * scaling_factor (frozen VAE),
  packed with ``FluxPipeline._pack_latents``; image ids from ``FluxPipeline._prepare_latent_image_ids``;
  text through ``FluxPipeline.encode_prompt`` (T5 padded to 16 tokens, text ids zeros);
  x_t = (1 - sigma) x0 + sigma eps; the transformer gets ``timestep=sigma`` and regresses eps - x0.
Only the transformer trains. The T5 encoder is frozen at its seeded weights with a hand-set local
position bias (``concept_attention.embedded.set_local_position_bias``); the pooled CLIP path is
switched off (zero), so the prompt reaches the image only through T5 tokens in attention.

Beyond denoising, a **binding objective** (``--binding-weight``, 0 = off): on captions that name only
colours ("a red object and a blue object on grass") or only shapes, a linear head per dual block
reads each named word's text state after that block and predicts its object's shape (or colour).
The word can only answer by finding its own object in the image. Optionally (``--concept-binding-weight``)
the same kind of task on a **concept stream**: every colour, shape and background word, each encoded
alone, is appended to the prompt behind an attention mask (nothing attends to these rows but
themselves and they do not see the prompt: what ConceptAttention runs, the image is unaffected), and
heads on these rows predict the word's object's shape or colour, whether a background word is the
scene's, or that the word's object is absent. The heads are dropped at export. Data and captions:
``concept_attention.scenes.training``.

The issue's **last resort** (``--grounding-weight``, default 0 = off): a loss on caption words'
text->image attention in at most two dual blocks (``--grounding-blocks``, default 1,2). Each caption word
that names one region (a colour or shape word -> its own object, the background word -> the background;
``word_regions``), in samples noised at most to ``binding_t_max``, pays ``-log`` of the share of its
attention over the image tokens (softmax over image keys, per head) that falls on its region. The maps
of those blocks are then partly trained: the export writes a ``notice`` into ``concept_attention.json``
that the CLI, the web app and every figure show.

Batch ``k`` is a pure function of (seed, k), so resuming reproduces the data stream. The checkpoint
(``<ckpt-dir>/last.pt``, written every ``--save-minutes``, at the end and on SIGTERM/SIGINT) is
compact: fp16 EMA weights, the heads, and 8-bit Adam moments; a resume continues from the EMA
weights.

  GOMP_SPINCOUNT=0 OMP_WAIT_POLICY=PASSIVE nohup python scripts/train_embedded.py --resume --compile \\
      >> checkpoints/embedded/train.log 2>&1 &
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

from concept_attention.embedded import DEFAULT_SIZE, MAX_SEQUENCE_LENGTH, build_pipeline
from concept_attention.scenes.render import BACKGROUNDS, COLOURS, SHAPES
from concept_attention.scenes.training import render_training_scene, sample_caption, word_regions

CHECKPOINT_FORMAT = "embedded-flux-v2"
#: recipe values recorded in the checkpoint; given on the command line > checkpoint > these defaults
RECIPE_DEFAULTS = {"binding_weight": 1.0, "binding_t_max": 0.8, "t_high_frac": 0.5, "t_high_mean": 3.0,
                   "tied": 0.0, "concept_binding_weight": 0.0, "decay_start": 0, "decay_steps": 0, "lr_final": 1e-4,
                   "grounding_weight": 0.0, "grounding_blocks": "1,2"}
CONCEPT_WORDS = (*COLOURS, *SHAPES, *BACKGROUNDS)
"""The concept rows of the concept-stream objective: every word the held-out scenes can ask about."""
ABSENT = 4
"""Concept-stream target class of a word whose object (or background) is not in the scene."""
QUANT_BLOCK = 256
TOKEN_PIXELS = 8
"""Image pixels per side of one transformer token (VAE factor 4, then 2 x 2 packing)."""


# --------------------------------------------------------------------------- data
def make_batch(seed: int, step: int, batch_size: int, size: int = DEFAULT_SIZE):
    """Batch number ``step``: uint8 images (B, H, W, 3), captions, binding targets per caption, concept-stream
    targets ``(B, len(CONCEPT_WORDS))`` and word regions ``(B, MAX_SEQUENCE_LENGTH, image tokens)`` (see
    :func:`region_weights`). Deterministic."""
    rng = np.random.default_rng([seed, step, 0xDA7A])
    images, captions, targets, concepts, regions = [], [], [], [], []
    for scene_seed in rng.integers(0, 1_000_000_000, batch_size):
        scene = render_training_scene(int(scene_seed), size)
        caption = sample_caption(scene, rng)
        images.append(scene.image)
        captions.append(caption.text)
        targets.append(caption.targets)
        concepts.append(concept_targets(scene))
        regions.append(region_weights(scene, caption.text))
    return (torch.from_numpy(np.stack(images)), captions, targets, torch.tensor(concepts),
            torch.from_numpy(np.stack(regions)))


def region_weights(scene, caption: str) -> np.ndarray:
    """``(MAX_SEQUENCE_LENGTH, image tokens)``: for each caption word that names one region of the scene (an
    object or the background, :func:`~concept_attention.scenes.training.word_regions`), the share of each image
    token that region covers; zero rows for the other words."""
    grid = scene.image.shape[0] // TOKEN_PIXELS
    weights = np.zeros((MAX_SEQUENCE_LENGTH, grid * grid), dtype=np.float32)
    for position, mask in word_regions(scene, caption):
        if position < MAX_SEQUENCE_LENGTH:
            weights[position] = mask.reshape(grid, TOKEN_PIXELS, grid, TOKEN_PIXELS).mean(axis=(1, 3)).ravel()
    return weights


def concept_targets(scene) -> list[int]:
    """For each of :data:`CONCEPT_WORDS`: a colour word -> its object's shape, a shape word -> its object's colour,
    :data:`ABSENT` when no object has it (-100, ignored, when several do); a background word -> 0 when it is
    the scene's background, else :data:`ABSENT`."""
    result = []
    for word in CONCEPT_WORDS:
        if word in BACKGROUNDS:
            result.append(0 if scene.background == word else ABSENT)
            continue
        attribute, answer = ("colour", "shape") if word in COLOURS else ("shape", "colour")
        owners = [o for o in scene.objects if getattr(o, attribute) == word]
        classes = SHAPES if answer == "shape" else COLOURS
        result.append(ABSENT if not owners else classes.index(getattr(owners[0], answer)) if len(owners) == 1 else -100)
    return result


class BatchStream(torch.utils.data.IterableDataset):
    def __init__(self, seed: int, start_step: int, batch_size: int) -> None:
        self.seed, self.start_step, self.batch_size = seed, start_step, batch_size

    def __iter__(self):
        torch.set_num_threads(1)
        step = self.start_step
        while True:
            yield make_batch(self.seed, step, self.batch_size)
            step += 1


def batch_iter(args, start_step: int):
    if args.workers <= 0:
        step = start_step
        while True:
            yield make_batch(args.seed, step, args.batch_size)
            step += 1
    loader = torch.utils.data.DataLoader(BatchStream(args.seed, start_step, args.batch_size), batch_size=None,
                                         num_workers=1, prefetch_factor=4)
    yield from loader


# --------------------------------------------------------------------------- model
def load_models(vae_dir: str, seed: int, tied: bool = False):
    """The training pipeline: trained VAE, frozen T5 and CLIP, pooled path zero; optionally tied text projections."""
    from diffusers import AutoencoderKL

    pipe = build_pipeline(seed=seed, vae=AutoencoderKL.from_pretrained(vae_dir))
    for name in ("vae", "text_encoder", "text_encoder_2"):
        getattr(pipe, name).requires_grad_(False).eval()
    layer = pooled_layer(pipe)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
    layer.requires_grad_(False)
    if tied:
        tie_text_projections(pipe.transformer)
    return pipe


def pooled_layer(pipe):
    """The first linear layer of the transformer's pooled-text projection (kept at zero)."""
    return pipe.transformer.time_text_embed.text_embedder.linear_1


def tie_text_projections(transformer) -> None:
    """The text stream of every dual block uses the image stream's q/k/v projections and qk-norms (shared)."""
    for block in transformer.transformer_blocks:
        attn = block.attn
        for image, text in (("to_q", "add_q_proj"), ("to_k", "add_k_proj"), ("to_v", "add_v_proj")):
            getattr(attn, text).weight = getattr(attn, image).weight
            getattr(attn, text).bias = getattr(attn, image).bias
        attn.norm_added_q.weight = attn.norm_q.weight
        attn.norm_added_k.weight = attn.norm_k.weight


def untie(module: torch.nn.Module) -> None:
    """Give every parameter that is shared between submodules its own copy (for saving)."""
    seen: set[int] = set()
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if id(param) in seen:
                setattr(sub, name, torch.nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
            seen.add(id(param))


class BindingHeads(torch.nn.Module):
    """One linear head per dual block: a word's text state -> its object's shape or colour (4 + 4 logits)."""

    def __init__(self, num_blocks: int, dim: int, classes: int = 4) -> None:
        super().__init__()
        self.classes = classes
        self.linears = torch.nn.ModuleList(torch.nn.Linear(dim, 2 * classes) for _ in range(num_blocks))

    def forward(self, states: list[torch.Tensor], targets) -> tuple[torch.Tensor, float]:
        """Cross-entropy averaged over words and blocks, and the last block's accuracy (nan without targets)."""
        rows = [(b, t.position, t.kind, t.label) for b, caption in enumerate(targets) for t in caption]
        if not rows:
            return states[0].new_zeros(()), float("nan")
        batch, position, kind, label = (torch.tensor(column) for column in zip(*rows))
        losses, accuracy = [], float("nan")
        for linear, state in zip(self.linears, states):
            logits = linear(state[batch, position]).view(-1, 2, self.classes)[torch.arange(len(rows)), kind]
            losses.append(F.cross_entropy(logits, label))
            accuracy = float((logits.argmax(-1) == label).float().mean())
        return torch.stack(losses).mean(), accuracy


class ConceptHeads(torch.nn.Module):
    """One linear head per dual block on the concept-stream rows: a colour word -> its object's shape, a shape
    word -> its object's colour, a background word -> whether it is the scene's; or "absent" (5 classes)."""

    KINDS = torch.tensor([0] * len(COLOURS) + [1] * len(SHAPES) + [2] * len(BACKGROUNDS))

    def __init__(self, num_blocks: int, dim: int, classes: int = ABSENT + 1) -> None:
        super().__init__()
        self.classes = classes
        self.linears = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * classes) for _ in range(num_blocks))

    def forward(self, states: list[torch.Tensor], targets: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Cross-entropy over the kept samples' concept rows (the last ``len(CONCEPT_WORDS)`` text rows) and blocks."""
        rows = len(CONCEPT_WORDS)
        labels = targets[keep]
        if labels.numel() == 0 or not bool((labels >= 0).any()):
            return states[0].new_zeros(()), float("nan")
        losses, accuracy = [], float("nan")
        for linear, state in zip(self.linears, states):
            logits = linear(state[keep, -rows:]).view(-1, rows, 3, self.classes)
            logits = logits[:, torch.arange(rows), self.KINDS]  # (kept, rows, classes)
            losses.append(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100))
            valid = labels >= 0
            accuracy = float((logits.argmax(-1)[valid] == labels[valid]).float().mean())
        return torch.stack(losses).mean(), accuracy


def concept_stream_inputs(prompt_embeds: torch.Tensor, concept_rows: torch.Tensor, image_tokens: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prompt with the concept rows appended, their text ids, and the attention mask that makes them a
    concept stream: nothing attends to them but themselves, and they do not attend to the prompt."""
    batch, text = prompt_embeds.shape[:2]
    rows = concept_rows.shape[0]
    embeds = torch.cat([prompt_embeds, concept_rows.to(prompt_embeds.dtype).expand(batch, -1, -1)], dim=1)
    total = text + rows + image_tokens
    allowed = torch.ones(total, total, dtype=torch.bool)
    allowed[:, text:text + rows] = False
    allowed[text:text + rows, text:text + rows] = True
    allowed[text:text + rows, :text] = False
    return embeds, torch.zeros(text + rows, 3), allowed


class TextStates:
    """Forward hooks that keep the text stream's output of each dual block (for the binding heads)."""

    def __init__(self, transformer) -> None:
        self.states: list[torch.Tensor | None] = [None] * len(transformer.transformer_blocks)
        self.handles = [block.register_forward_hook(self._keep(i))
                        for i, block in enumerate(transformer.transformer_blocks)]

    def _keep(self, index: int):
        def hook(module, args, output):
            self.states[index] = output[0]  # FluxTransformerBlock returns (text, image)
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class BlockInputs:
    """Forward pre-hooks that keep the inputs of some dual blocks (for the attention-grounding objective)."""

    NAMES = ("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb")

    def __init__(self, transformer, blocks: list[int]) -> None:
        self.blocks = list(blocks)
        self.inputs: dict[int, dict] = {}
        self.handles = [transformer.transformer_blocks[i].register_forward_pre_hook(self._keep(i), with_kwargs=True)
                        for i in self.blocks]

    def _keep(self, index: int):
        def hook(module, args, kwargs):
            self.inputs[index] = {name: kwargs[name] for name in self.NAMES}
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def word_image_log_attention(block, inputs: dict, batch: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """``(words, heads, image tokens)``: log-softmax over the image tokens of the attention logits of caption word
    ``position`` of sample ``batch`` in a dual block, recomputed from the block's inputs as FluxAttnProcessor
    computes them (modulated norm, projection, qk-norm, rotary embedding)."""
    from diffusers.models.embeddings import apply_rotary_emb

    attn = block.attn
    image = block.norm1(inputs["hidden_states"], emb=inputs["temb"])[0]
    text = block.norm1_context(inputs["encoder_hidden_states"], emb=inputs["temb"])[0]
    query = attn.norm_added_q(attn.add_q_proj(text).unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(attn.to_k(image).unflatten(-1, (-1, attn.head_dim)))
    cos, sin = inputs["image_rotary_emb"]
    length = text.shape[1]
    query = apply_rotary_emb(query, (cos[:length], sin[:length]), sequence_dim=1)
    key = apply_rotary_emb(key, (cos[length:], sin[length:]), sequence_dim=1)
    logits = torch.einsum("nhd,nkhd->nhk", query[batch, position], key[batch]) * attn.head_dim ** -0.5
    return logits.float().log_softmax(-1)


def grounding_loss(transformer, inputs: BlockInputs, regions: torch.Tensor, keep: torch.Tensor
                   ) -> tuple[torch.Tensor, float]:
    """The last-resort objective: for each region-naming caption word of the kept samples, ``-log`` of the
    share of its text->image attention (softmax over image tokens) that falls on its region, averaged over words,
    heads and the chosen blocks; and that share's mean (nan without words)."""
    weights = regions * keep[:, None, None]
    batch, position = (weights.sum(-1) > 0).nonzero(as_tuple=True)
    if batch.numel() == 0:
        return transformer.x_embedder.weight.new_zeros(()), float("nan")
    log_weights = weights[batch, position].log()[:, None, :]  # (words, 1, tokens); -inf outside the region
    losses, shares = [], []
    for index in inputs.blocks:
        log_attention = word_image_log_attention(transformer.transformer_blocks[index], inputs.inputs[index],
                                                 batch, position)
        log_share = torch.logsumexp(log_attention + log_weights, dim=-1)  # (words, heads)
        losses.append(-log_share.mean())
        shares.append(float(log_share.detach().exp().mean()))
    return torch.stack(losses).mean(), sum(shares) / len(shares)


def latents_and_ids(pipe, images_u8):
    """Frozen-VAE latents, packed, and image ids, exactly as FluxPipeline uses them."""
    from diffusers import FluxPipeline

    x = images_u8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    with torch.no_grad():
        z = pipe.vae.encode(x).latent_dist.mean
        z = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    b, c, h, w = z.shape
    packed = FluxPipeline._pack_latents(z, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, z.device, z.dtype)
    return packed, img_ids


def sample_noise_levels(targets, generator=None, t_high_frac: float = 0.5, t_high_mean: float = 3.0,
                        binding_t_max: float = 0.8) -> torch.Tensor:
    """Per sample: logit-normal(0, 1), a fraction ``t_high_frac`` logit-normal(t_high_mean, 1) (the caption
    decides the image only at high noise); captions with binding targets: uniform(0, binding_t_max),
    where the objects are visible."""
    b = len(targets)
    z = torch.randn(b, generator=generator)
    high = torch.rand(b, generator=generator) < t_high_frac
    sigma = torch.sigmoid(z + torch.where(high, t_high_mean, 0.0))
    low = torch.rand(b, generator=generator) * binding_t_max
    has_targets = torch.tensor([len(t) > 0 for t in targets])
    return torch.where(has_targets, low, sigma)


def training_losses(pipe, heads, states, images_u8, captions, targets, recipe, generator=None, sigma=None,
                    concept=None):
    """(flow loss, binding loss, binding accuracy of the last block, concept loss, concept accuracy) for one batch.

    ``concept`` = (concept rows ``(len(CONCEPT_WORDS), text width)``, :class:`ConceptHeads`, targets) adds the
    concept stream (masked, so the image is unaffected) and its objective on samples noised at most to
    ``binding_t_max``.
    """
    x0, img_ids = latents_and_ids(pipe, images_u8)
    with torch.no_grad():
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=captions, prompt_2=captions, device=x0.device, num_images_per_prompt=1,
            max_sequence_length=MAX_SEQUENCE_LENGTH)
    if sigma is None:
        sigma = sample_noise_levels(targets, generator, recipe["t_high_frac"], recipe["t_high_mean"],
                                    recipe["binding_t_max"])
    extra = {}
    if concept is not None:
        prompt_embeds, text_ids, mask = concept_stream_inputs(prompt_embeds, concept[0], x0.shape[1])
        extra["joint_attention_kwargs"] = {"attention_mask": mask}
    eps = torch.randn(x0.shape, generator=generator)
    s = sigma[:, None, None]
    pred = pipe.transformer(hidden_states=(1 - s) * x0 + s * eps, timestep=sigma, guidance=None,
                            pooled_projections=pooled, encoder_hidden_states=prompt_embeds, txt_ids=text_ids,
                            img_ids=img_ids, return_dict=False, **extra)[0]
    flow = F.mse_loss(pred, eps - x0)
    binding, accuracy = heads(states.states, targets)
    if concept is None:
        return flow, binding, accuracy, flow.new_zeros(()), float("nan")
    concept_loss, concept_accuracy = concept[1](states.states, concept[2], sigma <= recipe["binding_t_max"])
    return flow, binding, accuracy, concept_loss, concept_accuracy


# --------------------------------------------------------------------------- compact checkpoint
def quantize(tensor: torch.Tensor, unsigned: bool = False) -> dict:
    """Blockwise absmax 8-bit code of ``tensor`` (signed int8, or uint8 for non-negative values)."""
    flat = tensor.detach().float().flatten()
    padded = F.pad(flat, (0, -flat.numel() % QUANT_BLOCK)).view(-1, QUANT_BLOCK)
    levels = 255 if unsigned else 127
    scale = padded.abs().amax(dim=1).clamp_min(1e-30) / levels
    codes = torch.round(padded / scale[:, None])
    codes = codes.to(torch.uint8) if unsigned else codes.to(torch.int8)
    return {"codes": codes, "scale": scale, "shape": tuple(tensor.shape)}


def dequantize(code: dict, floor_half_step: bool = False) -> torch.Tensor:
    """Inverse of :func:`quantize`; ``floor_half_step`` reads code 0 as half a step (never exactly 0)."""
    values = code["codes"].float()
    if floor_half_step:
        values = values.clamp_min(0.5)
    flat = (values * code["scale"][:, None]).flatten()
    return flat[: int(np.prod(code["shape"]))].view(code["shape"])


def compact_optimizer_state(opt) -> dict:
    """Adam moments in 8 bits: exp_avg signed, sqrt(exp_avg_sq) unsigned."""
    sd = opt.state_dict()
    state = {}
    for key, st in sd["state"].items():
        state[key] = {"step": st["step"], "exp_avg": quantize(st["exp_avg"]),
                      "sqrt_exp_avg_sq": quantize(st["exp_avg_sq"].sqrt(), unsigned=True)}
    return {"state": state, "param_groups": sd["param_groups"]}


def restore_optimizer_state(opt, compact: dict) -> None:
    """Inverse of :func:`compact_optimizer_state`; a second moment that rounded to 0 comes back as a small
    positive value (an update is then smaller, never larger, than before the round trip)."""
    state = {}
    for key, st in compact["state"].items():
        state[key] = {"step": st["step"], "exp_avg": dequantize(st["exp_avg"]),
                      "exp_avg_sq": dequantize(st["sqrt_exp_avg_sq"], floor_half_step=True) ** 2}
    opt.load_state_dict({"state": state, "param_groups": compact["param_groups"]})


def trained_parameters(transformer) -> dict[str, torch.nn.Parameter]:
    """The transformer's trained parameters by name (a parameter shared by tying appears once)."""
    return {name: p for name, p in transformer.named_parameters() if p.requires_grad}


def save_checkpoint(path: Path, run: "Run", args) -> None:
    ckpt = {
        "format": CHECKPOINT_FORMAT, "step": run.step, "wall_seconds": run.wall, "args": vars(args),
        "ema": {name: value.to(torch.float16) for name, value in run.ema.items()},
        "heads": run.heads.state_dict(), "concept_heads": run.concept_heads.state_dict() if run.concept_on else None,
        "optimizer": compact_optimizer_state(run.opt),
        "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, pipe, heads=None, opt=None, concept_heads=None) -> tuple[dict, dict]:
    """Load a checkpoint: the transformer gets the EMA weights; returns (checkpoint, EMA by name, fp32)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(f"{path} is not a v2 embedded checkpoint (format {ckpt.get('format')!r})")
    params = trained_parameters(pipe.transformer)
    ema = {name: value.float() for name, value in ckpt["ema"].items()}
    with torch.no_grad():
        for name, value in ema.items():
            params[name].copy_(value)
    if heads is not None:
        heads.load_state_dict(ckpt["heads"])
    if concept_heads is not None and ckpt.get("concept_heads") is not None:
        concept_heads.load_state_dict(ckpt["concept_heads"])
    if opt is not None:
        restore_optimizer_state(opt, ckpt["optimizer"])
    return ckpt, ema


def load_ema_pipeline(ckpt_path, vae_dir: str | None = None):
    """A plain FluxPipeline with the EMA weights of a training checkpoint (fp32, eval; no heads, untied)."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    args = ckpt["args"]
    pipe = load_models(vae_dir or args["vae"], args["seed"], tied=bool(args.get("tied")))
    pipe.transformer.requires_grad_(True)
    load_checkpoint(ckpt_path, pipe)
    untie(pipe.transformer)
    pipe.transformer.requires_grad_(False).eval()
    pipe.ckpt_step, pipe.ckpt_args = ckpt["step"], args
    return pipe


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt-dir", default="checkpoints/embedded")
    ap.add_argument("--vae", default="checkpoints/embedded/vae")
    ap.add_argument("--resume", action="store_true", help="continue from <ckpt-dir>/last.pt if it exists")
    ap.add_argument("--max-steps", type=int, default=1_000_000, help="stop at this total step count")
    ap.add_argument("--minutes", type=float, default=0.0, help="stop after this many minutes of this run (0 = no limit)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="0 = render in the main process")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="torch.compile each transformer block in place")
    ap.add_argument("--save-minutes", type=float, default=5.0)
    ap.add_argument("--log-every", type=int, default=20)
    recipe = ap.add_argument_group("recipe (recorded in the checkpoint; a value given here changes it from this step)")
    recipe.add_argument("--binding-weight", type=float, default=None,
                        help="weight of the binding objective (0 = plain denoising, the ablation); default 1")
    recipe.add_argument("--binding-t-max", type=float, default=None,
                        help="captions with binding targets get noise levels uniform in [0, this]; default 0.8")
    recipe.add_argument("--t-high-frac", type=float, default=None,
                        help="share of the other noise levels drawn from logit-normal(--t-high-mean, 1); default 0.5")
    recipe.add_argument("--t-high-mean", type=float, default=None, help="default 3.0")
    recipe.add_argument("--concept-binding-weight", type=float, default=None,
                        help="weight of the concept-stream objective (heads on the concept rows predict their object's "
                        "shape or colour, or that it is absent); default 0")
    recipe.add_argument("--tied", type=float, default=None,
                        help="1 = the text stream shares the image stream's q/k/v and qk-norms (from step 0 only)")
    recipe.add_argument("--decay-start", type=int, default=None, help="step where a linear lr decay starts")
    recipe.add_argument("--decay-steps", type=int, default=None, help="length of the decay (0 = constant lr)")
    recipe.add_argument("--lr-final", type=float, default=None, help="lr at the end of the decay; default 1e-4")
    recipe.add_argument("--grounding-weight", type=float, default=None,
                        help="the issue's last resort, 0 = off (default): weight of a loss on region-naming caption "
                        "words' text->image attention in --grounding-blocks (the maps of those blocks are then trained)")
    recipe.add_argument("--grounding-blocks", default=None, help="dual blocks of the grounding loss; default 1,2")
    return ap.parse_args(argv)


def lr_at(step: int, args) -> float:
    """Linear warm-up to --lr, then constant, or a linear decay to --lr-final from --decay-start."""
    lr = args.lr
    if args.decay_steps and step >= args.decay_start:
        frac = min(1.0, (step - args.decay_start) / args.decay_steps)
        lr = args.lr + frac * (args.lr_final - args.lr)
    return lr * min(1.0, (step + 1) / max(1, args.warmup))


def resolve_recipe(args, previous: dict, step: int) -> None:
    """Fill the recipe values (given > checkpoint > default) and log changes in ``args.history``."""
    history = list(previous.get("history", []))
    for name, default in RECIPE_DEFAULTS.items():
        before = previous.get(name, default) if previous else default
        given = getattr(args, name)
        if given is None:
            setattr(args, name, before)
        elif previous and given != before:
            if name == "tied":
                raise SystemExit("--tied can only be chosen when a run starts")
            history.append({"step": step, "change": f"{name}={given}"})
    args.history = history


def recipe_of(args) -> dict:
    return {name: getattr(args, name) for name in RECIPE_DEFAULTS}


@dataclass
class Run:
    """Everything a training run carries from step to step."""

    pipe: Any
    heads: BindingHeads
    concept_heads: ConceptHeads
    concept_rows: torch.Tensor
    states: TextStates
    opt: torch.optim.Optimizer
    ema: dict
    step: int = 0
    wall: float = 0.0
    inputs: BlockInputs | None = None

    @property
    def concept_on(self) -> bool:
        """Whether the concept heads are trained (their parameters are the optimiser's second group)."""
        return len(self.opt.param_groups) > 1


def encode_concept_rows(pipe) -> torch.Tensor:
    """Each word of :data:`CONCEPT_WORDS` encoded alone by the frozen T5, as ConceptAttention encodes concepts."""
    from concept_attention.adapters.encoding import encode_with_t5

    rows = encode_with_t5(pipe.tokenizer_2, pipe.text_encoder_2, list(CONCEPT_WORDS), MAX_SEQUENCE_LENGTH)
    return torch.cat(rows)  # one piece per word in the embedded tokenizer


def start_run(args) -> Run:
    """A new or resumed run (the concept heads join the optimiser once the concept objective is on)."""
    last = Path(args.ckpt_dir) / "last.pt"
    saved = torch.load(last, map_location="cpu", weights_only=False) if args.resume and last.exists() else {}
    previous = saved.get("args", {})
    resolve_recipe(args, previous, saved.get("step", 0))
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    pipe = load_models(args.vae, args.seed, tied=bool(args.tied))
    pipe.transformer.train()
    params = trained_parameters(pipe.transformer)
    blocks, width = len(pipe.transformer.transformer_blocks), pipe.transformer.inner_dim
    heads, concept_heads = BindingHeads(blocks, width), ConceptHeads(blocks, width)
    opt = torch.optim.AdamW([*params.values(), *heads.parameters()], lr=args.lr, betas=(0.9, 0.99),
                            weight_decay=args.weight_decay)
    if saved.get("concept_heads") is not None:
        opt.add_param_group({"params": list(concept_heads.parameters())})
    run = Run(pipe, heads, concept_heads, encode_concept_rows(pipe), None, opt,
              {name: p.detach().clone() for name, p in params.items()})
    if previous:
        ckpt, run.ema = load_checkpoint(last, pipe, heads, opt, concept_heads)
        run.step, run.wall = ckpt["step"], ckpt["wall_seconds"]
        torch.set_rng_state(ckpt["torch_rng"])
        np.random.set_state(ckpt["numpy_rng"])
        print(f"resumed from {last} at step {run.step} ({run.wall / 3600:.2f} h trained)", flush=True)
    if args.concept_binding_weight > 0 and not run.concept_on:
        opt.add_param_group({"params": list(concept_heads.parameters())})
    run.states = TextStates(pipe.transformer)
    if args.grounding_weight > 0:
        run.inputs = BlockInputs(pipe.transformer, grounding_blocks(vars(args)))
    if args.compile:
        for block in [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]:
            block.compile()  # in place: parameter names, checkpoints and the EMA are unchanged
    return run


def trim_loss_log(loss_csv: Path, step: int) -> None:
    """Start a new log, or drop the rows written after the checkpoint being resumed."""
    header = ["step", "wall_seconds", "loss", "binding", "binding_acc", "lr", "concept", "concept_acc",
              "grounding", "grounding_share"]
    rows = [header]
    if step and loss_csv.exists():
        with open(loss_csv) as f:
            rows += [r for r in list(csv.reader(f))[1:] if r and int(r[0]) <= step]
    with open(loss_csv, "w", newline="") as f:
        csv.writer(f).writerows(rows)


class StopFlag:
    """Set by SIGTERM/SIGINT: the loop saves and stops after the current step."""

    def __init__(self) -> None:
        self.stop = False
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._set)

    def _set(self, signum, frame) -> None:
        self.stop = True
        print(f"signal {signum}: saving and stopping after this step", flush=True)


def grounding_blocks(recipe: dict) -> list[int]:
    """The dual blocks of the grounding loss, from a recipe's ``"1,2"``."""
    return [int(b) for b in str(recipe["grounding_blocks"]).split(",")]


def train_step(run: Run, batch: tuple, lr: float, args) -> tuple[float, ...]:
    """One optimiser step; (flow, binding loss, binding accuracy, concept loss, concept accuracy, grounding loss,
    attention share on the named region)."""
    images, captions, targets, concept_targets_, regions = batch
    for group in run.opt.param_groups:
        group["lr"] = lr
    recipe = recipe_of(args)
    sigma = sample_noise_levels(targets, None, recipe["t_high_frac"], recipe["t_high_mean"], recipe["binding_t_max"])
    concept = (run.concept_rows, run.concept_heads, concept_targets_) if args.concept_binding_weight > 0 else None
    flow, binding, accuracy, concept_loss, concept_accuracy = training_losses(
        run.pipe, run.heads, run.states, images, captions, targets, recipe, sigma=sigma, concept=concept)
    grounding, share = flow.new_zeros(()), float("nan")
    if run.inputs is not None:
        grounding, share = grounding_loss(run.pipe.transformer, run.inputs, regions, sigma <= args.binding_t_max)
    run.opt.zero_grad(set_to_none=True)
    total = flow + args.binding_weight * binding + args.concept_binding_weight * concept_loss
    (total + args.grounding_weight * grounding).backward()
    params = [p for group in run.opt.param_groups for p in group["params"] if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
    run.opt.step()
    return (flow.item(), binding.item() if accuracy == accuracy else float("nan"), accuracy,
            concept_loss.item() if concept_accuracy == concept_accuracy else float("nan"), concept_accuracy,
            grounding.item() if share == share else float("nan"), share)


def update_ema(ema: dict, transformer, step: int, rate: float) -> None:
    decay = min(rate, (1 + step) / (10 + step))
    params = trained_parameters(transformer)
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.values()), [params[name].detach() for name in ema], 1 - decay)


def mean_of_numbers(values) -> float:
    """Mean ignoring nan (steps without binding targets); nan if there is none."""
    numbers = [v for v in values if v == v]
    return sum(numbers) / len(numbers) if numbers else float("nan")


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ckpt_dir = Path(args.ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    run = start_run(args)
    (ckpt_dir / "args.json").write_text(json.dumps({**vars(args), "start_step": run.step}, indent=2))
    loss_csv = ckpt_dir / "loss.csv"
    trim_loss_log(loss_csv, run.step)
    flag = StopFlag()
    started = saved = time.time()
    wall0 = run.wall
    data = batch_iter(args, run.step)

    def save(note: str = "") -> None:
        run.wall = wall0 + time.time() - started
        save_checkpoint(ckpt_dir / "last.pt", run, args)
        print(f"saved checkpoint at step {run.step}{note}", flush=True)

    with open(loss_csv, "a", newline="") as log:
        writer, window, logged = csv.writer(log), [], time.time()
        try:
            while run.step < args.max_steps and not flag.stop and not (args.minutes and time.time() - started > args.minutes * 60):
                lr = lr_at(run.step, args)
                values = train_step(run, next(data), lr, args)
                run.step += 1
                update_ema(run.ema, run.pipe.transformer, run.step, args.ema)
                flow, binding, accuracy, concept, concept_accuracy, grounding, share = values
                writer.writerow([run.step, f"{wall0 + time.time() - started:.1f}", f"{flow:.5f}", f"{binding:.5f}",
                                 f"{accuracy:.3f}", f"{lr:.3e}", f"{concept:.5f}", f"{concept_accuracy:.3f}",
                                 f"{grounding:.5f}", f"{share:.3f}"])
                window.append(values)
                if run.step % args.log_every == 0:
                    log.flush()
                    report(run, window, lr, time.time() - logged, wall0 + time.time() - started)
                    window, logged = [], time.time()
                if time.time() - saved > args.save_minutes * 60:
                    log.flush()
                    save()
                    saved = time.time()
        finally:
            log.flush()
            save(" (final)")


def report(run: Run, window: list[tuple], lr: float, seconds: float, wall: float) -> None:
    flows, bindings, accs, concepts, concept_accs, groundings, shares = (mean_of_numbers(c) for c in zip(*window))
    grounded = f"grounding {groundings:.3f} share {shares:.2f} " if groundings == groundings else ""
    print(f"step {run.step} loss {flows:.4f} binding {bindings:.4f} acc {accs:.2f} concept {concepts:.4f} "
          f"acc {concept_accs:.2f} {grounded}lr {lr:.2e} {seconds / len(window):.2f} s/step wall {wall / 3600:.2f} h",
          flush=True)


if __name__ == "__main__":
    main()
