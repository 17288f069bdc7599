"""Perturbation influence checked by retraining, and a training-set attack (Koh & Liang, ICML 2017, §2.2, §5.2).

Three parts, all on the class-balanced 5,000-image subset model that the network leave-one-out
uses (:mod:`.loo_network`), with its retraining protocol (from the trained weights, the same seed
and minibatches, minus a control run, :mod:`.retraining`), so one retrain takes seconds here:

1. **Finite differences** (:mod:`.perturbation_fd`): on a tiny model of the same architecture
   in float64, the map equals minus the pixel gradient of the exact score (``fd_rel_err``).
2. **The retraining check**: for each chosen test image, its most helpful and its most harmful
   training image is moved by ``step`` pixel levels (of 255) along the sign of its map, saved as
   8-bit, and the model retrained; predicted change ``<map, delta>`` against the actual change of
   the test loss, over all (training image, step) pairs (``retrain_pearson``). The steps are the
   smallest that survive 8-bit saving (1 and 2 levels, both signs): the map is a derivative, and
   at 8 levels the pilot showed it saturating (a helpful training image moved along +map becomes
   so easy that its gradient, and with it its influence, vanishes; the linear prediction then
   overshoots many times). The same pairs are also predicted by the score difference
   ``score(x) - score(x + delta)`` (exact in the pixels, first order in the weights).
3. **The attack**: for correctly classified test images, the ``k`` most helpful training images
   (by the engine's scores) are each moved by ``epsilon`` (8 levels) along the sign of their map,
   clipped to [0, 255] and stored as uint8 (the attack survives saving), then the model retrained:
   did the prediction flip, how much did the test loss rise? The control moves the same images by
   random signs of the same size (seeded ``torch.Generator``); Koh & Liang's iterative variant
   (:func:`iterative_perturbation`) takes ``iterative_steps`` smaller steps within the same budget,
   the map recomputed at the perturbed images after each. Two groups of test images: typical ones
   (the first correctly classified of each class; the issue's keys) and those with the smallest
   margins (the easiest to flip), each with its own flip rates and mean loss changes.

Pixel space: u in [0, 255]; the model sees x = 2u/255 - 1, so dx/du = 2/255 and a step of ``s``
levels moves x by ``2s/255``. Every retrain is cached (one entry per run, resumable).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..engine.io import save_npz_atomic, write_json_atomic
from .loo_network import DEFAULT_SOLVER_SETTINGS
from .metrics import pearson, spearman
from .retraining import (
    RetrainConfig,
    data_order,
    losses_and_predictions,
    retrain,
    subset_split,
    train_subset_model,
)
from .store import CACHE_DIR, ResultCache, load_config_result, settings_key

log = logging.getLogger(__name__)

RESULT_PATH = Path("results/perturbation.json")


ARRAYS_PATH = Path("results/perturbation.npz")


PIXEL_LEVELS = 255  # u in [0, 255]; the users' transform maps it to x = 2u/255 - 1


@dataclass
class PerturbationConfig:
    n_per_class: int = 500  # subset model: the first 500 training images of each class (as the network leave-one-out)
    train_epochs: int = 30  # epochs of the subset model
    check_test_indices: tuple[int, ...] = tuple(range(0, 10000, 1000))  # retraining check: one test image per class
    check_steps: tuple[int, ...] = (-2, -1, 1, 2)  # pixel levels along sign(map); negative: against the map
    n_attack_per_class: int = 3  # attack: the first correctly classified test images of each class (30 in all)
    n_low_margin: int = 30  # and, apart, the correctly classified test images with the smallest margins
    k_images: int = 5  # training images perturbed per attacked test image: its most helpful
    epsilon: int = 8  # the attack's L-infinity budget in pixel levels (8/255)
    seed: int = 0  # seeds the random-sign control (a torch.Generator)
    iterative_steps: int = 4  # Koh & Liang's iterative variant: this many steps of epsilon / steps, the map
    # recomputed at the perturbed images after each, kept within the epsilon ball (0: not run)
    solver: str = "fast"  # the engine's solver for scores and maps (the default for many test images)
    solver_settings: dict = field(default_factory=lambda: dict(DEFAULT_SOLVER_SETTINGS["fast"]))
    damping: float | None = None  # lambda of the solver; None: 1 / retrain.horizon (as the network leave-one-out)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)  # the leave-one-out protocol: 300 steps at lr 0.0005
    fd_n_train: int = 64  # finite-difference check: training images of the tiny float64 model
    fd_step: float = 1e-5  # central-difference step on the normalised input
    fd_pixels: int | None = None  # pixels differenced per image (None: all 3,072; fewer only for tests)
    fd_fit_steps: int = 200  # L-BFGS iterations of the tiny model

    def __post_init__(self):
        if isinstance(self.retrain, dict):
            self.retrain = RetrainConfig(**self.retrain)
        self.check_test_indices = tuple(int(i) for i in self.check_test_indices)
        self.check_steps = tuple(self.check_steps)
        if not self.check_test_indices or min(self.check_test_indices) < 0:
            raise ValueError(f"check_test_indices must be non-negative and not empty, got {self.check_test_indices}")
        if not self.check_steps or any(int(s) != s or s == 0 for s in self.check_steps):
            raise ValueError(f"check_steps must be non-zero whole pixel levels (8-bit images), got {self.check_steps}")
        if not 1 <= self.k_images <= 5:
            raise ValueError(f"k_images must be 1..5 (the issue's budget), got {self.k_images}")
        if not 1 <= self.epsilon <= PIXEL_LEVELS or int(self.epsilon) != self.epsilon:
            raise ValueError(f"epsilon must be a whole number of pixel levels in 1..255, got {self.epsilon}")
        if self.iterative_steps < 0 or (self.iterative_steps and self.epsilon % self.iterative_steps):
            raise ValueError(f"iterative_steps must be >= 0 and divide epsilon={self.epsilon}, got {self.iterative_steps}")
        if self.n_attack_per_class < 1 or self.n_low_margin < 0:
            raise ValueError("n_attack_per_class must be >= 1 and n_low_margin >= 0")
        if self.damping is None:
            self.damping = round(1.0 / self.retrain.horizon, 4)


# -- pixel space ---------------------------------------------------------------------------

def to_pixel_layout(maps: torch.Tensor) -> torch.Tensor:
    """Maps on the normalised input (N, 3, H, W) -> the images' layout (N, H, W, 3)."""
    return maps.permute(0, 2, 3, 1)


def perturb_pixels(images: torch.Tensor, signs: torch.Tensor, step: int) -> torch.Tensor:
    """``clip(u + step * signs, 0, 255)`` as uint8: valid 8-bit images, ``|u' - u| <= |step|`` everywhere.

    ``images`` uint8 (N, H, W, 3); ``signs`` (N, H, W, 3) in {-1, 0, 1} (0: the pixel stays).
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if signs.shape != images.shape:
        raise ValueError(f"signs {tuple(signs.shape)} must match images {tuple(images.shape)}")
    moved = images.to(torch.int32) + int(step) * torch.sign(signs).to(torch.int32)
    return moved.clamp(0, PIXEL_LEVELS).to(torch.uint8)


def random_signs(shape, generator: torch.Generator) -> torch.Tensor:
    """Random signs in {-1, 1} of ``shape`` (int8), from ``generator``."""
    return (torch.randint(0, 2, tuple(shape), generator=generator) * 2 - 1).to(torch.int8)


def normalised_delta(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """The change of the model's input (N, 3, H, W) when uint8 images ``old`` become ``new``: 2 (u' - u) / 255."""
    from ..study.data import normalize_uint8

    return normalize_uint8(new) - normalize_uint8(old)


def iterative_perturbation(model, stest: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, n_train: int,
                           epsilon: int, steps: int) -> torch.Tensor:
    """Koh & Liang's iterative attack: ``steps`` steps of ``epsilon // steps`` levels along the sign of
    the map at the current images (``stest`` (1, P) held fixed), each clipped to the ``epsilon`` ball
    around the original uint8 ``images`` (k, H, W, 3) and to [0, 255]. Returns uint8 images."""
    from ..engine.perturbation import perturbation_influence
    from ..study.data import normalize_uint8

    low = (images.to(torch.int32) - epsilon).clamp(min=0)
    high = (images.to(torch.int32) + epsilon).clamp(max=PIXEL_LEVELS)
    current = images
    for _ in range(steps):
        maps = perturbation_influence(model, stest, normalize_uint8(current), labels, n_train)[0]  # (k, 3, H, W)
        moved = perturb_pixels(current, to_pixel_layout(maps), epsilon // steps).to(torch.int32)
        current = torch.minimum(torch.maximum(moved, low), high).to(torch.uint8)
    return current


# -- choosing test images ------------------------------------------------------------------

def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Logit of the true class minus the largest other logit (N,): > 0 where the prediction is right."""
    true = logits.gather(1, labels[:, None])[:, 0]
    other = logits.scatter(1, labels[:, None], float("-inf")).max(1).values
    return true - other


def attack_targets(labels: torch.Tensor, ok: torch.Tensor, margin: torch.Tensor, per_class: int,
                   n_low_margin: int) -> tuple[list[int], list[int]]:
    """Test images to attack: the first ``per_class`` of each class among ``ok`` (typical), and the
    ``n_low_margin`` of ``ok`` with the smallest margins not already chosen (the easiest to flip)."""
    typical = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(ok & (labels == c)).flatten()[:per_class]
        typical += members.tolist()
    rest = torch.nonzero(ok).flatten()
    rest = rest[~torch.isin(rest, torch.tensor(typical, dtype=torch.long))]
    low = rest[torch.argsort(margin[rest])][:n_low_margin]
    return sorted(typical), low.tolist()


# -- the experiment ------------------------------------------------------------------------

def _rates(deltas, flips) -> tuple[float, float]:
    return float(np.mean(flips)), float(np.mean(deltas))


def run_perturbation(data, config: PerturbationConfig | None = None, cache_dir: str | os.PathLike = CACHE_DIR,
                     progress: bool = True) -> tuple[dict, dict]:
    """Finite differences, the retraining check and the attack: ``(result, arrays)`` (cached, resumable).

    ``result`` holds the issue's keys (``fd_rel_err``, ``retrain_pearson``, ``n_pairs``, ``n_attacked``,
    ``k_images``, ``epsilon``, ``attack_flip_rate``, ``random_flip_rate``, ``attack_loss_change``,
    ``random_loss_change``, ``minutes``, ``data_source``) and the details; ``arrays`` the images of
    one before/after example and the check's predicted and actual changes, for the notebook.
    """
    from tqdm.auto import tqdm

    from ..engine.gradients import grad_z
    from ..engine.hashing import file_sha256
    from ..engine.influence_engine import InfluenceEngine
    from ..engine.solvers.registry import make_solver
    from ..study.data import normalize_uint8
    from ..study.training import TrainConfig
    from .perturbation_fd import fd_check

    config = config or PerturbationConfig()
    stem = Path(cache_dir) / f"perturbation-result-{settings_key(asdict(config))}"
    done = load_config_result(stem.with_suffix(".json"), asdict(config), data.source)
    if done is not None and stem.with_suffix(".npz").exists():
        with np.load(stem.with_suffix(".npz")) as z:
            return done, dict(z)
    start = time.perf_counter()
    timings = {}
    fd = fd_check(data.train, config.fd_n_train, config.fd_step, config.seed, config.fd_pixels, config.fd_fit_steps)
    timings["fd_seconds"] = time.perf_counter() - start

    train_config = TrainConfig(epochs=config.train_epochs, threads=torch.get_num_threads())
    model, ckpt, indices = train_subset_model(data, config.n_per_class, train_config, cache_dir, progress)
    split = subset_split(data.train, indices)
    x, y = normalize_uint8(split.images), split.labels  # (N, 3, 32, 32), (N,)
    n = len(y)
    x_test_all, y_test_all = normalize_uint8(data.test.images), data.test.labels
    with torch.no_grad():
        logits = model.eval()(x_test_all)
    if max(config.check_test_indices) >= len(y_test_all):
        raise ValueError(f"check test index {max(config.check_test_indices)} out of range ({len(y_test_all)} test images)")

    # the control run first: attacked images must be right before and after plain retraining
    order = data_order(n, config.retrain.steps, config.retrain.batch_size,
                       torch.Generator().manual_seed(config.retrain.seed))
    control_model = retrain(model, x, y, torch.ones(n), config.retrain, order)
    with torch.no_grad():
        control_logits = control_model(x_test_all)
    ok = (logits.argmax(1) == y_test_all) & (control_logits.argmax(1) == y_test_all)
    typical, low = attack_targets(y_test_all, ok, margins(logits, y_test_all), config.n_attack_per_class,
                                  config.n_low_margin)
    attacked = typical + low
    check = list(config.check_test_indices)
    watched = sorted(set(check + attacked))  # every retrain records the losses of these test images
    pos = {t: i for i, t in enumerate(watched)}
    xw, yw = x_test_all[watched], y_test_all[watched]

    engine = InfluenceEngine(model, split, make_solver(config.solver, damping=config.damping, **config.solver_settings),
                             weight_decay=train_config.weight_decay, cache_dir=Path(cache_dir) / "influence",
                             checkpoint=ckpt, data_source=data.source, progress=progress)
    t0 = time.perf_counter()
    scores = engine.scores(xw, yw).double()  # (len(watched), n), positive = helpful
    stest = engine.s_test(xw, yw)  # (len(watched), P)
    timings["scores_seconds"] = time.perf_counter() - t0

    # what each run perturbs: (key, training indices, their new uint8 images)
    runs, pairs = [], []
    for t in check:
        row = scores[pos[t]]
        for kind, j in (("helpful", int(row.argmax())), ("harmful", int(row.argmin()))):
            pmap = engine.perturbation(xw[pos[t]: pos[t] + 1], yw[pos[t]: pos[t] + 1], [j])[0]  # (1, 3, 32, 32)
            for step in config.check_steps:
                new = perturb_pixels(split.images[[j]], to_pixel_layout(pmap), step)
                delta = normalised_delta(new, split.images[[j]])
                g = grad_z(model, torch.cat([x[[j]], x[[j]] + delta]), y[[j, j]]).double()  # (2, P)
                after = float(stest[pos[t]].double() @ g[1]) / n
                pairs.append({"test_index": t, "train_index": j, "kind": kind, "step": int(step),
                              "score": float(row[j]), "predicted": float((pmap.double() * delta.double()).sum()),
                              "predicted_score_difference": float(row[j]) - after})
                runs.append((f"check:{t}:{j}:{step}", [j], new))
    gen = torch.Generator().manual_seed(config.seed)
    attack = []
    for t in attacked:
        helpful = torch.argsort(scores[pos[t]], descending=True)[: config.k_images]
        maps = engine.perturbation(xw[pos[t]: pos[t] + 1], yw[pos[t]: pos[t] + 1], helpful)[0]  # (k, 3, 32, 32)
        old = split.images[helpful]
        poisoned = perturb_pixels(old, to_pixel_layout(maps), config.epsilon)
        noisy = perturb_pixels(old, random_signs(old.shape, gen), config.epsilon)
        attack.append({"test_index": t, "group": "typical" if t in typical else "low_margin",
                       "train_indices": helpful.tolist(), "predicted": float((maps * normalised_delta(poisoned, old)).sum()),
                       "predicted_random": float((maps * normalised_delta(noisy, old)).sum()),
                       "score_sum": float(scores[pos[t], helpful].sum()), "poisoned": poisoned, "noisy": noisy})
        runs += [(f"attack:{t}", helpful.tolist(), poisoned), (f"random:{t}", helpful.tolist(), noisy)]
        if config.iterative_steps:  # its own cache key per step count: the one-step runs stay cached
            stepped = iterative_perturbation(model, stest[pos[t]: pos[t] + 1], old, y[helpful], n, config.epsilon,
                                             config.iterative_steps)
            runs.append((f"iterative{config.iterative_steps}:{t}", helpful.tolist(), stepped))
    timings["maps_seconds"] = time.perf_counter() - t0 - timings["scores_seconds"]

    settings = {"experiment": "perturbation", "checkpoint": file_sha256(ckpt), "data_source": data.source,
                "retrain": asdict(config.retrain), "watched": watched, "solver": config.solver,
                "solver_settings": config.solver_settings, "damping": config.damping, "epsilon": config.epsilon,
                "seed": config.seed, "check_steps": list(config.check_steps), "k_images": config.k_images}
    cache = ResultCache(stem.with_name(f"perturbation-runs-{settings_key(settings)}.json"), settings)
    t1 = time.perf_counter()
    if "control" not in cache:
        loss, pred = losses_and_predictions(control_model, xw, yw)
        cache.put("control", {"loss": loss.tolist(), "pred": pred.tolist(), "seconds": 0.0})
    for key, changed, new in tqdm(runs, desc="perturbation retraining", disable=not progress):
        if key not in cache:
            t2 = time.perf_counter()
            xp = x.clone()
            xp[changed] = normalize_uint8(new)
            loss, pred = losses_and_predictions(retrain(model, xp, y, torch.ones(n), config.retrain, order), xw, yw)
            cache.put(key, {"loss": loss.tolist(), "pred": pred.tolist(), "seconds": time.perf_counter() - t2})
    timings["retrain_minutes_this_run"] = (time.perf_counter() - t1) / 60
    # compute of every retrain, including those an interrupted earlier run cached
    timings["retrain_minutes"] = sum(cache[key]["seconds"] for key, _, _ in runs) / 60
    timings["n_retrains"] = len(runs) + 1

    control = cache["control"]
    for p in pairs:
        i = pos[p["test_index"]]
        p["actual"] = cache[f"check:{p['test_index']}:{p['train_index']}:{p['step']}"]["loss"][i] - control["loss"][i]
    pred = np.array([p["predicted"] for p in pairs])
    pred_diff = np.array([p["predicted_score_difference"] for p in pairs])
    actual = np.array([p["actual"] for p in pairs])
    kinds = ("attack", "random") + (("iterative",) if config.iterative_steps else ())
    for a in attack:
        i, label = pos[a["test_index"]], int(y_test_all[a["test_index"]])
        for kind in kinds:
            run = cache[f"{kind}:{a['test_index']}".replace("iterative:", f"iterative{config.iterative_steps}:")]
            a[f"{kind}_loss_change"] = run["loss"][i] - control["loss"][i]
            a[f"{kind}_flipped"] = run["pred"][i] != label
            a[f"{kind}_pred"] = run["pred"][i]
        a["control_loss"], a["label"] = control["loss"][i], label
    groups = {}
    for name in ("typical", "low_margin"):
        rows = [a for a in attack if a["group"] == name]
        if not rows:
            continue
        groups[name] = {"n": len(rows)}
        for kind in kinds:
            flip, change = _rates([a[f"{kind}_loss_change"] for a in rows], [a[f"{kind}_flipped"] for a in rows])
            groups[name][f"{kind}_flip_rate"], groups[name][f"{kind}_loss_change"] = flip, change
        groups[name]["attack_beats_random"] = int(sum(a["attack_loss_change"] > a["random_loss_change"] for a in rows))
        # what the attack's change is close to: removing the k images (their summed scores), not the
        # linear <map, delta>, which overshoots once a perturbed image stops contributing
        changes = [a["attack_loss_change"] for a in rows]
        groups[name]["mean_score_sum"] = float(np.mean([a["score_sum"] for a in rows]))
        groups[name]["mean_predicted_linear"] = float(np.mean([a["predicted"] for a in rows]))
        if len(rows) > 1:
            groups[name]["pearson_change_vs_score_sum"] = pearson([a["score_sum"] for a in rows], changes)
    main = groups["typical"]
    example = max(attack, key=lambda a: (a["attack_flipped"] and not a["random_flipped"], a["attack_loss_change"]))
    arrays = {"example_test_index": np.int64(example["test_index"]),
              "example_test_image": data.test.images[example["test_index"]].numpy(),  # uint8 (32, 32, 3)
              "example_train_indices": np.array(example["train_indices"], dtype=np.int64),  # into the subset
              "example_train_names": np.array([split.names[j] for j in example["train_indices"]]),
              "example_original": split.images[example["train_indices"]].numpy(),  # uint8 (k, 32, 32, 3)
              "example_poisoned": example["poisoned"].numpy(), "example_random": example["noisy"].numpy(),
              "check_predicted": pred, "check_predicted_score_difference": pred_diff, "check_actual": actual,
              "check_steps": np.array([p["step"] for p in pairs], dtype=np.int64)}
    for a in attack:
        del a["poisoned"], a["noisy"]
    timings["wall_minutes_this_run"] = (time.perf_counter() - start) / 60
    timings["minutes"] = timings["wall_minutes_this_run"] - timings["retrain_minutes_this_run"] + timings["retrain_minutes"]
    result = {
        "settings": {**asdict(config), "n_train": n, "data_source": data.source, "subset_model": ckpt.name,
                     "subset_test_accuracy": float((logits.argmax(1) == y_test_all).double().mean()),
                     "retrain_horizon": config.retrain.horizon, "weight_decay": train_config.weight_decay},
        "fd_rel_err": fd["fd_rel_err"], "fd": fd,
        "retrain_pearson": pearson(pred, actual), "retrain_spearman": spearman(pred, actual),
        "retrain_sign_agreement": float(np.mean(np.sign(pred) == np.sign(actual))),
        "retrain_pearson_score_difference": pearson(pred_diff, actual),
        "retrain_spearman_score_difference": spearman(pred_diff, actual),
        "n_pairs": len(pairs), "pairs": pairs,
        "n_attacked": main["n"], "k_images": config.k_images, "epsilon": config.epsilon / PIXEL_LEVELS,
        "epsilon_levels": config.epsilon,
        "attack_flip_rate": main["attack_flip_rate"], "random_flip_rate": main["random_flip_rate"],
        "attack_loss_change": main["attack_loss_change"], "random_loss_change": main["random_loss_change"],
        "groups": groups, "attack": attack,
        "example": {k: example[k] for k in ("test_index", "group", "label", "attack_pred", "random_pred",
                                            "attack_loss_change", "random_loss_change", "train_indices")},
        "timings": timings, "minutes": timings["minutes"], "data_source": data.source,
    }
    write_json_atomic(result, stem.with_suffix(".json"))
    save_npz_atomic(stem.with_suffix(".npz"), **arrays)
    return result, arrays


def write_results(result: dict, arrays: dict, out: str | os.PathLike = RESULT_PATH,
                  arrays_out: str | os.PathLike = ARRAYS_PATH) -> None:
    """``results/perturbation.json`` and the notebook's ``results/perturbation.npz``, atomically."""
    write_json_atomic(result, out)
    save_npz_atomic(arrays_out, **arrays)
