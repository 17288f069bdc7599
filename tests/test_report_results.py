"""``report/results.py`` (issue 15): the notebook's tables, summary file, choice of test images
and headline findings, on hand-made inputs (no CIFAR-10, no model, milliseconds)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from matplotlib.figure import Figure

from influence_over_inference.engine.scores import top_k
from influence_over_inference.report.results import (
    choose_test_images,
    findings,
    format_top_k,
    top_k_images,
    validation_figures,
    write_influence_summary,
)
from influence_over_inference.report.slide_inputs import load_influence_results
from influence_over_inference.study.data import CLASSES, CIFAR10Data, CIFAR10Split


def _split(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 4, 4, 3), generator=gen, dtype=torch.uint8)
    labels = torch.arange(n) % 10
    return CIFAR10Split(images, labels, [f"{CLASSES[int(c)]}/{i:04d}.png" for i, c in enumerate(labels)])


SCORES = torch.tensor([[0.5, -0.2, 0.1, -0.9, 0.3, 0.0],
                       [-0.1, 0.7, -0.4, 0.2, 0.0, -0.05]], dtype=torch.float64)  # (2 test, 6 train)


def test_top_k_images_returns_the_pictures_labels_and_scores_in_order():
    train = _split(6)
    helpful, harmful = top_k_images(top_k(SCORES, k=2), 0, train)
    assert [h[0] for h in helpful] == [0, 4] and [h[0] for h in harmful] == [3, 1]
    assert [h[3] for h in helpful] == [0.5, 0.3] and [h[3] for h in harmful] == [-0.9, -0.2]
    for index, image, label, _ in helpful + harmful:
        assert torch.equal(image, train.images[index]) and label == int(train.labels[index])
    assert [h[0] for h in top_k_images(top_k(SCORES, k=2), 1, train)[0]] == [1, 3]


def test_format_top_k_table_rows_by_kind_rank_class_file_and_signed_score():
    train = _split(6)
    text = format_top_k(17, 5, 3, top_k(SCORES, k=2), 0, train, CLASSES)
    lines = text.splitlines()
    assert lines[0] == "test image 17: true dog, predicted cat  (misclassified)"
    assert lines[1].split() == ["kind", "rank", "index", "class", "file", "score"]
    assert [line.split()[:4] for line in lines[2:]] == [
        ["helpful", "1", "0", "airplane"], ["helpful", "2", "4", "deer"],
        ["harmful", "1", "3", "cat"], ["harmful", "2", "1", "automobile"]]
    assert lines[2].split()[4:] == ["airplane/0000.png", "+5.000e-01"]
    assert lines[4].split()[-1] == "-9.000e-01"
    assert "misclassified" not in format_top_k(17, 5, 5, top_k(SCORES, k=2), 0, train, CLASSES).splitlines()[0]


def test_influence_summary_round_trips_through_the_slides_reader(tmp_path):
    data = CIFAR10Data(_split(6), _split(4, seed=1), "blobs:0123 (test)")
    solver = SimpleNamespace(name="fast", describe=lambda: {"damping": 0.01, "rank": 3})
    predictions = torch.tensor([0, 9, 2, 3])
    path = write_influence_summary(tmp_path / "influence.json", [1, 3], data, predictions, top_k(SCORES, k=2), SCORES,
                                   solver, {"test_accuracy": 0.65}, notes=["why one", "why two"], seconds=1.5,
                                   rgb_test_index=3, checkpoint="data/net.pt")
    raw = json.loads(path.read_text())
    assert raw["data_source"] == "blobs:0123 (test)" and raw["n_train"] == 6 and raw["k"] == 2
    assert raw["solver"] == {"name": "fast", "damping": 0.01, "rank": 3}
    assert raw["test_accuracy"] == 0.65 and raw["seconds"] == 1.5 and raw["rgb_test_index"] == 3
    first, second = raw["test_images"]
    assert (first["index"], first["label"], first["pred"], first["note"]) == (1, 1, 9, "why one")
    assert (second["index"], second["label"], second["pred"], second["note"]) == (3, 3, 3, "why two")
    assert [e["index"] for e in first["helpful"]] == [0, 4] and [e["score"] for e in first["harmful"]] == [-0.9, -0.2]
    assert first["n_positive"] == 3 and second["n_positive"] == 2
    loaded = load_influence_results(path)
    assert [t["index"] for t in loaded["test_images"]] == [1, 3]
    no_notes = json.loads(write_influence_summary(tmp_path / "b.json", [1, 3], data, predictions, top_k(SCORES, k=2),
                                                  SCORES, solver, {}).read_text())
    assert [t["note"] for t in no_notes["test_images"]] == [None, None] and no_notes["test_accuracy"] is None


def test_choose_test_images_picks_a_right_dog_a_mistake_and_the_readers_choice():
    dog, cat = CLASSES.index("dog"), CLASSES.index("cat")
    labels = torch.tensor([cat, dog, dog, cat, dog])
    preds = torch.tensor([cat, cat, dog, dog, dog])
    assert choose_test_images(labels, preds, CLASSES) == ([2, 1], ["a correctly classified dog", "a misclassified image"])
    assert choose_test_images(labels, preds, CLASSES, reader_index=0) == (
        [2, 1, 0], ["a correctly classified dog", "a misclassified image", "the reader's choice"])
    assert choose_test_images(labels, preds, CLASSES, cls="cat")[0] == [0, 1]
    no_dog_right = torch.tensor([cat, cat, cat, cat, dog - 1])
    assert choose_test_images(labels, no_dog_right, CLASSES) == (
        [1, 1], ["a dog (none classified correctly)", "a misclassified image"])
    assert choose_test_images(labels, labels, CLASSES) == ([1], ["a correctly classified dog"])  # no mistakes
    for bad in (5, -1):
        with pytest.raises(ValueError, match="out of range"):
            choose_test_images(labels, preds, CLASSES, reader_index=bad)
    assert choose_test_images(labels, preds, CLASSES, reader_index=4)[0] == [2, 1, 4]


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_findings_say_what_is_missing_and_which_command_makes_it(tmp_path):
    out = findings(tmp_path / "v.json", tmp_path / "e.json", tmp_path / "t.json")
    assert out == ["Engine benchmark: not computed; run `python bench/engine.py`.",
                   "Validation: not computed; run `python -m influence_over_inference validate all`."]
    (tmp_path / "bad.json").write_text("{not json")
    assert findings(tmp_path / "bad.json", tmp_path / "e.json", tmp_path / "t.json")[-1].startswith("Validation: not computed")


def test_findings_are_built_from_the_results_files(tmp_path):
    train = _write(tmp_path / "t.json", {"test_accuracy": 0.6544, "recipe": {"epochs": 2}, "seconds_per_epoch": 30.04,
                                         "device": "cpu"})
    engine = _write(tmp_path / "e.json", {"n_train": 50000, "t100_fast_s": 82.4, "t100_fast_epochs": 1.23,
                                          "speedup_vs_nimarb": 1234.5, "spearman_fast_vs_cg": 0.912})
    val = _write(tmp_path / "v.json", {
        "loo_convex_pearson": [0.99123, 0.98712], "loo_network_pearson": {"fast": [0.5, 0.7], "cg": [0.6, 0.6]},
        "flipped_found_at_20": 0.5, "loss_found_at_20": 0.3, "random_found_at_20": 0.2, "last_layer_found_at_20": 0.45,
        "sign_harmful_removed_delta": -0.123, "sign_helpful_removed_delta": 0.456, "sign_n_test": 8})
    out = findings(val, engine, train)
    assert out[0] == "The CNN reaches 65.4% test accuracy after 2 epochs (30.0 s per epoch on cpu)."
    assert "fast solver 82 s (1.2 training epochs), 1,234x faster" in out[1] or "1,235x" in out[1]
    assert "kronfluence EK-FAC n/a s" in out[1] and "fast 0.91," in out[1] and "100 test x 50,000" in out[1]
    assert out[2] == "Leave-one-out, last layer (convex): Pearson 0.9871 to 0.9912 over 2 test images (goal 0.95)."
    assert out[3] == ("Leave-one-out, whole network (retrained, control subtracted): Pearson fast 0.50 to 0.70, cg 0.60 "
                      "(goal 0.9; Koh & Liang 0.86).")
    assert out[4] == ("Flipped labels (10%): checking the top 20% by self-influence finds 50% of them, by training loss "
                      "30%, by last-layer self-influence 45% (random: 20%).")
    assert out[5] == ("The sign, by retraining (8 misclassified test images): removing the 100 most harmful changes their "
                      "test loss by -0.12 on average, removing the 100 most helpful by +0.46.")
    assert len(out) == 6
    _write(val, {"flipped_found_at_20": 0.5, "loss_found_at_20": 0.3})
    assert findings(val, engine, train)[2:] == [
        "Flipped labels (10%): checking the top 20% by self-influence finds 50% of them, by training loss 30% (random: 20%)."]


def test_validation_figures_say_not_computed_when_missing(tmp_path):
    from influence_over_inference.report.slide_inputs import load_validation

    figs = validation_figures(load_validation(tmp_path / "missing.json"))
    assert len(figs) == 1 and isinstance(figs[0], Figure)
    assert "not computed" in " ".join(t.get_text() for t in figs[0].texts)


def test_findings_quote_the_idle_benchmark_when_there_is_one(tmp_path):
    """bench/trust.py's idle keys win over the superseded under-load ones; nimarb's ratio is labelled as under load."""
    engine = _write(tmp_path / "e.json", {"n_train": 50000, "t100_default_s": 144.6, "t100_default_epochs": 27.4,
                                          "kronfluence_t100_s": 169.9, "seed_spearman_default": 0.9245,
                                          "pearson_default_vs_exact_small": 0.9869, "t100_fast_s": 1.0,
                                          "superseded_under_load": {"keys": {"speedup_vs_nimarb": 513.0}}})
    out = findings(validation_path=tmp_path / "absent.json", engine_path=engine, train_path=tmp_path / "absent.json")
    assert out[0].startswith("Engine, idle machine, 1 thread (100 test x 50,000 training images)")
    assert "145 s (27.4 training epochs)" in out[0] and "EK-FAC 170 s" in out[0] and "Spearman 0.92;" in out[0]
    assert "exact influence 0.987." in out[0] and "Under load with the old default, 513x faster" in out[0]
    assert out[1].startswith("Validation: not computed")
