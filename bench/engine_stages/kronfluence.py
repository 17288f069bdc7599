"""Stage ``kronfluence``: kronfluence 1.0.1 EK-FAC, factors on all training images and pairwise scores."""

from __future__ import annotations

import copy
import logging
import time

import torch

from influence_over_inference.engine.io import atomic_torch_save
from influence_over_inference.experiments.lds_methods import kronfluence_task

from .common import _test

log = logging.getLogger("bench")

def kronfluence_scores(model, train_x, train_y, test_x, test_y, damping, out_dir, batch=512):
    """kronfluence EK-FAC pairwise scores (n_test, n_train) and the seconds of each phase.

    kronfluence's damping is added to its (E)K-FAC eigenvalues of the per-example Fisher; pass
    weight_decay + lambda to match our (C + wd I + lambda I). Its scores are
    ``g_test^T (F + damping I)^{-1} g_train`` without our 1/n.
    """
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from torch.utils.data import TensorDataset

    task = kronfluence_task()
    kmodel = prepare_model(copy.deepcopy(model).eval(), task)
    analyzer = Analyzer("bench", kmodel, task, cpu=True, disable_tqdm=False, output_dir=str(out_dir))
    train_ds, test_ds = TensorDataset(train_x, train_y), TensorDataset(test_x, test_y)
    torch.manual_seed(0)  # kronfluence samples Fisher labels with the global RNG
    t0 = time.perf_counter()
    analyzer.fit_all_factors("ekfac", train_ds, per_device_batch_size=batch,
                             factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
    t_fit = time.perf_counter() - t0
    analyzer.compute_pairwise_scores("pairwise", "ekfac", test_ds, train_ds,
                                     per_device_query_batch_size=len(test_ds),
                                     per_device_train_batch_size=batch,
                                     score_args=ScoreArguments(damping_factor=damping),
                                     overwrite_output_dir=True)
    scores = analyzer.load_pairwise_scores("pairwise")["all_modules"]  # (n_test, n_train)
    total = time.perf_counter() - t0
    return scores.float(), {"kronfluence_fit_s": t_fit, "kronfluence_scores_s": total - t_fit, "kronfluence_t100_s": total}


def stage_kronfluence(cfg, data, model, wd, train, out):
    x, y = _test(data, cfg, cfg.n_test)
    tx, ty = train.tensors()
    scores, times = kronfluence_scores(model, tx, ty, x, y, wd + cfg.damping, out / "kronfluence", cfg.kron_batch)
    atomic_torch_save(scores, out / "kronfluence.pt")
    return {**times, "kronfluence_damping_factor": wd + cfg.damping}
