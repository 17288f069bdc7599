"""Stage ``epoch``: one training epoch of the project's recipe, the unit the engine's time is measured in."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

log = logging.getLogger("bench")

def stage_epoch(cfg, data, model, wd, train, out):
    from influence_over_inference.study.training import TrainConfig
    from influence_over_inference.study.training import train as train_model

    tc = TrainConfig(epochs=1, device="cpu", threads=cfg.threads)
    start = time.perf_counter()
    result = train_model(train, tc, progress=True)
    # epoch_s: the training loop of one epoch (as TrainResult reports it); epoch_call_s adds setup
    return {"epoch_s": result.history[0].seconds, "epoch_call_s": time.perf_counter() - start,
            "epoch_recipe": asdict(tc)}
