"""Explain a real image: where does the model see each concept in a picture it did not make?

The image is VAE-encoded, noised to one timestep with the flow-matching rule
``x_t = (1 - t)·x_0 + t·noise`` (``t=0.5`` is the paper's timestep 500 of 1000), and the
transformer runs once with the prompt (empty by default) and the concepts. ``num_samples`` noise
draws run as one batch and their maps are averaged. The forward stops right after the last
selected dual-stream block (early exit): nothing after it is computed.

Size policy: the shorter side is scaled to the model's native size, keeping the aspect ratio, and
both sides are rounded to the nearest multiple the model accepts (FLUX.1: 16 px). Maps are on the
resulting patch grid; :meth:`ConceptMaps.upsample` brings them back onto the original image.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from . import saving, viz  # noqa: F401  (the views behind ConceptMaps.save/load/figure/overlay)
from .core.contract import ExplainRequest
from .core.maps import ConceptMaps
from .core.session import ConceptAttention
from .options import adapter_of, check_budget, check_request, run_size

ImageInput = str | Path | Image.Image | np.ndarray | torch.Tensor


class _EarlyExit(Exception):
    """Raised after the last needed block to stop the transformer's forward."""


def load_image(image: ImageInput) -> Image.Image:
    """Read ``image`` into an RGB PIL image (EXIF orientation applied, alpha composited on white).

    Accepts a path, a PIL image in any mode, a numpy array (H, W[, C]; uint8 or floats in [0, 1])
    or a tensor ((C, H, W) or (H, W, C); floats in [0, 1] or uint8).
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"no image file at {path}")
        try:
            data = path.read_bytes()
            picture = Image.open(io.BytesIO(data))
            picture.load()
        except UnidentifiedImageError:
            raise ValueError(f"cannot read {path} as an image: not a picture format Pillow reads") from None
        except (OSError, SyntaxError, ValueError) as error:
            raise ValueError(f"cannot read {path} as an image: {error.__class__.__name__}: {error}") from None
        image = picture
    if isinstance(image, Image.Image):
        picture = ImageOps.exif_transpose(image) or image
        if picture.width == 0 or picture.height == 0:
            raise ValueError("the image is empty (zero width or height)")
        if picture.mode in ("RGBA", "LA", "PA") or (picture.mode == "P" and "transparency" in picture.info):
            rgba = picture.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return picture.convert("RGB")
    if isinstance(image, torch.Tensor):
        array = image.detach().cpu()
        if array.dim() == 4 and array.shape[0] == 1:
            array = array[0]
        if array.dim() == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.permute(1, 2, 0)
        image = array.numpy()
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise ValueError(f"an image array must be (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
        if array.shape[0] == 0 or array.shape[1] == 0:
            raise ValueError("the image is empty (zero width or height)")
        if array.dtype != np.uint8:
            array = np.clip(np.nan_to_num(array.astype(np.float32)), 0.0, 1.0) * 255.0 + 0.5
            array = array.astype(np.uint8)
        return load_image(Image.fromarray(array))
    raise TypeError(
        f"cannot explain an image of type {type(image).__name__}; give a path, a PIL image, a numpy array or a tensor"
    )


def explain(
    pipe: Any,
    image: ImageInput,
    concepts: Sequence[str],
    prompt: str = "",
    timestep: float | None = None,
    num_samples: int = 4,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    *,
    size: tuple[int, int] | None = None,
    space: str | Sequence[str] = "output",
    batch_samples: bool = True,
    max_sequence_length: int | None = None,
    **options: Any,
) -> ConceptMaps:
    """ConceptAttention maps of ``concepts`` on a real image (videos: :func:`explain_video`).

    Args:
        pipe: a supported diffusers image pipeline (e.g. ``FluxPipeline``).
        image: path, PIL image (any mode), numpy array or tensor.
        concepts: the words to locate, e.g. ``["dog", "grass", "sky"]``.
        prompt: text the transformer sees with the image (empty by default).
        timestep: noise level t in (0, 1]; default: the pipeline's ``timestep`` default
            (``concept_attention.json``), else 0.5, the paper's choice.
        num_samples: noise draws averaged (one batched forward unless ``batch_samples=False``).
        seed: seed of the noise draws.
        layers: dual-stream blocks to average (default: the deeper half).
        size: (width, height) to run at instead of the size policy.
        space: as in :class:`ConceptAttention`; several spaces are returned in ``maps.others``.
        options: further :class:`ConceptAttention` options (``softmax``, ablations, ...).

    Returns:
        :class:`ConceptMaps` of shape ``(1, concepts, h, w)``, with ``maps.image`` set to the RGB
        image and ``maps.meta`` recording sizes, prompt, timestep, samples and seed.
    """
    timestep = check_request(pipe, prompt, timestep, num_samples)
    adapter_of(pipe, video=False)
    picture = load_image(image)
    session = ConceptAttention(pipe, concepts, layers=layers, space=space, max_sequence_length=max_sequence_length,
                               **options)
    width, height = run_size(picture.width, picture.height, size, session.adapter.image_size_rule(pipe))
    check_budget(pipe, width, height, batch=num_samples if batch_samples else 1)
    pixels = pipe.image_processor.preprocess(picture, height=height, width=width)
    generator = torch.Generator().manual_seed(int(seed))
    chunks = [num_samples] if batch_samples else [1] * num_samples
    batches = (session.adapter.explain_inputs(ExplainRequest(pipe, pixels, prompt, timestep, count, generator,
                                                             session.max_sequence_length))
               for count in chunks)
    maps = run_to_last_layer(session, batches)
    maps.meta.update({"mode": "explain", "prompt": prompt, "timestep": timestep, "num_samples": num_samples,
                      "seed": int(seed), "original_size": [picture.width, picture.height],
                      "model_size": [width, height]})
    maps.image = picture
    return maps


def run_to_last_layer(session: ConceptAttention, batches: Iterable[dict[str, Any]]) -> ConceptMaps:
    """Run the transformer on each batch of inputs inside ``session``, stopping after the last recorded block.

    ``batches`` is consumed lazily (one batch's inputs alive at a time); the maps are averaged over
    every noise sample of every batch.
    """
    stop_at = session.adapter.last_module_for(max(session.layers))

    def stop(module: torch.nn.Module, args: Any, output: Any) -> None:
        raise _EarlyExit

    with session:
        handle = stop_at.register_forward_hook(stop)
        try:
            for inputs in batches:
                try:
                    with torch.no_grad():
                        session.transformer(**inputs)
                except _EarlyExit:
                    pass
        finally:
            handle.remove()
    return _average_samples(session)


def _average_samples(session: ConceptAttention) -> ConceptMaps:
    """The session's maps with the noise-sample batch averaged into one image."""
    results = {}
    for space in session.spaces:
        maps = session.maps_for(space)
        per_layer = None if maps.per_layer is None else maps.per_layer.mean(dim=1, keepdim=True)
        results[space] = maps.replace(tensor=maps.tensor.mean(dim=0, keepdim=True), per_layer=per_layer)
    primary = results.pop(session.spaces[0])
    primary.others = results
    return primary
