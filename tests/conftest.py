import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread is fastest and leaves a core free


@pytest.fixture(scope="session")
def flux_pipe():
    import tiny

    return tiny.flux_pipeline()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny FluxPipeline saved as a local diffusers directory, with library defaults."""
    import json

    import tiny

    path = tmp_path_factory.mktemp("tiny-flux")
    tiny.flux_pipeline(seed=4).save_pretrained(path)
    (path / "concept_attention.json").write_text(
        json.dumps({"size": 32, "max_sequence_length": 16, "num_inference_steps": 2})
    )
    return path


VOC_SAMPLES = Path(__file__).resolve().parent / "data" / "voc2012-val-samples"
