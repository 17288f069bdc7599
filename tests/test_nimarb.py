"""nimarb's pytorch-influence-functions 0.1.1, run as published, against what it should compute.

Tiny float64 conv net of the LeNet shape on random data: what users would notice is that nimarb's
rankings do not depend on the recursion depth, are off by a factor ``scale``, and call the most
helpful images "harmful".
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from influence_over_inference.study import nimarb_reference as nr
from influence_over_inference.study.model import Net

EXACT = 1e-10  # float64 round-off over a few hundred parameters
DAMP, SCALE = 0.01, 25.0  # nimarb's defaults


@pytest.fixture
def tiny():
    """A 655-parameter conv net (same shape as Net) and 48 random 32x32 images, float64."""
    torch.manual_seed(0)
    model = Net(channels=(2, 2), hidden=(6, 5)).double().eval()
    x = torch.randn(48, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (48,))
    return model, x, y


def _batches(n, batch_size, depth, seed):
    return nr.draw_minibatches(n, batch_size, depth, torch.Generator().manual_seed(seed))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_published_s_test_does_not_change_with_depth(tiny):
    model, x, y = tiny
    out = {}
    for depth in (1, 7, 30):
        # different earlier minibatches, the same last one
        batches = _batches(len(x), 8, depth - 1, seed=depth) if depth > 1 else []
        batches.append(torch.arange(8, 16))
        out[depth] = nr.nimarb_s_test(model, x[0], y[0], nr.MinibatchFeed(x, y, batches), DAMP, SCALE, depth)
    assert _rel(out[7], out[1]) < EXACT
    assert _rel(out[30], out[1]) < EXACT


def test_published_s_test_is_one_undivided_step_on_the_last_minibatch(tiny):
    model, x, y = tiny
    batches = _batches(len(x), 8, 12, seed=1)
    feed = nr.MinibatchFeed(x, y, batches)
    published = nr.nimarb_s_test(model, x[0], y[0], feed, DAMP, SCALE, depth=12)
    last = feed.last_indices
    assert torch.equal(last, batches[-1])
    # (2 - damp) v - (H_last v + H_test g_last) / scale: undivided by scale, and with the extra
    # term its undetached test gradient adds
    expected = nr.published_one_step(model, x[0], y[0], x[last], y[last], DAMP, SCALE)
    assert _rel(published, expected) < EXACT
    # that extra term is not round-off: without it the formula misses by far more
    one_step = nr.published_one_step(model, x[0], y[0], x[last], y[last], DAMP, SCALE, graph_term=False)
    assert _rel(published, one_step) > 1e-4
    # and the real recursion over the same minibatches gives something else entirely
    repaired = nr.repaired_s_test(model, x[0], y[0], feed.batches(), DAMP, SCALE, divide_by_scale=False)
    assert _rel(published, repaired) > 1e-2


def test_published_s_test_is_not_divided_by_scale(tiny):
    """Doubling ``scale`` should halve an inverse-HVP estimate; nimarb's is barely changed."""
    model, x, y = tiny
    batches = [torch.arange(8)]
    a = nr.nimarb_s_test(model, x[0], y[0], nr.MinibatchFeed(x, y, batches), DAMP, SCALE, depth=1)
    b = nr.nimarb_s_test(model, x[0], y[0], nr.MinibatchFeed(x, y, batches), DAMP, 2 * SCALE, depth=1)
    assert float(b.norm() / a.norm()) > 0.9


def test_r_averaging_returns_the_first_repetition_divided_by_r(tiny):
    model, x, y = tiny
    batches = _batches(len(x), 8, 4, seed=2) + _batches(len(x), 8, 4, seed=3)
    single = nr.nimarb_s_test(model, x[0], y[0], nr.MinibatchFeed(x, y, batches[:4]), DAMP, SCALE, depth=4)
    averaged = nr.nimarb_s_test(model, x[0], y[0], nr.MinibatchFeed(x, y, batches), DAMP, SCALE, depth=4, r=2)
    assert _rel(averaged, single / 2) < EXACT
    # the raw list concatenates the repetitions: 2 x the number of parameter tensors
    from pytorch_influence_functions.calc_influence_function import calc_s_test_single

    with nr.quiet():
        raw = calc_s_test_single(model, x[:1], y[:1], nr.MinibatchFeed(x, y, batches), damp=DAMP, scale=SCALE, recursion_depth=4, r=2)
    assert len(raw) == 2 * len(list(model.parameters()))


def test_calc_img_wise_ignores_damp_and_scale():
    from pytorch_influence_functions import calc_influence_function as calc

    assert "damp" not in inspect.signature(calc.calc_influence_single).parameters
    assert "scale" not in inspect.signature(calc.calc_influence_single).parameters


@pytest.mark.skipif(torch.cuda.is_available(), reason="the failure shows only on a machine without CUDA")
def test_calc_img_wise_hard_codes_cuda(tiny, tmp_path):
    from pytorch_influence_functions import calc_img_wise, get_default_config
    from torch.utils.data import DataLoader, TensorDataset

    model, x, y = tiny
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    config = {**get_default_config(), "outdir": str(tmp_path), "gpu": -1, "test_sample_num": 1}
    with nr.quiet(), pytest.raises((AssertionError, RuntimeError), match="(?i)cuda|nvidia"):
        calc_img_wise(config, model, loader, loader)


def _our_scores(model, x_test, y_test, x_train, y_train, s_vec):
    """Our convention for a given inverse-HVP vector s: (1/n) s . grad L(train_j), plain loop."""
    params = list(model.parameters())
    rows = []
    for j in range(len(x_train)):
        loss = torch.nn.functional.cross_entropy(model(x_train[j : j + 1]), y_train[j : j + 1])
        rows.append(nr.flatten(torch.autograd.grad(loss, params)))
    return (torch.stack(rows) @ s_vec / len(x_train)).numpy()


def test_harmful_is_koh_liang_helpful(tiny):
    model, x, y = tiny
    s_vec = nr.repaired_s_test(model, x[0], y[0], [(x[8:], y[8:])] * 20, damp=0.0, scale=50.0)
    theirs = nr.nimarb_scores(model, x[0], y[0], x[8:], y[8:], s_vec)
    ours = _our_scores(model, x[0], y[0], x[8:], y[8:], s_vec)
    # same numbers, opposite sign
    np.testing.assert_allclose(nr.to_project_sign(theirs.influences), ours, rtol=1e-8, atol=1e-14)
    # its "harmful" list starts with our most helpful image, its "helpful" with our most harmful
    assert theirs.harmful[0] == int(np.argmax(ours))
    assert theirs.helpful[0] == int(np.argmin(ours))
    assert theirs.harmful[:5] == list(np.argsort(-ours)[:5])


def test_repaired_recursion_equals_our_lissa_times_scale(tiny):
    from influence_over_inference.engine.gradients import grad_z
    from influence_over_inference.engine.solvers.lissa import LiSSASettings, LiSSASolver

    model, x, y = tiny
    damp, scale, depth, wd = 0.01, 50.0, 10, 5e-4
    feed = nr.MinibatchFeed(x, y, _batches(len(x), 8, depth, seed=4))
    undivided = nr.repaired_s_test(model, x[0], y[0], feed.batches(), damp, scale, weight_decay=wd, divide_by_scale=False)
    settings = LiSSASettings.from_paper(damp, scale, depth, curvature="hessian", batch_size=8)
    ours = LiSSASolver(settings).fit(model, x, y, weight_decay=wd)
    v = grad_z(model, x[:1], y[:1])  # (1, P)
    s = ours.inverse_hvp(v, batches=feed.batches())[0]
    assert _rel(undivided, s * scale) < EXACT
    assert _rel(nr.repaired_s_test(model, x[0], y[0], feed.batches(), damp, scale, weight_decay=wd), s) < EXACT
