#!/usr/bin/env python
"""Train the embedded default model (tiny FLUX.1 pipeline) on rendered scenes, resumably.

Rectified flow exactly as ``diffusers.FluxPipeline`` samples:
  latents x0 = (vae.encode(img).latent_dist.mean - shift_factor) * scaling_factor  (frozen VAE),
  packed with ``FluxPipeline._pack_latents``; img ids ``FluxPipeline._prepare_latent_image_ids``;
  text through ``FluxPipeline.encode_prompt`` (CLIP pooled + T5 padded to max_sequence_length=32,
  text ids zeros); sigma ~ logit-normal(0, 1); x_t = (1 - sigma) x0 + sigma eps;
  the transformer gets ``timestep=sigma`` and regresses eps - x0 (MSE).
The transformer and both text encoders are trained jointly (AdamW, warm-up, grad clip, EMA).

Data: scenes are rendered on the fly; batch ``k`` is a pure function of (seed, k), so resuming
reproduces the data stream. ``--resume`` restores model, EMA, optimiser, step, RNG and loss log
from ``<ckpt-dir>/last.pt``. A checkpoint is written every ``--save-minutes`` (atomic), at the end,
and on SIGTERM/SIGINT.

Example (background, resumable):
  GOMP_SPINCOUNT=0 OMP_WAIT_POLICY=PASSIVE nohup nice -n 10 python scripts/train_embedded.py --resume \
      >> checkpoints/embedded/train.log 2>&1 &
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from concept_attention.embedded import MAX_SEQUENCE_LENGTH, build_pipeline
from concept_attention.evaluation.scenes import HELD_OUT_SEED, VALIDATION_SEED
from concept_attention.scenes import render_scene, training_caption

HELDOUT_SEED_BASE = 1_000_000_000  # training scene seeds are < this
TRAINABLE = ("transformer", "text_encoder", "text_encoder_2")
RECIPE_DEFAULTS = {"t_logit_mean": 0.0, "t_high_frac": 0.0, "t_high_mean": 3.0, "two_object_frac": 0.0,
                   "decay_start": 0, "decay_steps": 0, "lr_final": 1e-4}
#: seeds of the held-out scenes of benchmarks/scenes.py (test and validation splits); never drawn as extra seeds
HELDOUT_RANGES = tuple((first, first + 1_000_000) for first in (HELD_OUT_SEED, VALIDATION_SEED))


# --------------------------------------------------------------------------- data
def binding_scene(scene) -> bool:
    """Two objects that differ in colour and in shape: a caption can only be drawn right by binding words to objects."""
    return (len(scene.objects) == 2 and scene.objects[0].colour != scene.objects[1].colour
            and scene.objects[0].shape != scene.objects[1].shape)


def _extra_seed(rng) -> int:
    while True:
        s = int(rng.integers(0, HELDOUT_SEED_BASE))
        if not any(lo <= s < hi for lo, hi in HELDOUT_RANGES):
            return s


def make_batch(seed: int, step: int, batch_size: int, caption_mode: str = "train", two_object_frac: float = 0.0):
    """Batch number ``step``: (uint8 images (B,H,W,3) as a tensor, list of captions). Deterministic.

    With ``two_object_frac`` > 0, that fraction of the scenes (on average) is redrawn until it is a
    :func:`binding_scene`; with 0 the batch is exactly the original stream's.
    """
    rng = np.random.default_rng([seed, step, 0xDA7A])
    seeds = rng.integers(0, HELDOUT_SEED_BASE, batch_size)
    extra = np.random.default_rng([seed, step, 0xB1D2]) if two_object_frac > 0 else None
    images, captions = [], []
    for s in seeds:
        sc = render_scene(int(s))
        if extra is not None and extra.random() < two_object_frac:
            while not binding_scene(sc):
                sc = render_scene(_extra_seed(extra))
        images.append(sc.image)
        captions.append(training_caption(sc, rng) if caption_mode == "train" else sc.caption)
    return torch.from_numpy(np.stack(images)), captions


class BatchStream(torch.utils.data.IterableDataset):
    def __init__(self, seed, start_step, batch_size, two_object_frac=0.0):
        self.seed, self.start_step, self.batch_size = seed, start_step, batch_size
        self.two_object_frac = two_object_frac

    def __iter__(self):
        torch.set_num_threads(1)
        k = self.start_step
        while True:
            yield make_batch(self.seed, k, self.batch_size, two_object_frac=self.two_object_frac)
            k += 1


def batch_iter(args, start_step):
    if args.workers <= 0:
        k = start_step
        while True:
            yield make_batch(args.seed, k, args.batch_size, two_object_frac=args.two_object_frac)
            k += 1
    else:
        dl = torch.utils.data.DataLoader(BatchStream(args.seed, start_step, args.batch_size, args.two_object_frac), batch_size=None,
                                         num_workers=1, prefetch_factor=4, persistent_workers=False)
        yield from dl


# --------------------------------------------------------------------------- model
def load_models(vae_dir: str, seed: int):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir)
    pipe = build_pipeline(seed=seed, vae=vae)
    pipe.vae.requires_grad_(False).eval()
    return pipe


def trainable_params(pipe):
    return [p for name in TRAINABLE for p in getattr(pipe, name).parameters()]


def model_state(pipe):
    return {name: {k: v.detach().clone() for k, v in getattr(pipe, name).state_dict().items()} for name in TRAINABLE}


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


def sample_noise_levels(b: int, generator=None, t_logit_mean: float = 0.0, t_high_frac: float = 0.0,
                        t_high_mean: float = 3.0) -> torch.Tensor:
    """Noise levels: logit-normal(t_logit_mean, 1); a fraction ``t_high_frac`` from logit-normal(t_high_mean, 1)."""
    z = torch.randn(b, generator=generator)
    high = torch.rand(b, generator=generator) < t_high_frac
    return torch.sigmoid(z + torch.where(high, t_high_mean, t_logit_mean))


def flow_loss(pipe, images_u8, captions, generator=None, t_logit_mean: float = 0.0, t_high_frac: float = 0.0,
              t_high_mean: float = 3.0, sigma: torch.Tensor | None = None):
    x0, img_ids = latents_and_ids(pipe, images_u8)
    prompt_embeds, pooled, text_ids = pipe.encode_prompt(
        prompt=captions, prompt_2=captions, device=x0.device, num_images_per_prompt=1,
        max_sequence_length=MAX_SEQUENCE_LENGTH)
    b = x0.shape[0]
    if sigma is None:
        sigma = sample_noise_levels(b, generator, t_logit_mean, t_high_frac, t_high_mean)
    eps = torch.randn(x0.shape, generator=generator)
    s = sigma[:, None, None]
    xt = (1 - s) * x0 + s * eps
    pred = pipe.transformer(hidden_states=xt, timestep=sigma, guidance=None, pooled_projections=pooled,
                            encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=img_ids,
                            return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred, eps - x0)


# --------------------------------------------------------------------------- checkpoint
def _compact_optimizer_state(opt):
    sd = opt.state_dict()
    state = {}
    for k, st in sd["state"].items():
        state[k] = {n: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.dim() > 0 else v) for n, v in st.items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def _restore_optimizer_state(opt, sd):
    state = {}
    for k, st in sd["state"].items():
        state[k] = {n: (v.float() if torch.is_tensor(v) and v.dim() > 0 else v) for n, v in st.items()}
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def save_checkpoint(path: Path, pipe, ema_params, opt, step, wall, args, extra=None):
    params = trainable_params(pipe)
    ckpt = {
        "format": "embedded-flux-v1",
        "step": step,
        "wall_seconds": wall,
        "args": vars(args),
        "seed": args.seed,
        "model": model_state(pipe),
        # EMA stored as fp16 difference to the fp32 weights (compact, accurate)
        "ema_delta": [(e - p.detach()).to(torch.float16) for e, p in zip(ema_params, params)],
        "optimizer": _compact_optimizer_state(opt),
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state(),
        "vae_config": dict(pipe.vae.config),
        **(extra or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, pipe, opt=None, map_location="cpu"):
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    for name in TRAINABLE:
        getattr(pipe, name).load_state_dict(ckpt["model"][name])
    params = trainable_params(pipe)
    ema = [p.detach().clone() + d.float() for p, d in zip(params, ckpt["ema_delta"])]
    if opt is not None:
        _restore_optimizer_state(opt, ckpt["optimizer"])
    return ckpt, ema


def load_ema_pipeline(ckpt_path, vae_dir=None):
    """A FluxPipeline with the EMA weights of a training checkpoint (fp32, eval)."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    a = ckpt["args"]
    pipe = load_models(vae_dir or a["vae"], a["seed"])
    for name in TRAINABLE:
        getattr(pipe, name).load_state_dict(ckpt["model"][name])
    with torch.no_grad():
        for p, d in zip(trainable_params(pipe), ckpt["ema_delta"]):
            p.add_(d.float())
    for name in TRAINABLE:
        getattr(pipe, name).eval()
    pipe.ckpt_step = ckpt["step"]
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
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the transformer in place (benchmarks/train_step_speed.py: ~10 %% less time "
                         "per step on 2 CPU cores, after ~2 min of compiling at every start)")
    ap.add_argument("--save-minutes", type=float, default=5.0)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--zero-pooled", action="store_true",
                    help="switch off the pooled CLIP pathway (zero, frozen text_embedder.linear_1), so the prompt "
                         "conditions the image only through T5 tokens in attention; sticky once in a checkpoint")
    ap.add_argument("--freeze-t5", action="store_true",
                    help="reset the T5 encoder to its seeded initial weights and freeze it (a fixed prompt encoder, as "
                         "FLUX.1 trains with a frozen T5); sticky once in a checkpoint")
    ap.add_argument("--t-logit-mean", type=float, default=None,
                    help="mean of the logit-normal noise-level distribution (0 = SD3's default; ln 3 ~ 1.1 shifts "
                         "training towards high noise, where the caption decides the image); default: the "
                         "checkpoint's value, else 0")
    ap.add_argument("--t-high-frac", type=float, default=None,
                    help="fraction of noise levels drawn from logit-normal(--t-high-mean, 1) instead (the caption "
                         "decides the image only at t >~ 0.95 on these scenes); default: the checkpoint's value, else 0")
    ap.add_argument("--t-high-mean", type=float, default=None, help="default: the checkpoint's value, else 3.0")
    ap.add_argument("--two-object-frac", type=float, default=None,
                    help="fraction of training scenes redrawn to have two objects of different colours and shapes "
                         "(the caption is then only drawn right if words bind to objects); default: the "
                         "checkpoint's value, else 0")
    ap.add_argument("--decay-start", type=int, default=None,
                    help="step where the learning rate starts a linear decay to --lr-final; default: the "
                         "checkpoint's value, else 0")
    ap.add_argument("--decay-steps", type=int, default=None,
                    help="length of the linear decay (0 = no decay: constant --lr after warm-up); default: the "
                         "checkpoint's value, else 0")
    ap.add_argument("--lr-final", type=float, default=None,
                    help="learning rate at the end of the decay; default: the checkpoint's value, else 1e-4")
    return ap.parse_args(argv)


def lr_at(step, args):
    """Linear warm-up to --lr, then constant, or a linear decay to --lr-final from --decay-start."""
    lr = args.lr
    if args.decay_steps and step >= args.decay_start:
        frac = min(1.0, (step - args.decay_start) / args.decay_steps)
        lr = args.lr + frac * (args.lr_final - args.lr)
    return lr * min(1.0, (step + 1) / max(1, args.warmup))


def pooled_layer(pipe):
    """The first linear layer of the transformer's pooled-text projection."""
    return pipe.transformer.time_text_embed.text_embedder.linear_1


def zero_pooled_pathway(pipe, ema, params):
    """Zero and freeze the pooled-text projection (model and EMA); the CLIP encoder then gets no gradient."""
    layer = pooled_layer(pipe)
    with torch.no_grad():
        for p, e in zip(params, ema):
            if p is layer.weight or p is layer.bias:
                p.zero_()
                e.zero_()
    layer.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)


def freeze_t5(pipe, ema, params, initial_state):
    """Put the T5 encoder back to ``initial_state`` (model and EMA) and freeze it."""
    encoder = pipe.text_encoder_2
    encoder.load_state_dict(initial_state)
    t5_params = {id(p) for p in encoder.parameters()}
    with torch.no_grad():
        for p, e in zip(params, ema):
            if id(p) in t5_params:
                e.copy_(p)
    encoder.requires_grad_(False)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ckpt_dir = Path(args.ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    last = ckpt_dir / "last.pt"
    loss_csv = ckpt_dir / "loss.csv"

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    pipe = load_models(args.vae, args.seed)
    if args.compile:
        pipe.transformer.compile()  # in place: parameter names, checkpoints and the EMA are unchanged
    for name in TRAINABLE:
        getattr(pipe, name).train().requires_grad_(True)
    initial_t5 = {k: v.clone() for k, v in pipe.text_encoder_2.state_dict().items()}
    params = trainable_params(pipe)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)

    step, wall0 = 0, 0.0
    if args.resume and last.exists():
        ckpt, ema = load_checkpoint(last, pipe, opt)
        step, wall0 = ckpt["step"], ckpt["wall_seconds"]
        torch.set_rng_state(ckpt["torch_rng"])
        np.random.set_state(ckpt["numpy_rng"])
        old = ckpt["args"]
        for k in ("seed", "batch_size"):
            if old.get(k) != getattr(args, k):
                print(f"note: --{k} {getattr(args, k)} differs from checkpoint ({old.get(k)}); using the new value",
                      flush=True)
        # loss log: drop rows written after the checkpoint
        if loss_csv.exists():
            with open(loss_csv) as f:
                rows = list(csv.reader(f))
            keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step]
            with open(loss_csv, "w", newline="") as f:
                csv.writer(f).writerows(keep)
        print(f"resumed from {last} at step {step} ({wall0 / 3600:.2f} h trained)", flush=True)
    else:
        ema = [p.detach().clone() for p in params]
        with open(loss_csv, "w", newline="") as f:
            csv.writer(f).writerow(["step", "wall_seconds", "loss", "lr"])
    previous = ckpt["args"] if args.resume and last.exists() else {}
    history = list(previous.get("history", []))
    for flag in ("zero_pooled", "freeze_t5"):
        if previous.get(flag):
            setattr(args, flag, True)
        elif getattr(args, flag):
            history.append({"step": step, "change": flag})
    for name, default in RECIPE_DEFAULTS.items():  # sticky recipe values: given > checkpoint > default
        before = previous.get(name)
        before = default if before is None else float(before)
        if getattr(args, name) is None:
            setattr(args, name, before)
        elif getattr(args, name) != before and previous:
            history.append({"step": step, "change": f"{name}={getattr(args, name)}"})
    args.history = history
    if args.zero_pooled:
        zero_pooled_pathway(pipe, ema, params)
        print("pooled CLIP pathway: off (zero, frozen)", flush=True)
    if args.freeze_t5 and not previous.get("freeze_t5"):
        freeze_t5(pipe, ema, params, initial_t5)
    if args.freeze_t5:
        pipe.text_encoder_2.requires_grad_(False)
        print("T5 encoder: frozen at its seeded initial weights", flush=True)
    (ckpt_dir / "args.json").write_text(json.dumps({**vars(args), "start_step": step}, indent=2))

    stop = {"flag": False}

    def _handler(signum, frame):
        stop["flag"] = True
        print(f"signal {signum}: saving and stopping after this step", flush=True)

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)

    tty = sys.stdout.isatty()
    bar = None
    if tty:
        from tqdm import tqdm
        bar = tqdm(initial=step, total=args.max_steps if args.max_steps < 1_000_000 else None, dynamic_ncols=True)

    t_run = time.time()
    t_save = time.time()
    csv_f = open(loss_csv, "a", newline="")
    writer = csv.writer(csv_f)
    interval_losses, t_int = [], time.time()
    data = batch_iter(args, step)
    try:
        while step < args.max_steps and not stop["flag"]:
            if args.minutes and time.time() - t_run > args.minutes * 60:
                break
            images, captions = next(data)
            lr = lr_at(step, args)
            for g in opt.param_groups:
                g["lr"] = lr
            loss = flow_loss(pipe, images, captions, t_logit_mean=args.t_logit_mean, t_high_frac=args.t_high_frac,
                             t_high_mean=args.t_high_mean)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], args.grad_clip)
            opt.step()
            step += 1
            decay = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
            lv = loss.item()
            wall = wall0 + time.time() - t_run
            writer.writerow([step, f"{wall:.1f}", f"{lv:.5f}", f"{lr:.3e}"])
            interval_losses.append(lv)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{lv:.4f}", lr=f"{lr:.1e}")
            if step % args.log_every == 0:
                csv_f.flush()
                if bar is None:
                    dt = (time.time() - t_int) / len(interval_losses)
                    print(f"step {step} loss {np.mean(interval_losses):.4f} lr {lr:.2e} {dt:.2f} s/step "
                          f"wall {wall / 3600:.2f} h", flush=True)
                interval_losses, t_int = [], time.time()
            if time.time() - t_save > args.save_minutes * 60:
                csv_f.flush()
                save_checkpoint(last, pipe, ema, opt, step, wall0 + time.time() - t_run, args)
                t_save = time.time()
                print(f"saved checkpoint at step {step}", flush=True)
    finally:
        csv_f.flush()
        csv_f.close()
        save_checkpoint(last, pipe, ema, opt, step, wall0 + time.time() - t_run, args)
        print(f"saved checkpoint at step {step} (final)", flush=True)
        if bar is not None:
            bar.close()


if __name__ == "__main__":
    main()
