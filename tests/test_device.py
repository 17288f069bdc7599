"""Device plumbing: a torch.device passed through every call the notebook makes, and nothing moved behind the caller's back.

On the CPU these tests pass ``torch.device("cpu")`` objects (not strings) through training,
evaluation, the engine's ``s_test`` / ``grad_z`` / scores, and nimarb's package with its ``gpu``
argument; the ``cuda``-marked ones run the same on a GPU (``bash bench/gpu_check.sh``) and skip here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from influence_over_inference.engine import InfluenceEngine, grad_z, make_solver, s_test
from influence_over_inference.study import nimarb_reference as nr
from influence_over_inference.study.data import CIFAR10Data, CIFAR10Split
from influence_over_inference.study.model import Net
from influence_over_inference.study.training import TrainConfig, evaluate, train

SAME = 1e-4  # float32 scores computed by two routes (chunked vs whole, CPU vs GPU): relative


def _split(n: int, seed: int) -> CIFAR10Split:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    return CIFAR10Split(images, labels, [f"img{i}.png" for i in range(n)])


@pytest.fixture(scope="module")
def trained():
    """A small Net trained 1 epoch on 60 random images, with a 20-image test split."""
    data = CIFAR10Data(_split(60, 0), _split(20, 1), source="random")
    result = train(data.train, TrainConfig(epochs=1, batch_size=10, device=torch.device("cpu")), model=Net(channels=(3, 4), hidden=(12, 8)), progress=False)
    return data, result.model


def _pipeline(data, model, device: torch.device) -> dict:
    """What the notebook does, on ``device``: every model and tensor moved there explicitly."""
    model = model.to(device).eval()
    test_x, test_y = (t.to(device) for t in data.test.tensors([0, 1]))
    solver = make_solver("exact")
    engine = InfluenceEngine(model, data.train, solver, weight_decay=5e-4, cache_dir=None).fit()
    stest = s_test(model, test_x, test_y, solver)
    x, y = data.train.tensors()
    by_hand = (stest @ grad_z(model, x.to(device), y.to(device)).T).cpu() / len(x)
    gpu = nr.nimarb_gpu(device)
    with nr.quiet():
        from pytorch_influence_functions import influence_function as nimarb_if

        theirs = nr.to_vector(nimarb_if.grad_z(x[:1].to(device), y[:1].to(device), model, gpu=gpu))
    return {"device": next(model.parameters()).device, "stest_device": stest.device, "by_hand": by_hand,
            "scores": engine.scores(test_x, test_y), "nimarb_grad": theirs,
            "our_grad": grad_z(model, x[:1].to(device), y[:1].to(device)).cpu()[0],
            "eig": make_solver("lissa").fit(model, data.train).largest_eigenvalue(x[:4], y[:4]),
            "one_step": nr.published_one_step(model, test_x[:1], test_y[:1], x[:4], y[:4], damp=0.01, scale=25.0)}


def test_train_config_keeps_a_device_object_as_its_name():
    cfg = TrainConfig(device=torch.device("cpu"))
    assert cfg.device == "cpu" and isinstance(cfg.device, str)


def test_evaluate_runs_where_the_model_is_and_puts_it_back(trained):
    data, model = trained
    model.train()
    a = evaluate(model, data.test)
    b = evaluate(model, data.test, device=torch.device("cpu"))
    assert model.training, "evaluate must restore the caller's mode"
    assert next(model.parameters()).device.type == "cpu"
    assert torch.equal(a["predictions"], b["predictions"]) and a["predictions"].device.type == "cpu"
    model.eval()


def test_the_notebook_pipeline_on_a_device_object(trained):
    data, model = trained
    out = _pipeline(data, model, torch.device("cpu"))
    assert out["device"].type == "cpu" and out["stest_device"].type == "cpu"
    # the method written out (s_test . grad_z / n) is what the engine returns
    assert (out["by_hand"] - out["scores"]).abs().max() <= SAME * out["scores"].abs().max()
    # nimarb's grad_z, given gpu=-1 for the CPU, agrees with ours
    assert (out["nimarb_grad"] - out["our_grad"]).norm() <= SAME * out["our_grad"].norm()
    assert out["eig"] > 0 and out["one_step"].device.type == "cpu"


def test_nimarb_gpu_numbers():
    assert nr.nimarb_gpu(torch.device("cpu")) == -1
    assert nr.nimarb_gpu("cuda") == 0 and nr.nimarb_gpu(torch.device("cuda:1")) == 1
    with pytest.raises(ValueError, match="CPU or CUDA"):
        nr.nimarb_gpu("meta")


def test_nimarb_scoring_needs_cpu_tensors():
    """calc_influence_single ends in np.argsort over its per-image tensors: numpy reads only CPU
    tensors (the same path fails for CUDA ones: see the cuda test below)."""
    with pytest.raises(TypeError, match="numpy"):
        np.argsort([torch.tensor(2.0, device="meta"), torch.tensor(1.0, device="meta")])


@pytest.mark.cuda
def test_the_notebook_pipeline_on_cuda_matches_the_cpu(trained):
    data, model = trained
    cpu = _pipeline(data, model, torch.device("cpu"))
    gpu = _pipeline(data, model, torch.device("cuda"))
    assert gpu["device"].type == "cuda" and gpu["stest_device"].type == "cuda"
    assert (gpu["scores"] - cpu["scores"]).abs().max() <= SAME * cpu["scores"].abs().max()
    assert (gpu["by_hand"] - gpu["scores"]).abs().max() <= SAME * gpu["scores"].abs().max()
    assert (gpu["nimarb_grad"] - gpu["our_grad"]).norm() <= SAME * gpu["our_grad"].norm()
    model.cpu()


@pytest.mark.cuda
def test_evaluate_on_cuda_leaves_the_model_on_the_cpu(trained):
    data, model = trained
    on_gpu = evaluate(model.cpu(), data.test, device="cuda")
    assert next(model.parameters()).device.type == "cpu"
    assert torch.equal(on_gpu["predictions"], evaluate(model, data.test)["predictions"])


@pytest.mark.cuda
def test_nimarb_calc_influence_single_fails_on_cuda(trained):
    """Why the notebook runs nimarb's scoring on a CPU copy of the model."""
    from pytorch_influence_functions import calc_influence_function as nimarb_calc
    from torch.utils.data import DataLoader, TensorDataset

    data, model = trained
    model = model.to("cuda")
    x, y = data.train.tensors(range(4))
    loader = DataLoader(TensorDataset(x, y), batch_size=1)
    s_vec = [torch.zeros_like(p) for p in model.parameters()]
    s_vec[0] += 1.0
    with nr.quiet(), pytest.raises(TypeError, match="numpy"):
        nimarb_calc.calc_influence_single(model, loader, loader, 0, 0, 1, 1, s_test_vec=s_vec)
    model.cpu()
