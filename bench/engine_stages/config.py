"""The benchmark's settings: :class:`BenchConfig` (full and quick) and the stage names."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from influence_over_inference.study import nimarb_reference as nr

log = logging.getLogger("bench")

STAGES = ("epoch", "nimarb_same", "ours_same", "nimarb_own", "fast", "cg", "lissa", "score", "kronfluence", "small")


AGREE_STAGES = ("nimarb_own", "cg", "lissa")  # s_test vectors scored together by the "score" stage


@dataclass
class BenchConfig:
    checkpoint: str = "data/cifar_net.pt"  # the real trained model
    n_test: int = 100  # test images of the "users' question" (the first n_test of the test split)
    n_agree: int = 5  # of those, the first n_agree get CG, LiSSA and nimarb scores (agreement)
    n_train: int | None = None  # training images scored (None: all 50,000)
    damping: float = 0.01  # lambda for every solver (on top of the training weight decay)
    # one test image, same LiSSA settings (nimarb vs ours): Koh & Liang's Hessian recursion
    same_batch: int = 100  # minibatch per recursion step
    same_scale: float = 500.0  # LiSSA scale (must exceed the minibatch curvature's top eigenvalue)
    same_depth: int = 5000  # recursion depth the timing stands for
    timing_depth: int = 100  # steps actually run to time one s_test (extrapolated to the depth)
    nimarb_train_measured: int = 5000  # training images nimarb's one-at-a-time scoring is timed on
    # nimarb at its own settings (its defaults; batch 4 as in the PyTorch tutorial it builds on)
    nimarb_batch: int = nr.NIMARB_BATCH_SIZE
    nimarb_scale: float = nr.NIMARB_SCALE
    nimarb_damp: float = nr.NIMARB_DAMP
    nimarb_depth: int = nr.NIMARB_DEPTH
    # the reference and the agreement runs (curvature "ggn": the fast solver's, PSD)
    curvature: str = "ggn"  # curvature of CG, LiSSA (agreement) and the exact small-model reference
    # CGSettings overrides: GGN over a fixed 1,000-image subsample (the fast solver's 500 are its
    # first half: same seeded permutation), solved to a tight tolerance
    cg: dict = field(default_factory=lambda: {"n_samples": 1000, "tol": 1e-4, "max_iter": 400, "max_factor_mb": 3000.0})
    cg_cached_factor: bool = False  # True: a bench-side fast-solver-preconditioned CG (faster) instead of the engine's CG
    # FastSettings overrides: the engine's default n_samples=2000 needs a 5 GB factor here
    fast: dict = field(default_factory=lambda: {"n_samples": 500, "rank": 500})
    lissa_depth: int = 200  # LiSSA depth in the agreement run (5000 would take hours here; see notes)
    lissa_batch: int = 100
    lissa_scale: float | None = None  # None: 1.5 x the largest minibatch eigenvalue (power iteration)
    kron_batch: int = 512  # kronfluence per-device batch size (factors and training gradients)
    # the small-model accuracy check
    small_channels: tuple = (4, 4)  # Net(channels, hidden): 3,702 parameters
    small_hidden: tuple = (24, 16)
    small_n_train: int = 2000  # CIFAR training images the tiny net is trained on (and scored)
    small_epochs: int = 30
    small_n_test: int = 20  # test images whose Pearson is averaged
    small_dampings: tuple = (0.01, 0.5)  # the first is the headline value
    seed: int = 0
    threads: int = 1  # torch CPU threads per stage: on this shared 2-core machine 2 threads under
    #                   contention ran 2-6x slower than 1 (measured); every method gets the same

    def __post_init__(self):
        if not 1 <= self.n_agree <= self.n_test:
            raise ValueError(f"n_agree must be in [1, n_test={self.n_test}], got {self.n_agree}")
        if not 1 <= self.timing_depth <= self.same_depth:
            raise ValueError("timing_depth must be in [1, same_depth]")
        if self.damping <= 0:
            raise ValueError("damping must be > 0")

    @classmethod
    def quick(cls) -> BenchConfig:
        return cls(n_test=4, n_agree=2, n_train=1000, same_depth=200, timing_depth=20, nimarb_train_measured=100,
                   nimarb_depth=200, lissa_depth=5, cg={"n_samples": 200, "tol": 1e-4, "max_iter": 400, "max_factor_mb": 3000.0},
                   fast={"n_samples": 200, "rank": 100},
                   kron_batch=250, small_n_train=300, small_epochs=3, small_n_test=3)
