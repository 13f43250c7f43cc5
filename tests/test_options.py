"""The one resolver of user options (options.py): sizes, frame counts, model kinds, explain arguments."""

import pytest

from concept_attention.options import (
    adapter_of, check_request, checked_num_frames, checked_size, default_layers, model_size, run_size, size_rule,
)


def test_sizes():
    assert model_size(640, 480, 1024, 16) == (1360, 1024)  # shorter side to native, multiples of 16
    assert run_size(640, 480, None, (1024, 16)) == (1360, 1024)
    assert run_size(640, 480, (512, 256), (1024, 16)) == (512, 256)
    with pytest.raises(ValueError, match="multiples of 16"):
        checked_size((500, 256), 16)


def test_model_kind_defaults_and_request_checks(flux_pipe):
    assert adapter_of(flux_pipe).family == "flux"
    with pytest.raises(TypeError, match="is an image model"):
        adapter_of(flux_pipe, video=True)
    with pytest.raises(TypeError, match="pipeline with a transformer"):
        adapter_of(object())
    with pytest.raises(ValueError, match="num_frames is for video models"):
        checked_num_frames(flux_pipe, 9)
    assert default_layers(flux_pipe) == [2, 3]
    assert size_rule(flux_pipe) == (flux_pipe.default_sample_size * 2, 4)  # tiny VAE: scale 2, 2x2 patches
    assert check_request(flux_pipe, "", None, 2) == 0.5
    for args, match in ((("", 0.0, 2), "timestep"), (("", 0.5, 0), "num_samples"), ((3, 0.5, 1), "prompt")):
        with pytest.raises((ValueError, TypeError), match=match):
            check_request(flux_pipe, *args)
