"""The trust benchmark (issue 9, items 3 and 5): the default solver's stability, fidelity and speed, one idle run.

Writes these keys into ``bench/results/engine.json`` (merged: the other keys stay), all from one run:

- ``seed_spearman_default``: two fits of the default solver that differ only in their seed, the
  Spearman correlation of their scores over all training images, mean over ``stability_n_test``
  (>= 10) class-balanced test images; ``seed_top10_overlap_default``: how many of their top-10
  helpful and of their top-10 harmful images they share (a count out of 10, the mean of both;
  each apart in ``seed_top10_overlap_helpful`` / ``_harmful``);
- ``pearson_default_vs_exact_small``: Pearson of the default solver's scores against exact
  influence from the explicit damped GGN (at the default's damping) on the benchmark's trained
  3,702-parameter conv net, whose 2,000 training images exceed a curvature sample of 500;
- ``epoch_s``, ``t100_default_s`` (100 test x 50,000 training images: fit, s_test, scoring),
  ``t100_default_epochs`` (their ratio), ``kronfluence_t100_s`` (EK-FAC factors + scores): the
  median over ``repeats`` at 1 thread (``timings`` has min, max and every value, at 1 and 2
  threads, each ratio taken within its thread count); ``peak_rss_mb``: the largest peak RSS of
  the default solver's t100 processes; ``load_avg_at_start`` (and whether the machine was idle).

"The default solver" is ``make_solver("fast")``: its settings are ``FastSettings()``'s defaults,
read at run time, never written here. Each stage runs in its own process (``bench/hygiene.py``)
and waits for an idle machine first. Child results are cached under ``data/bench/trust-<key>/``
(``--fresh`` ignores them); a run that reused any says so (``resumed``).

    python bench/trust.py                        # the full run on an idle machine (about 30 min)
    python bench/trust.py --kronfluence-repeats 3 --kronfluence-threads 1
    python bench/trust.py --smoke                # seconds: synthetic data, tiny sizes, not a benchmark
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the package, without installing it
sys.path.insert(0, str(ROOT / "bench"))  # hygiene, engine_stages

import hygiene  # noqa: E402

RESULT = ROOT / "bench" / "results" / "engine.json"
TIMED = ("epoch", "t100", "kronfluence")
# idle-machine seconds per stage at 1 thread (the 2026-12-03 run: epoch 8.4 s, default t100 74 s with 16 fits of
# 250 images, kronfluence 216 s, stability 129 s, small 45 s), plus ~10 s to start each process and load the data
ESTIMATE_S = {"stability": 130, "small": 45, "epoch": 9 + 10, "t100": 74 + 10, "kronfluence": 216 + 10}
EKFAC_FIT_S = 60  # the EK-FAC fit on all 50,000 images (rest="ekfac"), 1 thread
# keys an earlier bench/engine.py run measured under load, superseded by this run's idle timings
UNDER_LOAD_KEYS = ("epoch_s", "epoch_call_s", "t100_fast_s", "fast_fit_s", "fast_s_test_s", "fast_scoring_s",
                   "t100_fast_epochs", "kronfluence_t100_s", "kronfluence_fit_s", "kronfluence_scores_s",
                   "speedup_vs_kronfluence", "speedup_vs_nimarb", "peak_rss_mb", "peak_rss_mb_by_stage",
                   "wall_s_by_stage", "nimarb_s_per_test", "ours_s_per_test", "speedup_1test_same_settings",
                   "nimarb_t100_s", "t100_cg_s", "cg_s_test_s", "lissa_s_test_s", "stream_s")


@dataclass
class TrustConfig:
    checkpoint: str = "data/cifar_net.pt"  # the real trained model
    n_test: int = 100  # test images of the timed task (the first n_test of the test split)
    n_train: int | None = None  # training images (None: all 50,000)
    stability_n_test: int = 10  # class-balanced test images for the seed comparison (issue 9: >= 10)
    small_channels: tuple = (4, 4)  # the bench's small conv net: Net(channels, hidden), 3,702 parameters
    small_hidden: tuple = (24, 16)
    small_n_train: int = 2000  # its CIFAR training images (a seeded random subset)
    small_epochs: int = 30
    small_n_test: int = 20  # test images whose Pearson is averaged
    threads: tuple = (1, 2)  # every timed stage at each of these thread counts
    repeats: int = 3  # epoch and t100 repeats per thread count (median, min, max)
    kronfluence_repeats: int = 1  # kronfluence repeats per thread count in kronfluence_threads (~276 s each at 1 thread)
    kronfluence_threads: tuple = (1, 2)
    kron_batch: int = 512  # kronfluence's per-device batch
    seed: int = 0
    synthetic: bool = False  # random images and an untrained small Net (the smoke run): no data, no checkpoint
    idle: hygiene.IdleWait = field(default_factory=hygiene.IdleWait)

    def __post_init__(self):
        if isinstance(self.idle, dict):
            self.idle = hygiene.IdleWait(**self.idle)
        self.threads, self.small_channels, self.small_hidden = (tuple(self.threads), tuple(self.small_channels),
                                                                tuple(self.small_hidden))
        self.kronfluence_threads = tuple(self.kronfluence_threads)
        if self.stability_n_test < 2 or self.stability_n_test % 10:
            raise ValueError(f"stability_n_test must be a positive multiple of 10, got {self.stability_n_test}")
        if self.repeats < 1 or self.kronfluence_repeats < 0 or not self.threads:
            raise ValueError("repeats >= 1, kronfluence_repeats >= 0 and at least one thread count")
        if 1 not in self.threads:
            raise ValueError("the headline figures are at 1 thread: threads must include 1")

    @classmethod
    def smoke(cls) -> TrustConfig:
        return cls(n_test=2, n_train=60, small_n_train=40, small_epochs=1, small_n_test=2, threads=(1,), repeats=1,
                   kronfluence_threads=(1,), kron_batch=60, synthetic=True,
                   idle=hygiene.IdleWait(threshold=1e9, timeout_s=0))


# -- the stages (each in its own process) ----------------------------------------------------------
def _load(cfg: TrustConfig):
    """(data, model, weight decay, training split, data source) for the config."""
    import torch
    from engine_stages.common import random_subset

    from influence_over_inference.study.data import CIFAR10Data, CIFAR10Split
    from influence_over_inference.study.model import Net
    from influence_over_inference.study.training import TrainConfig

    if cfg.synthetic:
        g = torch.Generator().manual_seed(cfg.seed)
        n, m = cfg.n_train or 60, max(cfg.n_test, cfg.small_n_test, cfg.stability_n_test)
        split = lambda k, tag: CIFAR10Split(torch.randint(0, 256, (k, 32, 32, 3), generator=g, dtype=torch.uint8),  # noqa: E731
                                            torch.arange(k) % 10, [f"{tag}{i}" for i in range(k)])
        data = CIFAR10Data(split(n, "train"), split(m, "test"), source="synthetic")
        torch.manual_seed(cfg.seed)
        model = Net(channels=cfg.small_channels, hidden=cfg.small_hidden).eval()  # the small net's shape: fast
        return data, model, TrainConfig().weight_decay, data.train
    from influence_over_inference.study.checkpoints import load_checkpoint
    from influence_over_inference.study.data import load_cifar10

    data = load_cifar10(root=str(ROOT / "data"))
    model, meta = load_checkpoint(ROOT / cfg.checkpoint)
    return data, model.eval(), float(meta.get("recipe", {}).get("weight_decay", 0.0)), random_subset(
        data.train, cfg.n_train, cfg.seed)


def stage_epoch(cfg, data, model, wd, train, threads, work):
    from influence_over_inference.study.training import TrainConfig
    from influence_over_inference.study.training import train as train_model

    result = train_model(train, TrainConfig(epochs=1, device="cpu", threads=threads), progress=False)
    return {"epoch_s": result.history[0].seconds}


def stage_t100(cfg, data, model, wd, train, threads, work):
    import torch

    from influence_over_inference.engine.scores import influence, s_test
    from influence_over_inference.engine.solvers.registry import make_solver

    x, y = data.test.tensors(torch.arange(cfg.n_test))
    t0 = time.perf_counter()
    solver = make_solver("fast").fit(model, train, weight_decay=wd)  # FastSettings() as they are
    t_fit = time.perf_counter() - t0
    stest = s_test(model, x, y, solver)
    t_s = time.perf_counter() - t0 - t_fit
    influence(model, None, None, train, solver, stest=stest)
    total = time.perf_counter() - t0
    return {"t100_default_s": total, "fit_s": t_fit, "s_test_s": t_s, "scoring_s": total - t_fit - t_s,
            "default_settings": solver.describe()}


def stage_kronfluence(cfg, data, model, wd, train, threads, work):
    import torch
    from engine_stages.kronfluence import kronfluence_scores

    from influence_over_inference.engine.solvers.fast import FastSettings

    x, y = data.test.tensors(torch.arange(cfg.n_test))
    tx, ty = train.tensors()
    _, times = kronfluence_scores(model, tx, ty, x, y, wd + FastSettings().damping, work / f"kronfluence-t{threads}",
                                  cfg.kron_batch)
    return times


def stage_stability(cfg, data, model, wd, train, threads, work):
    """Two default fits, seeds s and s + 1 (s the default's seed): Spearman and top-10 overlap per test image."""
    from engine_stages.assemble import _spearman_rows

    from influence_over_inference.engine.scores import influence
    from influence_over_inference.engine.solvers.fast import FastSettings
    from influence_over_inference.engine.solvers.registry import make_solver
    from influence_over_inference.experiments.lds import balanced_test_indices

    idx = balanced_test_indices(data.test.labels, cfg.stability_n_test, cfg.seed)
    x, y = data.test.tensors(idx)
    seed = FastSettings().seed
    scores, described = [], []
    for s in (seed, seed + 1):
        solver = make_solver("fast", seed=s).fit(model, train, weight_decay=wd)
        scores.append(influence(model, x, y, train, solver).double())
        described.append(solver.describe())
    a, b = scores
    k = min(10, a.shape[1])
    overlap = {name: [len(set(a[i].topk(k, largest=big).indices.tolist()) & set(b[i].topk(k, largest=big).indices.tolist()))
                      for i in range(len(idx))] for name, big in (("helpful", True), ("harmful", False))}
    rho = _spearman_rows(a, b)
    return {"seed_spearman_per_test": rho.tolist(), "seed_top10_helpful_per_test": overlap["helpful"],
            "seed_top10_harmful_per_test": overlap["harmful"], "test_indices": idx.tolist(), "settings": described}


def stage_small(cfg, data, model, wd, train, threads, work):
    """The default solver against exact influence (explicit damped GGN, the default's damping) on the small conv net."""
    import copy

    import torch
    from engine_stages.common import random_subset
    from engine_stages.small import _pearson_rows, explicit_ggn

    from influence_over_inference.engine.gradients import grad_z
    from influence_over_inference.engine.scores import influence
    from influence_over_inference.engine.solvers.registry import make_solver
    from influence_over_inference.study.model import Net, count_parameters
    from influence_over_inference.study.training import TrainConfig, evaluate
    from influence_over_inference.study.training import train as train_model

    torch.manual_seed(cfg.seed)
    tiny = Net(channels=cfg.small_channels, hidden=cfg.small_hidden)
    tc = TrainConfig(epochs=cfg.small_epochs, device="cpu", seed=cfg.seed, threads=threads)
    small_train = random_subset(data.train, cfg.small_n_train, cfg.seed)
    tiny = train_model(small_train, tc, model=tiny, progress=False).model.eval()
    tx, ty = small_train.tensors()
    x, y = data.test.tensors(torch.arange(cfg.small_n_test))
    tiny64 = copy.deepcopy(tiny).double()
    tx64, x64 = tx.double(), x.double()
    solver = make_solver("fast").fit(tiny64, tx64, ty, weight_decay=tc.weight_decay)  # FastSettings() as they are
    ggn = explicit_ggn(tiny64, tx64)
    d = tc.weight_decay + solver.settings.damping
    g_train = grad_z(tiny64, tx64, ty)  # (n, P)
    exact = torch.linalg.solve(ggn + d * torch.eye(len(ggn), dtype=ggn.dtype), grad_z(tiny64, x64, y).T).T
    r = _pearson_rows(influence(tiny64, x64, y, (tx64, ty), solver), exact @ g_train.T / len(ty))
    return {"pearson_default_vs_exact_small": float(r.mean()), "pearson_min": float(r.min()),
            "small_params": count_parameters(tiny), "small_n_train": len(ty), "small_n_test": len(y),
            "small_test_accuracy": evaluate(tiny, data.test)["accuracy"], "default_settings": solver.describe(),
            "reference": f"explicit damped GGN, damping weight_decay + {solver.settings.damping}"}


STAGES = {"epoch": stage_epoch, "t100": stage_t100, "kronfluence": stage_kronfluence, "stability": stage_stability,
          "small": stage_small}


def run_stage(name: str, cfg: TrustConfig, threads: int, out: Path) -> None:
    """The child process: one stage at ``threads`` threads; its JSON carries its own peak RSS."""
    import os

    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    loaded = _load(cfg)
    start = time.perf_counter()
    result = STAGES[name](cfg, *loaded[:4], threads, out.parent)
    result.update({"stage_wall_s": time.perf_counter() - start, "threads": torch.get_num_threads(),
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "load_avg": os.getloadavg(), "data_source": loaded[0].source})
    from influence_over_inference.engine.io import write_json_atomic

    write_json_atomic(result, out)


# -- the orchestrator -------------------------------------------------------------------------------
def plan(cfg: TrustConfig) -> list[tuple[str, int, int]]:
    """(stage, threads, repeat) in run order: epoch and t100 alternate, so drift in the load hits both alike."""
    jobs = [("stability", 1, 0), ("small", 1, 0)]
    for t in cfg.threads:
        for r in range(cfg.repeats):
            jobs += [("epoch", t, r), ("t100", t, r)]
        if t in cfg.kronfluence_threads:
            jobs += [("kronfluence", t, r) for r in range(cfg.kronfluence_repeats)]
    return jobs


def estimate_s(jobs) -> float:
    """Rough wall seconds on the idle machine (2 threads counted as 1: an overestimate).

    The default solver's fit scales with its fits and sampled images (12.4 s for one fit of 500
    images, issue 9); stability makes two fits and scores 10 test images.
    """
    from influence_over_inference.engine.solvers.fast import FastSettings

    fast = FastSettings()
    fit = 12.4 * getattr(fast, "n_fits", 1) * fast.n_samples / 500
    rest = EKFAC_FIT_S if getattr(fast, "rest", "damping") == "ekfac" else 0.0
    extra = {"t100": fit - 12.4 + rest, "stability": 2 * (fit - 12.4 + rest)}
    return float(sum(ESTIMATE_S[name] + extra.get(name, 0.0) for name, _, _ in jobs))


def _key(cfg: TrustConfig) -> str:
    import hashlib

    from influence_over_inference.engine.solvers.fast import FastSettings

    blob = {"cfg": asdict(replace(cfg, idle=hygiene.IdleWait())), "fast": asdict(FastSettings())}
    if not cfg.synthetic:
        from influence_over_inference.engine.hashing import file_sha256

        blob["checkpoint"] = file_sha256(ROOT / cfg.checkpoint)
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]


def assemble(cfg: TrustConfig, runs: dict, wait: dict, resumed: bool, started: str, minutes: float) -> dict:
    """The engine.json keys from the children's results (``runs[(stage, threads)]`` = list of repeats)."""
    import numpy as np

    stab, small = runs[("stability", 1)][0], runs[("small", 1)][0]
    helpful, harmful = np.array(stab["seed_top10_helpful_per_test"]), np.array(stab["seed_top10_harmful_per_test"])
    timings = {}
    for t in cfg.threads:
        row = {"epoch_s": hygiene.summarize([r["epoch_s"] for r in runs[("epoch", t)]]),
               "t100_default_s": hygiene.summarize([r["t100_default_s"] for r in runs[("t100", t)]])}
        for part in ("fit_s", "s_test_s", "scoring_s"):
            row[f"t100_{part}"] = hygiene.summarize([r[part] for r in runs[("t100", t)]])
        row["t100_default_epochs"] = row["t100_default_s"]["median"] / row["epoch_s"]["median"]
        if runs.get(("kronfluence", t)):
            row["kronfluence_t100_s"] = hygiene.summarize([r["kronfluence_t100_s"] for r in runs[("kronfluence", t)]])
            row["kronfluence_fit_s"] = hygiene.summarize([r["kronfluence_fit_s"] for r in runs[("kronfluence", t)]])
        timings[str(t)] = row
    one = timings["1"]
    checkpoint = None
    if not cfg.synthetic:  # which trained model the stability and timings are of (training differs across machines)
        from influence_over_inference.engine.hashing import file_sha256

        checkpoint = file_sha256(ROOT / cfg.checkpoint)[:16]
    peak = {f"{name}@{t}": max(r["peak_rss_mb"] for r in rs) for (name, t), rs in runs.items()}
    return {
        "seed_spearman_default": float(np.mean(stab["seed_spearman_per_test"])),
        "seed_top10_overlap_default": float((helpful.mean() + harmful.mean()) / 2),
        "seed_top10_overlap_helpful": float(helpful.mean()), "seed_top10_overlap_harmful": float(harmful.mean()),
        "seed_stability": stab,
        "pearson_default_vs_exact_small": small["pearson_default_vs_exact_small"], "small_default": small,
        "t100_default_s": one["t100_default_s"]["median"], "epoch_s": one["epoch_s"]["median"],
        "t100_default_epochs": one["t100_default_epochs"],
        "kronfluence_t100_s": one["kronfluence_t100_s"]["median"] if "kronfluence_t100_s" in one else None,
        "peak_rss_mb": max(v for k, v in peak.items() if k.startswith("t100@")),
        "peak_rss_mb_by_stage_threads": peak,
        "load_avg_at_start": wait["load_avg_at_start"],
        "trust_run": {"timings_by_threads": timings, "idle": wait, "resumed": resumed, "started_at": started,
                      "minutes": minutes, "default_settings": runs[("t100", 1)][0]["default_settings"],
                      "config": asdict(cfg), "data_source": stab["data_source"], "checkpoint_sha256": checkpoint,
                      "kronfluence_done": {str(t): len(runs.get(("kronfluence", t), [])) for t in cfg.threads},
                      "command": "python bench/trust.py", "notes": [
                          "timings: median (min, max) of repeats, each in its own process; headline keys at 1 thread; "
                          "t100_default_epochs is the ratio of medians at the same thread count, same run",
                          "peak_rss_mb: the largest peak RSS of the default solver's t100 processes"]},
    }


def merge_into(path: Path, new: dict, threshold: float) -> dict:
    """``new`` over the existing file; keys an earlier run timed under load move to ``superseded_under_load``."""
    old = json.loads(path.read_text()) if path.exists() else {}
    loads = [v[0] for v in old.get("load_avg_by_stage", {}).values()]
    if loads and max(loads) >= threshold and "trust_run" not in old:  # after a trust run its keys are its own
        moved = {k: old.pop(k) for k in UNDER_LOAD_KEYS if k in old}
        if moved:
            old["superseded_under_load"] = {
                "keys": moved, "reason": f"timed by bench/engine.py while other jobs loaded the machine (1-minute load "
                f"average up to {max(loads):.1f}); the idle figures are this file's trust_run"}
    return {**old, **new}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="seconds: synthetic data, tiny sizes (not a benchmark)")
    ap.add_argument("--fresh", action="store_true", help="ignore cached child results")
    ap.add_argument("--repeats", type=int, default=None, help="epoch and t100 repeats per thread count (default 3)")
    ap.add_argument("--threads-list", type=int, nargs="+", default=None, help="thread counts (default 1 2)")
    ap.add_argument("--kronfluence-repeats", type=int, default=None, help="per thread count (default 1)")
    ap.add_argument("--kronfluence-threads", type=int, nargs="+", default=None, help="(default 1 2)")
    ap.add_argument("--idle-threshold", type=float, default=None, help="1-minute load average counted as idle (0.5)")
    ap.add_argument("--idle-timeout", type=float, default=None, help="seconds to wait for idle, then run anyway (600)")
    ap.add_argument("--out", default=None, help="results file (default bench/results/engine.json; smoke: in the cache)")
    ap.add_argument("--cache-dir", default=None, help="child results (default data/bench/trust-<settings hash>/)")
    ap.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)  # internal: a child process
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stage:
        run_stage(args.stage, TrustConfig(**json.loads(args.config)), args.threads, Path(args.out))
        return 0
    cfg = TrustConfig.smoke() if args.smoke else TrustConfig()
    overrides = {"repeats": args.repeats, "threads": args.threads_list, "kronfluence_repeats": args.kronfluence_repeats,
                 "kronfluence_threads": args.kronfluence_threads}
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    idle = {"threshold": args.idle_threshold, "timeout_s": args.idle_timeout}
    cfg.idle = replace(cfg.idle, **{k: v for k, v in idle.items() if v is not None})
    cache = Path(args.cache_dir) if args.cache_dir else ROOT / "data" / "bench" / (
        ("trust-smoke-" if args.smoke else "trust-") + _key(cfg))
    cache.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else (cache / "engine.json" if args.smoke else RESULT)
    jobs = plan(cfg)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"trust benchmark: {len(jobs)} stages, estimate {estimate_s(jobs) / 60:.0f} min on the idle machine; "
          f"cache {cache}", flush=True)
    wait = hygiene.wait_until_idle(cfg.idle, report=lambda m: print(m, flush=True))
    print(f"load average at start {wait['load_avg_at_start']:.2f} (idle: {wait['idle']})", flush=True)
    t0 = time.perf_counter()
    runs, resumed = {}, False
    child_cfg = json.dumps(asdict(cfg), default=list)
    for i, (name, threads, rep) in enumerate(jobs, 1):
        path = cache / f"{name}-t{threads}-r{rep}.json"
        label = f"[{i}/{len(jobs)}] {name} threads={threads} repeat {rep + 1}"
        if path.exists() and not args.fresh:
            resumed = True
            print(f"{label}: cached", flush=True)
        else:
            s = time.perf_counter()
            hygiene.run_child([str(Path(__file__).resolve()), "--stage", name, "--config", child_cfg], threads, path,
                              cwd=ROOT)
            left = estimate_s(jobs[i:])
            print(f"{label}: {time.perf_counter() - s:.1f} s (elapsed {(time.perf_counter() - t0) / 60:.1f} min, "
                  f"about {left / 60:.0f} min left)", flush=True)
        runs.setdefault((name, threads), []).append(json.loads(path.read_text()))
    new = assemble(cfg, runs, wait, resumed, started, (time.perf_counter() - t0) / 60)
    from influence_over_inference.engine.io import write_json_atomic

    write_json_atomic(merge_into(out, new, cfg.idle.threshold), out)
    for k in ("seed_spearman_default", "seed_top10_overlap_default", "pearson_default_vs_exact_small", "t100_default_s",
              "epoch_s", "t100_default_epochs", "kronfluence_t100_s", "peak_rss_mb", "load_avg_at_start"):
        print(f"  {k}: {new[k]}", flush=True)
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
