"""scripts/plot_training_curve.py: the model card's curve table from tracker points."""
from repo_scripts import load_script


def load():
    return load_script("scripts/plot_training_curve.py")


def point(step, **extra):
    task = {"default": {"identity": 0.3, "miou": 0.2, "acc": 0.5}, "best_block": 1,
            "best": {"identity": 0.4, "miou": 0.25, "acc": 0.5}}
    return {"step": step, "hours": step / 1000, "loss": 0.3, "colour|empty": task, "shape|empty": task, **extra}


def test_markdown_table_rows_with_and_without_optional_columns():
    table = load().markdown_table([
        point(10, loss=None),
        point(20, binding_acc=0.61, generated_right_shape=0.875, generated_right_colour=1.0,
              query_selectivity={"block 0": {"mean": 0.1, "positive": 0.6}, "block 3": {"mean": 0.4, "positive": 0.9}},
              generated_pairs={"both_colours": 1.0, "order_right_of_both": 0.5, "bound": 0.25}),
    ])
    header, rule, first, second = table.splitlines()
    assert header.count("|") == rule.count("|") == first.count("|") == second.count("|")
    assert first.startswith("| 10 | 0.01 |  |  | 0.30 / 0.40 (block 1) | 0.20 |")
    assert second.startswith("| 20 | 0.02 | 0.300 | 0.610 |")
    assert second.endswith("| 0.90 (block 3) | 0.88 / 1.00 | 1.00 / 0.25 |")


def test_a_decay_is_marked_where_it_starts():
    history = [{"step": 2067, "change": "zero_pooled"}, {"step": 7548, "change": "two_object_frac=0.6"},
               {"step": 20148, "change": "decay_start=21000"}, {"step": 20148, "change": "decay_steps=5000"}]
    assert load().change_steps(history) == [2067, 7548, 21000]


def test_a_decay_cancelled_before_it_began_is_not_drawn():
    history = [{"step": 2584, "change": "concept_binding_weight=1.0"},
               {"step": 3191, "change": "decay_start=5000"}, {"step": 3191, "change": "decay_steps=1500"},
               {"step": 3306, "change": "decay_steps=0"}]
    assert load().change_steps(history) == [2584]
    assert load().change_steps(history[:3]) == [2584, 5000]
    later = history + [{"step": 8795, "change": "grounding_weight=0.5"},
                       {"step": 8795, "change": "decay_start=12300"}, {"step": 8795, "change": "decay_steps=1000"}]
    assert load().change_steps(later) == [2584, 8795, 12300]  # the cancelled decay stays undrawn


def test_a_decay_moved_before_it_began_is_drawn_where_it_began_and_a_later_one_too():
    history = [{"step": 8795, "change": "decay_start=12300"}, {"step": 8795, "change": "decay_steps=1000"},
               {"step": 9669, "change": "decay_start=11900"},  # moved earlier before 12300: 11900 began
               {"step": 12702, "change": "decay_start=14500"}, {"step": 12702, "change": "decay_steps=2200"}]
    assert load().change_steps(history) == [11900, 14500]
    assert load().change_steps(history[:3]) == [11900]


def test_rows_of_steps_trained_again_after_a_resume_keep_the_later_row(tmp_path):
    csv_path = tmp_path / "loss.csv"
    csv_path.write_text("step,wall_seconds,loss\n1,1.0,0.9\n2,2.0,0.8\n3,3.0,0.7\n2,4.0,0.5\n3,5.0,0.4\n")
    rows = load().read_rows(csv_path)
    assert [(r["step"], r["loss"]) for r in rows] == [("1", "0.9"), ("2", "0.5"), ("3", "0.4")]
