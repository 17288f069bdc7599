"""The deck builds from small synthetic results: page count, extractable text with the results'
numbers, sharp upscaled images, "not computed" pages for missing results, byte-identical rebuilds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pypdf import PdfReader

from influence_over_inference.report.deck import UPSCALE
from influence_over_inference.report.slide_inputs import SlidesConfig
from influence_over_inference.report.slides import build_slides
from influence_over_inference.study.data import CLASSES, CIFAR10Data, CIFAR10Split

N_TRAIN, N_TEST = 200, 40


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)

    def split(n):
        images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)
        labels = torch.arange(n) % 10
        return CIFAR10Split(images, labels, [f"x/{i}.png" for i in range(n)])

    return CIFAR10Data(split(N_TRAIN), split(N_TEST), source="folder:/synthetic (JPEG copy)")


def _write_results(root, data):
    results = root / "results"
    results.mkdir(parents=True)
    rng = np.random.default_rng(1)
    history = [{"epoch": e, "loss": 2.0 / e, "accuracy": 0.3 + 0.05 * e, "seconds": 1.0} for e in (1, 2, 3)]
    train = {"recipe": {"epochs": 3, "batch_size": 32, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4,
                        "cosine": True, "seed": 0, "n_train": None},
             "data_source": data.source, "n_train": N_TRAIN, "seconds_per_epoch": 1.234,
             "history": history, "test_accuracy": 0.4321,
             "test_per_class": {c: 0.1 * (i + 1) for i, c in enumerate(CLASSES)}, "device": "cpu"}
    (results / "train.json").write_text(json.dumps(train))

    def top(sign):
        return [{"index": int(i), "score": sign * float(s)}
                for i, s in zip(rng.choice(N_TRAIN, 5, replace=False), [5e-4, 4e-4, 3e-4, 2e-4, 1e-4], strict=True)]

    tests = [(5, 5), (3, 7), (12, 4)]  # (index, predicted); labels from the data
    influence = {"data_source": data.source, "n_train": N_TRAIN, "k": 5,
                 "solver": {"name": "fastsolver", "damping": 0.001},
                 "test_images": [{"index": i, "label": int(data.test.labels[i]), "pred": p,
                                  "helpful": top(1), "harmful": top(-1)} for i, p in tests]}
    influence["test_images"][0]["note"] = "a correctly classified dog"
    (results / "influence.json").write_text(json.dumps(influence))

    # the format of validation.summarize: arrays in an npz named by the JSON
    x = rng.normal(size=(3, 20)) * 1e-3
    grid = np.linspace(0, 1, 51)
    arrays = {}
    for k in range(3):
        arrays[f"loo_convex_predicted_{k}"] = x[k]
        arrays[f"loo_convex_actual_{k}"] = x[k] + 1e-4 * rng.normal(size=20)
        arrays[f"loo_network_actual_{k}"] = x[k] + 3e-4 * rng.normal(size=20)
        for solver in ("cg", "fast"):
            arrays[f"loo_network_predicted_{solver}_{k}"] = x[k]
    for name, power in (("self_influence", 0.3), ("training_loss", 0.6), ("random", 1.0)):
        arrays[f"flipped_{name}_checked"] = grid
        arrays[f"flipped_{name}_found"] = grid ** power
    np.savez(results / "validation_arrays.npz", **arrays)
    validation = {"loo_convex_pearson": [0.987, 0.976, 0.964], "loo_convex_test_indices": [0, 1, 2],
                  "loo_network_pearson": {"cg": [0.912, 0.871, 0.853], "fast": [0.9, 0.8, 0.7]},
                  "loo_network_spearman": {"cg": [0.9, 0.8, 0.7], "fast": [0.9, 0.8, 0.7]},
                  "loo_network_test_indices": [0, 1, 2],
                  "flipped_found_at_10": 0.61, "flipped_found_at_20": 0.83, "flipped_auc": 0.917,
                  "loss_found_at_20": 0.52, "loss_auc": 0.7, "sign_harmful_removed_delta": -0.4567,
                  "sign_helpful_removed_delta": 0.789, "sign_n_test": 10, "sign_harmful_removed_fell": 9,
                  "sign_helpful_removed_rose": 10, "sign_flipped_to_correct": 4,
                  "sign_harmful_removed_deltas": (-0.5 + 0.1 * rng.normal(size=10)).tolist(),
                  "sign_helpful_removed_deltas": (0.8 + 0.1 * rng.normal(size=10)).tolist(),
                  "sign_test_indices": list(range(3, 13)),
                  "settings": {"sign": {"n_remove": 100}}, "minutes": {"flipped": 3.0},
                  "data_source": data.source, "arrays": "validation_arrays.npz",
                  "n_train": {"loo_convex": N_TRAIN, "loo_network": 100, "flipped": N_TRAIN, "sign": 100}}
    (results / "validation.json").write_text(json.dumps(validation))
    _write_perturbation(results, data, rng)
    methods = {name: {"n_models": n, "lds_margin": v, "lds_margin_ci": [v - 0.01, v + 0.01], "computed": True}
               for name, n, v in (("fast", 1, 0.061), ("kronfluence_ekfac", 1, 0.07), ("grad_dot", 1, 0.023),
                                  ("random", 1, -0.004), ("fast_ens10", 10, 0.09), ("trak_10", 10, 0.076))}
    (results / "lds.json").write_text(json.dumps({
        "n_subsets": 50, "n_test": 500, "default_solver": "fast", "methods": methods, "data_source": data.source,
        "methods_from_other_checkpoints": ["fast_ens10", "trak_10"],
        "paired": {"fast": {"grad_dot": {"difference": 0.0362, "ci": [0.0249, 0.047], "n_test": 500, "on": "all"}},
                   "fast_ens10": {"trak_10": {"difference": 0.0137, "ci": [0.0001, 0.0273], "n_test": 500, "on": "all"}}}}))
    bench = root / "engine.json"
    bench.write_text(json.dumps({
        "nimarb_t100_s": 6543.0, "t100_cg_s": 800.0, "t100_fast_s": 21.0,
        "spearman_nimarb_vs_cg": 0.11, "spearman_kronfluence_vs_cg": 0.64, "spearman_lissa_vs_cg": 0.95,
        "spearman_fast_vs_cg": 0.973, "t100_default_s": 80.0, "kronfluence_t100_s": 250.0, "t100_default_epochs": 2.2,
        "seed_spearman_default": 0.931,
        "peak_rss_mb": 1999.0, "data_source": data.source}))
    return results, bench


def _write_perturbation(results, data, rng):
    """The format of experiments.perturbation: the JSON, its example arrays, and the notebook's map."""
    group = {"n": 30, "attack_flip_rate": 0.2333, "random_flip_rate": 0.0, "attack_loss_change": 0.0612,
             "random_loss_change": -0.0021}
    result = {"settings": {"n_train": 5000}, "fd_rel_err": 5.6e-8, "retrain_pearson": 0.7551, "n_pairs": 80,
              "retrain_pearson_score_difference": 0.9461, "k_images": 5, "epsilon": 8 / 255, "epsilon_levels": 8,
              "n_attacked": 30, "groups": {"typical": group, "low_margin": {**group, "attack_flip_rate": 0.9}},
              "example": {"test_index": 3, "label": 0, "attack_pred": 8, "random_pred": 0},
              "data_source": data.source, "minutes": 12.0}
    (results / "perturbation.json").write_text(json.dumps(result))
    images = rng.integers(0, 256, size=(5, 32, 32, 3)).astype(np.uint8)
    np.savez(results / "perturbation.npz", example_test_image=images[0], example_original=images,
             example_poisoned=np.clip(images.astype(int) + 8, 0, 255).astype(np.uint8),
             check_predicted=rng.normal(size=80), check_actual=rng.normal(size=80))
    np.savez(results / "perturbation_map.npz", test_index=np.int64(5), train_index=np.int64(17),
             map=rng.normal(size=(3, 32, 32)).astype(np.float32), train_image=images[1], test_label=np.int64(5),
             train_label=np.int64(5), data_source=np.array(data.source))


@pytest.fixture(scope="module")
def deck(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("deck")
    results, bench = _write_results(root, data)
    config = SlidesConfig(out=str(root / "deck.pdf"), results_dir=str(results), engine_json=str(bench))
    path, titles, problems = build_slides(config, data=data)
    return config, path, titles, problems


def _text(path) -> list[str]:
    return [page.extract_text() for page in PdfReader(path).pages]


def test_deck_has_every_slide_with_the_results_numbers(deck):
    config, path, titles, problems = deck
    pages = _text(path)
    assert len(pages) == len(titles) == 18  # 15 fixed slides + one per test image (3)
    assert problems == []  # nothing cut off, no text overlapping
    everything = "\n".join(pages)
    for expected in ("Influence over inference", "Test image #5: a correctly classified dog",
                     "Test image #12 (bird, predicted deer)",
                     "0.99, 0.98, 0.96",  # convex leave-one-out Pearson, rounded
                     "83%",  # flipped labels found at 20% checked
                     "-0.457", "+0.789", "fell for 9 of 10", "4 of 10",  # the sign by retraining
                     "cg: 0.91, 0.87, 0.85",  # whole-network leave-one-out, per solver
                     "3.12\u00d7 faster than kronfluence", "1,999 MB", "Spearman 0.931",  # idle speed, peak RSS, seed stability
                     "43.2%",  # test accuracy
                     "fastsolver", "JPEG copy",
                     "Pearson 0.76 (the map), 0.95 (score difference)",  # the perturbation check
                     "flipped 23% (random 0%)", "flipped 90% (random 0%)",  # the attack, both groups
                     "The dog (test #5)",
                     "Ours minus gradient dot product: +0.036 [+0.025, +0.047], paired",  # the LDS slide
                     "10 models (another training), ours minus TRAK: +0.014 [+0.000, +0.027]"):
        assert expected in " ".join(everything.split()), expected
    assert "not computed" not in pages[1]


def test_small_images_are_embedded_upscaled(deck):
    _, path, _, _ = deck
    # matplotlib's PDF pages share one resource dictionary: every page lists every image
    sizes = [img.image.size for img in PdfReader(path).pages[0].images]
    assert (32 * UPSCALE, 32 * UPSCALE) in sizes
    # no image is embedded at its raw 32x32 size: each pixel is repeated UPSCALE x UPSCALE times
    assert all(w % UPSCALE == 0 and h % UPSCALE == 0 and min(w, h) > 32 for w, h in sizes), sizes


def test_rebuild_is_byte_identical(deck, data, tmp_path):
    config, path, _, _ = deck
    again = SlidesConfig(out=str(tmp_path / "again.pdf"), results_dir=config.results_dir,
                         engine_json=config.engine_json, check_layout=False)
    path2, _, _ = build_slides(again, data=data)
    assert path2.read_bytes() == path.read_bytes()


def test_missing_results_give_not_computed_slides(tmp_path, data):
    config = SlidesConfig(out=str(tmp_path / "empty.pdf"), results_dir=str(tmp_path / "none"),
                          engine_json=str(tmp_path / "none" / "engine.json"))
    path, titles, problems = build_slides(config, data=data)
    pages = _text(path)
    assert len(pages) == len(titles) == 16  # one placeholder instead of the influence slides
    assert problems == []
    joined = " ".join("\n".join(pages).split())
    for command in ("train --json results/train.json", "influence_over_inference notebook",
                    "validate all", "bench/engine.py", "validate perturbation", "validate lds"):
        assert command in joined, command
    assert joined.count("not computed") >= 5


def test_layout_check_finds_small_overlapping_and_cut_off_text():
    from matplotlib.figure import Figure

    from influence_over_inference.report.deck import PAGE_INCHES, layout_problems

    fig = Figure(figsize=PAGE_INCHES)
    fig.text(0.5, 0.5, "readable", fontsize=20)
    fig.text(0.5, 0.5, "on top of it", fontsize=20)
    fig.text(0.99, 0.2, "runs off the page", fontsize=20)
    fig.text(0.1, 0.1, "tiny", fontsize=8)
    top, _ = fig.subfigures(2, 1)
    top.text(0.1, -0.3, "runs into the panel below", fontsize=20)
    problems = layout_problems(fig)
    assert "overlap: 'readable' and 'on top of it'" in problems
    assert "cut off: 'runs off the page'" in problems
    assert "too small (8 pt): 'tiny'" in problems
    assert "outside its panel: 'runs into the panel below'" in problems
    assert len(problems) == 4


def test_influence_loader_reads_the_cli_report_and_flags_malformed_files(tmp_path):
    from influence_over_inference.report.slide_inputs import Missing, load_influence_results

    report = {"data_source": "x", "n_train": 10, "solver": {"solver": "cg", "damping": 0.01},
              "tests": [{"test_index": 7, "label": "dog", "predicted": "cat",
                         "helpful": [{"index": 1, "class": "dog", "score": 0.5}],
                         "harmful": [{"index": 2, "class": "cat", "score": -0.5}]}]}
    path = tmp_path / "influence.json"
    path.write_text(json.dumps(report))
    result = load_influence_results(path)
    assert result["test_images"][0] == {"index": 7, "label": 5, "pred": 3, "helpful": report["tests"][0]["helpful"],
                                        "harmful": report["tests"][0]["harmful"]}
    assert result["solver"]["name"] == "cg"
    path.write_text(json.dumps({"test_images": [{"index": 1}]}))
    assert isinstance(load_influence_results(path), Missing)
    assert "malformed" in load_influence_results(path).message()


def test_images_come_from_the_source_the_results_were_made_on(tmp_path):
    from influence_over_inference.report.slide_inputs import source_from_record

    assert source_from_record(f"folder:{tmp_path} (JPEG copy)") == str(tmp_path)
    assert source_from_record(f"folder:{tmp_path / 'gone'}") is None  # not on this machine: auto
    assert source_from_record("torchvision:/somewhere/data") == "torchvision"
    assert source_from_record(None) is None
