"""The perturbation experiment's pieces on tiny data: pixel-space steps keep the L-infinity budget and
survive saving as 8-bit images, test images are chosen as documented, the finite-difference check
holds, and a whole run on a tiny synthetic CIFAR writes the issue's keys and resumes from its cache."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from influence_over_inference.experiments import perturbation as pert
from influence_over_inference.experiments.perturbation import (
    PerturbationConfig,
    attack_targets,
    iterative_perturbation,
    margins,
    normalised_delta,
    perturb_pixels,
    random_signs,
    run_perturbation,
    write_results,
)
from influence_over_inference.experiments.perturbation_fd import fd_check
from influence_over_inference.experiments.retraining import RetrainConfig
from influence_over_inference.study.data import CLASSES, CIFAR10Data, CIFAR10Split

ISSUE_KEYS = ("fd_rel_err", "retrain_pearson", "n_pairs", "n_attacked", "k_images", "epsilon", "attack_flip_rate",
              "random_flip_rate", "attack_loss_change", "random_loss_change", "minutes", "data_source")


def _split(n_per_class: int, seed: int) -> CIFAR10Split:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(CLASSES)).repeat_interleave(n_per_class)
    images = torch.randint(0, 256, (len(labels), 32, 32, 3), generator=gen, dtype=torch.uint8)
    images[..., 0] = (labels * 25).to(torch.uint8)[:, None, None]  # the red channel gives the class away: learnable
    return CIFAR10Split(images, labels, [f"{CLASSES[c]}/{i:04d}.png" for i, c in enumerate(labels.tolist())])


def _tiny_config(**overrides) -> PerturbationConfig:
    base = dict(n_per_class=6, train_epochs=2, check_test_indices=(0, 5), check_steps=(-1, 2), n_attack_per_class=1,
                n_low_margin=2, k_images=3, solver_settings={"rank": 20, "n_samples": 30}, fd_n_train=10,
                fd_pixels=40, fd_fit_steps=10, retrain=RetrainConfig(steps=4, batch_size=8, lr=0.01))
    return PerturbationConfig(**{**base, **overrides})


def test_pixel_steps_keep_the_budget_and_survive_saving_as_png():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 32, 32, 3), generator=gen, dtype=torch.uint8)
    images[0, :4] = 0  # corners of the range: clipped, never wrapped around
    images[0, 4:8] = 255
    signs = torch.randn(3, 32, 32, 3, generator=gen)
    signs[1, :2] = 0  # no direction: the pixel stays
    new = perturb_pixels(images, signs, 8)
    assert new.dtype == torch.uint8
    change = new.int() - images.int()
    assert change.abs().max() == 8 and (change.abs() <= 8).all()
    assert (change[1, :2] == 0).all()
    interior = (images > 7) & (images < 248)
    assert (torch.sign(change)[interior] == torch.sign(signs)[interior]).all()  # moved along the sign where it can
    for k in range(3):  # saved as PNG and read back: the same pixels
        buffer = io.BytesIO()
        Image.fromarray(new[k].numpy()).save(buffer, format="png")
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(buffer.getvalue()))), new[k].numpy())
    assert torch.allclose(normalised_delta(new, images), change.permute(0, 3, 1, 2).float() * 2 / 255, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        perturb_pixels(images.float(), signs, 8)


def test_the_iterative_attack_stays_within_the_budget():
    model = _tiny_net()
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 32, 32, 3), generator=gen, dtype=torch.uint8)
    stest = torch.randn(1, sum(p.numel() for p in model.parameters()), generator=gen, dtype=torch.float64)
    out = iterative_perturbation(model, stest, images, torch.tensor([0, 1]), 100, epsilon=8, steps=4)
    change = out.int() - images.int()
    assert out.dtype == torch.uint8 and change.abs().max() <= 8 and change.abs().max() > 0


def _tiny_net():
    from influence_over_inference.study.model import Net

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Net(channels=(2, 3), hidden=(8, 8)).double()


def test_random_signs_are_plus_or_minus_one_and_seeded():
    a = random_signs((2, 4, 4, 3), torch.Generator().manual_seed(3))
    b = random_signs((2, 4, 4, 3), torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and set(a.unique().tolist()) == {-1, 1}


def test_attack_targets_are_typical_per_class_then_lowest_margins():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    logits = torch.tensor([[3.0, 0], [2, 1], [0, 1], [0, 4], [0, 1.5], [0, 0.5], [0, 5]])
    margin = margins(logits, labels)
    assert torch.allclose(margin, torch.tensor([3.0, 1, -1, 4, 1.5, 0.5, 5]))
    ok = margin > 0
    typical, low = attack_targets(labels, ok, margin, per_class=1, n_low_margin=2)
    assert typical == [0, 3]  # the first correct image of each class
    assert low == [5, 1]  # then the smallest positive margins, typical ones left out; image 2 is wrong


def test_finite_differences_of_the_exact_score_match_the_map():
    fd = fd_check(_split(3, 0), n_train=10, n_pixels=60, fit_steps=10)
    assert fd["fd_rel_err"] <= 1e-6 and fd["n_pixels"] == 60


def test_a_tiny_run_writes_the_issue_keys_and_resumes_from_its_cache(tmp_path, monkeypatch):
    data = CIFAR10Data(_split(6, 1), _split(2, 2), source="tiny-random")
    config = _tiny_config()
    calls = []
    real_retrain = pert.retrain

    def counting_retrain(*args, **kwargs):
        calls.append(1)
        return real_retrain(*args, **kwargs)

    monkeypatch.setattr(pert, "retrain", counting_retrain)
    result, arrays = run_perturbation(data, config, cache_dir=tmp_path, progress=False)
    for key in ISSUE_KEYS:
        assert key in result, key
    assert result["n_pairs"] == 2 * 2 * 2  # 2 test images x (most helpful, most harmful) x 2 steps
    assert result["k_images"] == 3 and result["epsilon"] == pytest.approx(8 / 255)
    assert result["n_attacked"] == result["groups"]["typical"]["n"] >= 1
    assert result["data_source"] == "tiny-random" and result["fd_rel_err"] <= 1e-6
    assert {"iterative_flip_rate", "iterative_loss_change"} <= set(result["groups"]["typical"])
    n_runs = result["n_pairs"] + 3 * len(result["attack"])  # each check pair; each attack, iterated, and random
    assert len(calls) == 1 + n_runs  # and the control
    original, poisoned = arrays["example_original"], arrays["example_poisoned"]
    assert poisoned.dtype == np.uint8 and original.shape == poisoned.shape == (3, 32, 32, 3)
    assert np.abs(poisoned.astype(int) - original.astype(int)).max() <= 8
    assert len(arrays["check_actual"]) == result["n_pairs"]

    write_results(result, arrays, tmp_path / "p.json", tmp_path / "p.npz")
    assert json.loads((tmp_path / "p.json").read_text())["n_pairs"] == result["n_pairs"]
    assert np.array_equal(np.load(tmp_path / "p.npz")["example_poisoned"], poisoned)

    # interrupted after its retrains (the result file gone, the per-run cache kept): only the control
    # is run again (it chooses the attacked images), and the figures are the same
    for path in tmp_path.glob("perturbation-result-*"):
        path.unlink()
    calls.clear()
    again, _ = run_perturbation(data, config, cache_dir=tmp_path, progress=False)
    assert len(calls) == 1
    assert again["retrain_pearson"] == result["retrain_pearson"]
    assert again["attack_loss_change"] == result["attack_loss_change"]
    calls.clear()
    assert run_perturbation(data, config, cache_dir=tmp_path, progress=False)[0]["n_pairs"] == result["n_pairs"]
    assert not calls  # finished: read back whole


def test_config_refuses_what_the_issue_rules_out():
    with pytest.raises(ValueError, match="k_images"):
        PerturbationConfig(k_images=6)
    with pytest.raises(ValueError, match="whole pixel levels"):
        PerturbationConfig(check_steps=(0.5,))
    with pytest.raises(ValueError, match="iterative_steps"):
        PerturbationConfig(iterative_steps=3)  # 8 levels do not split into 3 whole steps
    assert PerturbationConfig().damping == pytest.approx(1 / RetrainConfig().horizon, abs=1e-4)
