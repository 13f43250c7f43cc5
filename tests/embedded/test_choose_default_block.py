"""scripts/choose_default_block.py: default blocks chosen on validation scenes only."""
import json

from repo_scripts import load_script


def load():
    return load_script("scripts/choose_default_block.py")


def results(block_mious: dict[int, float], all_blocks: float) -> dict:
    rows = {"colour|-|all background": {"miou": 0.9}}
    for task in ("colour", "shape"):
        for prompt in ("caption", "empty"):
            for block, miou in block_mious.items():
                rows[f"{task}|{prompt}|ConceptAttention block {block}"] = {"miou": miou}
            rows[f"{task}|{prompt}|ConceptAttention (all blocks)"] = {"miou": all_blocks}
            rows[f"{task}|{prompt}|value space block 0"] = {"miou": 0.99}
    return rows


def test_scores_average_concept_attention_rows_only():
    scores = load().candidate_scores(results({0: 0.1, 1: 0.3}, all_blocks=0.2))
    assert scores == {"block 0": 0.1, "block 1": 0.3, "all blocks": 0.2}


def test_all_blocks_lists_every_scored_block():
    script = load()
    assert script.layers_for("all blocks", ["block 2", "block 0", "all blocks", "block 1"]) == [0, 1, 2]
    assert script.layers_for("block 3", ["block 3"]) == [3]


def test_refuses_a_test_split(tmp_path, capsys):
    path = tmp_path / "scenes.json"
    path.write_text(json.dumps({"meta": {"split": "test"}, "results": results({0: 0.1}, 0.1)}))
    assert load().main([str(path)]) == 2
    assert "validation" in capsys.readouterr().err


def test_prints_the_ranking_without_writing(tmp_path, capsys):
    path = tmp_path / "scenes.json"
    path.write_text(json.dumps({"meta": {"split": "validation", "scenes": 5},
                                "results": results({0: 0.1, 1: 0.3}, all_blocks=0.2)}))
    assert load().main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "block 1: 0.300; all blocks: 0.200; block 0: 0.100" in out
    assert "best: block 1" in out and "wrote" not in out
