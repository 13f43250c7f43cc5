"""The evaluation runner end to end on the real VOC samples with a tiny model."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


from concept_attention.eval import main
from concept_attention.evaluation.runner import read_records

VOC = Path(__file__).resolve().parents[1] / "data" / "voc2012-val-samples"


def run(tmp, model_dir, *extra):
    out = tmp / "run"
    code = main(["--dataset", "voc", "--data-dir", str(VOC), "--model", str(model_dir), "--out", str(out),
                 "--layers", "2-3", *extra])
    assert code == 0
    return out


def results(out):
    return json.loads((out / "summary.json").read_text())["results"]


def test_binary_run_writes_records_summary_and_table(tmp_path, tiny_model_dir):
    out = run(tmp_path, tiny_model_dir, "--limit", "3")
    records = read_records(out)
    assert len(records) == 3 and {r["classes"][0] for r in records} <= {"airplane", "bird", "sheep", "cow",
                                                                        "horse", "bus"}
    summary = results(out)
    (name, scores), = summary.items()
    assert scores["num_images"] == 3 and 0 <= scores["pixel_accuracy"] <= 1 and 0 <= scores["mean_ap"] <= 1
    table = (out / "table.md").read_text()
    assert "| Method | Acc ↑ | mIoU ↑ | mAP ↑ | images |" in table and name in table


def test_interrupt_and_resume_give_the_same_summary(tmp_path, tiny_model_dir):
    full = run(tmp_path / "a", tiny_model_dir, "--limit", "3")
    partial = run(tmp_path / "b", tiny_model_dir, "--limit", "2")
    # simulate a crash mid-write: a torn last line
    with (partial / "per_image.rank0.jsonl").open("a") as handle:
        handle.write('{"id": "torn')
    resumed = run(tmp_path / "b", tiny_model_dir, "--limit", "3")
    assert resumed == partial
    lines = (resumed / "per_image.rank0.jsonl").read_text().splitlines()
    assert len([ln for ln in lines if ln.endswith("}")]) == 3  # only the missing image was added
    assert results(resumed) == results(full)
    # running again does nothing new
    run(tmp_path / "b", tiny_model_dir, "--limit", "3")
    assert len((resumed / "per_image.rank0.jsonl").read_text().splitlines()) == len(lines)


def test_multiclass_and_ablation(tmp_path, tiny_model_dir):
    out = tmp_path / "multi"
    assert main(["--dataset", "voc-multi", "--data-dir", str(VOC), "--model", str(tiny_model_dir), "--out",
                 str(out), "--limit", "2", "--ablation", "table3"]) == 0
    summary = results(out)
    assert len(summary) == 6 and all(s["num_images"] == 2 for s in summary.values())
    assert "| Method | Acc ↑ | mIoU ↑ | images |" in (out / "table.md").read_text()


def test_bad_arguments(tmp_path, capsys):
    assert main(["--dataset", "voc", "--out", str(tmp_path)]) == 2
    assert "--data-dir is required" in capsys.readouterr().err


def test_two_process_accelerate_run_equals_one_process(tmp_path, tiny_model_dir):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # same kernels in both runs
    common = ["--dataset", "voc", "--data-dir", str(VOC), "--model", str(tiny_model_dir), "--layers", "2-3",
              "--limit", "4"]
    single = tmp_path / "one"
    done = subprocess.run([sys.executable, "-m", "concept_attention.eval", *common, "--out", str(single)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "two"
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    done = subprocess.run(
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "concept_attention.eval", *common, "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.glob("per_image.rank*.jsonl")) == ["per_image.rank0.jsonl",
                                                                        "per_image.rank1.jsonl"]
    ids = [[r["id"] for r in read_records_file(p)] for p in sorted(out.glob("per_image.rank*.jsonl"))]
    assert not set(ids[0]) & set(ids[1]) and len(ids[0]) == len(ids[1]) == 2
    assert results(out) == results(single)


def read_records_file(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_synthetic_scene_tasks(tmp_path, tiny_model_dir):
    from concept_attention.evaluation.scenes import SceneSegmentation

    scenes = SceneSegmentation("shape", count=5)
    sample = scenes[0]
    assert sample.class_names == ["circle", "square", "triangle", "cross"] and scenes.num_classes == 5
    assert set(sample.mask.flatten().tolist()) - {0} <= {1, 2, 3, 4} and (sample.mask > 0).any()
    assert scenes[0].id == SceneSegmentation("shape", count=5)[0].id  # fixed seeds
    out = tmp_path / "scenes"
    assert main(["--dataset", "scenes-colour", "--model", str(tiny_model_dir), "--out", str(out),
                 "--limit", "2", "--layers", "2-3"]) == 0
    records = read_records(out)
    assert len(records) == 2 and records[0]["concepts"] == ["red", "green", "blue", "yellow", "grass", "sky", "wall"]
    assert "| Method | Acc ↑ | mIoU ↑ | images |" in (out / "table.md").read_text()


def test_resume_with_other_settings_is_refused_and_overwrite_starts_afresh(tmp_path, tiny_model_dir, capsys):
    out = run(tmp_path, tiny_model_dir, "--limit", "2", "--timestep", "0.5")
    before = (out / "per_image.rank0.jsonl").read_text()
    capsys.readouterr()
    args = ["--dataset", "voc", "--data-dir", str(VOC), "--model", str(tiny_model_dir), "--out", str(out),
            "--layers", "2-3", "--limit", "2"]
    for changed, named in ((["--timestep", "0.9"], "timestep (0.5 in the folder, 0.9 now)"),
                           (["--samples", "2"], "samples (1 in the folder, 2 now)"),
                           (["--layers", "3"], "layers ([2, 3] in the folder, [3] now)")):
        assert main(args + changed) == 2
        err = capsys.readouterr().err
        assert named in err and "--overwrite" in err and len(err.strip().splitlines()) == 1, err
    assert (out / "per_image.rank0.jsonl").read_text() == before  # nothing was mixed in
    assert main(args + ["--timestep", "0.9", "--overwrite"]) == 0
    fresh = run(tmp_path / "fresh", tiny_model_dir, "--limit", "2", "--timestep", "0.9")
    assert results(out) == results(fresh)
    assert json.loads((out / "summary.json").read_text())["settings"]["extra"] == {}


def test_ctrl_c_keeps_the_records_and_resumes(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import concept_attention.evaluation.runner as runner_module

    full = run(tmp_path / "full", tiny_model_dir, "--limit", "3")
    original, calls = runner_module.score_maps, []

    def interrupt_on_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(runner_module, "score_maps", interrupt_on_the_third)
    out = tmp_path / "partial" / "run"
    argv = ["--dataset", "voc", "--data-dir", str(VOC), "--model", str(tiny_model_dir), "--out", str(out),
            "--layers", "2-3", "--limit", "3"]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("concept-attention eval: interrupted after 2 record(s)")
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    monkeypatch.setattr(runner_module, "score_maps", original)
    assert main(argv) == 0
    assert results(out) == results(full)
