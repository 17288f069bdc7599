"""The attribution methods the LDS compares, each giving scores (n_test, n_train) in the project's sign.

Every function takes the trained model, its weight decay, the training split and the test tensors
and returns float32 scores with positive = helpful (:mod:`..engine.scores`). Ours go through the
engine; the peers are called as published: kronfluence 1.0.1 EK-FAC (its scores are
``g_test^T (F + damping I)^{-1} g_train``: our sign without the 1/n), TRAK through ``traker``
0.3.2 on the CPU with its BasicProjector (its scores predict the margin: positive = helpful), and
nimarb's ``s_test`` (:mod:`..study.nimarb_reference`) scored by streaming.
"""

from __future__ import annotations

import copy
import logging
import time
from types import SimpleNamespace

import numpy as np
import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

FAST_V1 = {"damping": 0.01, "rank": 500, "n_samples": 500, "n_fits": 1, "eigh_iters": 4, "seed": 0, "rest": "damping"}  # the fast solver's defaults before issue 9
FAST_V2 = {"damping": 0.1, "rank": 500, "n_samples": 500, "n_fits": 8, "eigh_iters": 4, "seed": 0, "rest": "damping"}  # issue 9's first averaged default
FAST_V3 = {"damping": 0.1, "rank": 500, "n_samples": 250, "n_fits": 16, "eigh_iters": 4, "seed": 0, "rest": "damping"}  # issue 9's second (16 small fits)
CG_SETTINGS = {"curvature": "ggn", "n_samples": 1000, "tol": 1e-4, "max_iter": 100, "max_factor_mb": 3000.0}
LISSA_SETTINGS = {"curvature": "ggn", "depth": 200, "batch_size": 100}  # the benchmark's agreement settings
NIMARB_TIMED_DEPTH = 20  # nimarb's s_test returns one step on its last minibatch at any depth (tests/test_nimarb.py)


def _streamed(model, train, stest: torch.Tensor) -> np.ndarray:
    """(1/n) stest @ grad_z(j) for every training image j: the engine's streamed scoring."""
    from ..engine.scores import influence

    return influence(model, None, None, train, SimpleNamespace(layers=None), stest=stest, progress=True).float().numpy()


def solver_scores(name: str, settings: dict, model, wd: float, train, x, y) -> tuple[np.ndarray, dict]:
    """Scores of one of our solvers (``make_solver(name, **settings)``) and its described settings."""
    from ..engine.scores import influence
    from ..engine.solvers import make_solver

    solver = make_solver(name, **settings)
    solver.fit(model, train, weight_decay=wd, progress=True)
    return influence(model, x, y, train, solver, progress=True).float().numpy(), solver.describe()


def grad_dot_scores(model, wd, train, x, y) -> tuple[np.ndarray, dict]:
    """Gradient dot product: the identity curvature, ``(1/n) g_test^T g_j``."""
    from ..engine.gradients import grad_z

    return _streamed(model, train, grad_z(model, x, y)), {"curvature": "identity"}


def random_scores(n_test: int, n_train: int, seed: int = 0) -> tuple[np.ndarray, dict]:
    """The floor: seeded standard-normal scores."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_test, n_train, generator=gen).numpy(), {"seed": seed}


def kronfluence_task():
    from kronfluence.task import Task

    class ClassificationTask(Task):
        """Summed cross-entropy; the measurement is the test loss (as our scores')."""

        def compute_train_loss(self, batch, model, sample=False):
            xb, yb = batch
            logits = model(xb)
            if sample:  # the true Fisher: labels drawn from the model's own predictions
                with torch.no_grad():
                    yb = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1).flatten()
            return torch.nn.functional.cross_entropy(logits, yb, reduction="sum")

        def compute_measurement(self, batch, model):
            xb, yb = batch
            return torch.nn.functional.cross_entropy(model(xb), yb, reduction="sum")

    return ClassificationTask()


def kronfluence_scores(model, wd, train, x, y, out_dir, damping: float = 0.01, batch: int = 512
                       ) -> tuple[np.ndarray, dict]:
    """kronfluence 1.0.1 EK-FAC on all training images; its damping is ``weight_decay + damping``."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from torch.utils.data import TensorDataset

    task = kronfluence_task()
    kmodel = prepare_model(copy.deepcopy(model).eval(), task)
    analyzer = Analyzer("lds", kmodel, task, cpu=True, disable_tqdm=False, output_dir=str(out_dir))
    tx, ty = train.tensors()
    train_ds, test_ds = TensorDataset(tx, ty), TensorDataset(x, y)
    torch.manual_seed(0)  # kronfluence samples Fisher labels with the global RNG
    analyzer.fit_all_factors("ekfac", train_ds, per_device_batch_size=batch,
                             factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
    analyzer.compute_pairwise_scores("pairwise", "ekfac", test_ds, train_ds, per_device_query_batch_size=100,
                                     per_device_train_batch_size=batch,
                                     score_args=ScoreArguments(damping_factor=wd + damping), overwrite_output_dir=True)
    scores = analyzer.load_pairwise_scores("pairwise")["all_modules"]  # (n_test, n_train)
    return scores.float().numpy(), {"strategy": "ekfac", "damping_factor": wd + damping, "version": "1.0.1"}


def trak_scores(models, train, x, y, out_dir, proj_dim: int = 2048, batch: int = 500) -> tuple[np.ndarray, dict]:
    """TRAK (traker 0.3.2) with one or more models (each its final checkpoint), BasicProjector on the CPU (float32).

    ``models``: a model, or a list of independently trained ones (TRAK-k: traker averages their
    scores, each model with its own projection). The default recipe keeps no per-epoch
    checkpoints, so each model is its final weights only. Two traps of traker 0.3.2 on the CPU,
    both avoided here:
    - ``load_from_save_dir=False`` never creates ``experiments.json``, which
      ``start_scoring_checkpoint`` then opens for reading (FileNotFoundError); so ``out_dir`` is
      emptied and the saver loads from it (it creates the file);
    - ``finalize_features`` frees the projector's matrix and a one-block ``BasicProjector``
      does not make it again for the same model id; so it is regenerated (same seed, the same
      matrix) before scoring.
    """
    import shutil

    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    from ..engine.params import count_selected

    models = [copy.deepcopy(m).eval() for m in (models if isinstance(models, (list, tuple)) else [models])]
    n_params = count_selected(models[0], None)
    projector = BasicProjector(grad_dim=n_params, proj_dim=proj_dim, seed=0, proj_type=ProjectionType.rademacher,
                               device=torch.device("cpu"), block_size=proj_dim)
    shutil.rmtree(out_dir, ignore_errors=True)  # traker refuses a model id already registered in its save_dir
    traker = TRAKer(model=models[0], task="image_classification", train_set_size=len(train), save_dir=str(out_dir),
                    load_from_save_dir=True, device="cpu", projector=projector, use_half_precision=False,
                    logging_level=logging.WARNING)
    tx, ty = train.tensors()
    for model_id, model in enumerate(models):
        traker.load_checkpoint(model.state_dict(), model_id=model_id)
        for start in tqdm(range(0, len(ty), batch), desc=f"TRAK featurize (model {model_id + 1}/{len(models)})"):
            traker.featurize(batch=(tx[start : start + batch], ty[start : start + batch]),
                             num_samples=len(ty[start : start + batch]))
    traker.finalize_features()
    projector.generate_sketch_matrix(projector.generator_states[0])  # freed by finalize_features
    for model_id, model in enumerate(models):
        traker.start_scoring_checkpoint("lds", model.state_dict(), model_id=model_id, num_targets=len(y))
        for start in range(0, len(y), batch):
            traker.score(batch=(x[start : start + batch], y[start : start + batch]),
                         num_samples=len(y[start : start + batch]))
    scores = traker.finalize_scores("lds")  # (n_train, n_test), averaged over the models
    return np.asarray(scores, dtype=np.float32).T.copy(), {"proj_dim": proj_dim, "projector": "BasicProjector",
                                                           "proj_type": "rademacher", "n_models": len(models),
                                                           "n_checkpoints": len(models),
                                                           "checkpoint": "final model (the recipe keeps no "
                                                           "per-epoch checkpoints)", "version": "0.3.2"}


def nimarb_scores(model, train, x, y, seed: int = 0, depth: int = NIMARB_TIMED_DEPTH) -> tuple[np.ndarray, dict]:
    """nimarb's published ``s_test`` (its defaults: damp 0.01, scale 25, batch 4) per test image, streamed.

    Its output is one recursion step on the last minibatch drawn whatever the depth (the module
    docstring of :mod:`..study.nimarb_reference`, tested in tests/test_nimarb.py), so ``depth``
    steps give the same distribution as its default 5,000 at a fraction of the time; the time per
    image is measured and extrapolated to 5,000.
    """
    from ..study import nimarb_reference as nr

    tx, ty = train.tensors()
    gen = torch.Generator().manual_seed(seed)
    vecs, seconds = [], []
    for i in range(len(y)):
        feed = nr.MinibatchFeed(tx, ty, nr.draw_minibatches(len(ty), nr.NIMARB_BATCH_SIZE, depth, gen))
        start = time.perf_counter()
        vecs.append(nr.nimarb_s_test(model, x[i], y[i], feed, nr.NIMARB_DAMP, nr.NIMARB_SCALE, depth))
        seconds.append(time.perf_counter() - start)
    per_image = float(np.mean(seconds))
    return _streamed(model, train, torch.stack(vecs)), {
        "damp": nr.NIMARB_DAMP, "scale": nr.NIMARB_SCALE, "batch": nr.NIMARB_BATCH_SIZE, "depth_run": depth,
        "s_test_s_per_image": per_image, "s_test_s_per_image_at_depth_5000": per_image * nr.NIMARB_DEPTH / depth}


def lissa_scores(model, wd, train, x, y, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Our LiSSA at the benchmark's agreement settings; ``scale`` 1.5x the largest eigenvalue of 5 minibatches."""
    from ..engine.solvers import make_solver

    probe = make_solver("lissa", **LISSA_SETTINGS)
    probe.fit(model, train, weight_decay=wd)
    gen = torch.Generator().manual_seed(seed + 7)
    tops = [probe.largest_eigenvalue(*train.tensors(torch.randperm(len(train), generator=gen)[:100]), steps=20)
            for _ in range(5)]
    scores, described = solver_scores("lissa", {**LISSA_SETTINGS, "scale": float(f"{1.5 * max(tops):.2g}")},
                                      model, wd, train, x, y)
    return scores, {**described, "minibatch_top_eigenvalues": tops}



def ensemble_members(data, checkpoint, k: int, cache_dir) -> list:
    """Paths of ``k`` independently trained models: the checkpoint (seed 0), then the default recipe with seeds 1..k-1.

    Each extra model is trained on all training images with :class:`~..study.training.TrainConfig`
    (only the seed changed) and cached under ``cache_dir`` by its recipe and the data source.
    """
    from pathlib import Path

    from ..study.training import TrainConfig, _recipe, train_or_load
    from .store import settings_key

    paths = [Path(checkpoint)]
    for seed in range(1, k):
        config = TrainConfig(seed=seed)
        paths.append(Path(cache_dir) / f"model-{settings_key({'recipe': _recipe(config), 'data': data.source})}.pt")
        train_or_load(data, paths[-1], config)
    return paths


def fast_ensemble_scores(paths, wd, train, x, y, cache_dir, settings: dict | None = None) -> tuple[np.ndarray, dict]:
    """The fast solver (its defaults, or ``settings``) on each model, scores averaged (as TRAK averages over
    models); each member cached."""
    import hashlib
    from pathlib import Path

    from ..engine.hashing import file_sha256
    from ..engine.io import save_npz_atomic
    from ..engine.solvers import make_solver
    from ..study.checkpoints import load_checkpoint
    from .store import settings_key

    total, accuracies = None, []
    for path in paths:
        model, meta = load_checkpoint(path)
        accuracies.append(meta.get("test_accuracy"))
        test = hashlib.sha256(x.contiguous().numpy().tobytes() + y.contiguous().numpy().tobytes()).hexdigest()
        key = settings_key({"checkpoint": file_sha256(path), "solver": make_solver("fast", **(settings or {})).describe(),
                            "test": test})
        member = Path(cache_dir) / f"fast-member-{key}.npz"
        if member.exists():
            scores = np.load(member)["scores"]
        else:
            scores, _ = solver_scores("fast", settings or {}, model.eval(), wd, train, x, y)
            save_npz_atomic(member, scores=scores.astype(np.float32))
        total = scores.astype(np.float64) if total is None else total + scores
    return (total / len(paths)).astype(np.float32), {
        "solver": make_solver("fast", **(settings or {})).describe(), "n_models": len(paths),
        "combine": "mean of the members' scores",
        "members": "the checkpoint (seed 0) and the default recipe with seeds 1..k-1",
        "member_test_accuracy": accuracies}
