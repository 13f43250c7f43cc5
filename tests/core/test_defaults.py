"""Option rules every front end shares (core/defaults.py)."""

import pytest

from concept_attention.core.defaults import (
    MAX_CONCEPTS, check_concepts, default_timestep, model_default_layers, parse_concepts, pipeline_defaults,
    resolve_layers,
)


def test_concept_rules():
    assert check_concepts([" dog ", "traffic light"]) == ["dog", "traffic light"]
    assert parse_concepts("dog, sky ,tree") == ["dog", "sky", "tree"]
    for bad, error, match in ((["dog", "DOG"], ValueError, "duplicate"), (["a", ""], ValueError, "empty"),
                              ([f"c{i}" for i in range(MAX_CONCEPTS + 1)], ValueError, "at most"),
                              ("dog", TypeError, "single string"), (5, TypeError, "list of strings"),
                              (",,", ValueError, "no concepts given")):
        with pytest.raises(error, match=match):
            parse_concepts(bad) if isinstance(bad, str) and "," in bad else check_concepts(bad)


def test_layers_and_timestep_defaults():
    class Pipe:
        concept_attention_defaults = {"layers": [1, 2], "timestep": 0.7}

    class Adapter:
        def default_layers(self):
            return [3]

    assert model_default_layers(Pipe(), Adapter()) == [1, 2] and model_default_layers(None, Adapter()) == [3]
    assert default_timestep(Pipe()) == 0.7 and default_timestep(object()) == 0.5
    assert pipeline_defaults(None) == {}
    assert resolve_layers(None, 4, [2, 3]) == [2, 3] and resolve_layers([-1, 0, 0], 4, []) == [0, 3]
    assert resolve_layers(1, 4, []) == [1]
    with pytest.raises(ValueError, match="out of range"):
        resolve_layers([4], 4, [])
