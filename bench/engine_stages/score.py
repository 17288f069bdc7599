"""Stage ``score``: all training images scored against the agreement stages' s_test vectors in one stream."""

from __future__ import annotations

import logging
import time

import torch

from influence_over_inference.engine.io import atomic_torch_save

from .common import _lissa_like, _scores_for
from .config import AGREE_STAGES

log = logging.getLogger("bench")

def stage_score(cfg, data, model, wd, train, out):
    """Score all training images against the agreement stages' s_test vectors in one stream."""
    parts = {name: torch.load(out / f"{name}_stest.pt", weights_only=True) for name in AGREE_STAGES
             if (out / f"{name}_stest.pt").exists()}
    stacked = torch.cat(list(parts.values()))
    t0 = time.perf_counter()
    scores = _scores_for(model, stacked.to(torch.float32), train, _lissa_like(model, train, wd))
    stream_s = time.perf_counter() - t0
    start = 0
    for name, vecs in parts.items():
        atomic_torch_save(scores[start : start + len(vecs)].float(), out / f"{name}.pt")
        start += len(vecs)
    return {"stream_s": stream_s, "scored": {k: len(v) for k, v in parts.items()}}
