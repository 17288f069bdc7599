"""Summarise a mutmut 3 run (the ``mutants/`` folder) into ``results/mutation.json``.

Per mutated module: mutants killed, survived, timed out, not run, and the survivors, each with a
one-line reason where it is equivalent (no behaviour change; listed in ``EQUIVALENT`` after reading
``mutmut show NAME``). ``score_engine`` / ``score_checkpoints`` = killed / (killed + survived),
equivalent survivors excluded; timeouts (a mutant that loops forever is caught) count as killed.
Usage: ``python tools/mutation.py --minutes M [--out results/mutation.json]`` after ``mutmut run``.

A run may cover some modules only (``bash run.sh mutate "influence_over_inference.engine.solvers.fast*"``),
and ``mutants/`` is a local cache that a fresh clone lacks: a module with no verdict in ``mutants/`` keeps
its row from the existing ``--out`` file, but only while its source is byte for byte the one that row was
measured on (``source_sha256``); a module whose source changed since counts as not run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

# mutant name -> why it cannot change behaviour (read with `mutmut show NAME`)
EQUIVALENT = {
    "influence_over_inference.engine.hashing.x_file_sha256__mutmut_14": "read(None) instead of 1 MiB blocks: same bytes hashed",
    "influence_over_inference.engine.hashing.x_file_sha256__mutmut_16": "2 MiB read blocks instead of 1 MiB: same bytes hashed",
    "influence_over_inference.engine.hashing.x_file_sha256__mutmut_17": "1 << 21 read blocks instead of 1 << 20: same bytes hashed",
    "influence_over_inference.study.checkpoints.x_load_checkpoint__mutmut_66": "config default None instead of {}: build_model(None) is build_model({}), the default Net",
    "influence_over_inference.study.checkpoints.x_load_checkpoint__mutmut_68": "blob.get('config') without default (None): build_model(None) is build_model({}), the default Net",
    "influence_over_inference.engine.scores.x_self_influence__mutmut_20": "torch.empty(2, ...) instead of (1, ...): only row 0 is filled and returned",
    "influence_over_inference.engine.scores.x_top_k__mutmut_17": "topk without dim=1: the default dim=-1 is dim 1 of the (n_test, n_train) matrix",
    "influence_over_inference.engine.scores.x_top_k__mutmut_18": "topk without largest=True: True is topk's default",
    "influence_over_inference.engine.scores.x_top_k__mutmut_26": "topk without dim=1: the default dim=-1 is dim 1 of the (n_test, n_train) matrix",
    "influence_over_inference.engine.solvers.exact.xǁExactSolverǁ_fit__mutmut_21": "GB divisor 1e9 + 1 instead of 1e9: 1 part in 10^9, below the message's 0.1 GB rounding",
    "influence_over_inference.engine.solvers.exact.xǁExactSolverǁ_fit__mutmut_54": "GGN built by curvature_matrix('ggn') instead of its factor rows: the same matrix by a slower route",
    "influence_over_inference.engine.solvers.exact.xǁExactSolverǁ_fit__mutmut_55": "GGN built by curvature_matrix('ggn') instead of its factor rows: the same matrix by a slower route",
    "influence_over_inference.engine.solvers.exact.xǁExactSolverǁ_fit__mutmut_81": "curvature_matrix's own default chunk size instead of the setting: the same matrix",
    "influence_over_inference.engine.scores.x_s_test__mutmut_10": "_n_classes(model, None): its second argument is unused",
    "influence_over_inference.engine.scores.x__n_classes__mutmut_2": "'or True': a model without config gives {}.get('n_classes'), None, as before",
    "influence_over_inference.engine.scores.x__n_classes__mutmut_6": "getattr default None: only reached when the model has a config",
    "influence_over_inference.engine.scores.x__n_classes__mutmut_9": "getattr without default: only reached when the model has a config",
    "influence_over_inference.engine.solvers.cg.xǁCGSolverǁ_fit__mutmut_4": "n_samples == n_train subsampled: the sorted permutation of all indices is all indices in order",
    "influence_over_inference.engine.solvers.cg.xǁCGSolverǁ_fit__mutmut_17": "n_classes starts as '' instead of None: set before its only use",
    "influence_over_inference.engine.solvers.cg.xǁCGSolverǁ_fit__mutmut_28": "class count read from the logits of 2 examples instead of 1: the same count",
    "influence_over_inference.engine.solvers.cg.xǁCGSolverǁapply__mutmut_22": "curvature_products' default chunk size instead of the setting: the same products",
    "influence_over_inference.engine.solvers.cg.xǁCGSolverǁinverse_hvp__mutmut_21": "initial residual >= tol |b| instead of >: differs only if |b| = tol |b|, i.e. b = 0, where both are False",
    "influence_over_inference.engine.solvers.cg.xǁCGSolverǁinverse_hvp__mutmut_23": "warned starts as None instead of False: both falsy, set to True on the first warning",
    "influence_over_inference.engine.solvers.cg.xǁCGSolverǁinverse_hvp__mutmut_101": "relative residual >= tol instead of >: differs only when it equals tol exactly",
    "influence_over_inference.engine.influence_engine.xǁInfluenceEngineǁscores__mutmut_10": "_n_classes(model, None): its second argument is unused",
    "influence_over_inference.engine.solvers.lissa.xǁLiSSASolverǁlargest_eigenvalue__mutmut_22": "two start rows normalised together: the ratio ||A V|| / ||V|| converges to the same largest eigenvalue",
    "influence_over_inference.engine.solvers.fast.xǁFastSolverǁ_fit__mutmut_7": "fits after the first seeded with seed - f instead of seed + f: other, still distinct and fixed starts of the randomized eigensolver",
    "influence_over_inference.engine.solvers.fast.xǁFastSolverǁ_fit_one__mutmut_52": "Gram blocks start at every example instead of every chunk: each row is rewritten with the same values (slower, same matrix)",
    "influence_over_inference.engine.solvers.fast.xǁFastSolverǁ_fit_one__mutmut_81": "'len(evals) or True': top_eigh returns rank >= 1 eigenvalues, so the other branch is never taken",
    "influence_over_inference.engine.solvers.fast.xǁFastSolverǁ_fit_one__mutmut_82": ">= instead of > at the 1e-10 relative cut: differs only for an eigenvalue exactly at the cut",
    "influence_over_inference.engine.solvers.fast.xǁFastSolverǁ_fit_one__mutmut_86": "branch for no eigenvalues: never taken, top_eigh returns rank >= 1 eigenvalues",
    "influence_over_inference.engine.solvers.fast.xǁFastSolverǁ_fit_one__mutmut_87": "branch for no eigenvalues: never taken, top_eigh returns rank >= 1 eigenvalues",
    "influence_over_inference.engine.solvers.fast.xǁFastSolverǁ_factor_parts__mutmut_2": "per-class gradients materialised instead of the ghost pieces: the same Gram matrix by the slower route",
    "influence_over_inference.engine.solvers.fast.xǁFastSolverǁ_factor_parts__mutmut_4": "per-class gradients materialised instead of the ghost pieces: the same Gram matrix by the slower route",
    "influence_over_inference.engine.solvers.fast.x__basis__mutmut_96": "torch.cat without dim=0: 0 is its default",
    "influence_over_inference.engine.solvers.fast.x_top_eigh__mutmut_2": "default iters 5 instead of 4: never used, the solver always passes eigh_iters",
    "influence_over_inference.engine.solvers.fast.x_top_eigh__mutmut_34": "start block drawn in float32, then cast to float64: another fixed, seeded start",
    "influence_over_inference.engine.curvature.x_curvature_matrix__mutmut_3": "column block of 257 instead of 256: the same matrix, built in other slices",
    "influence_over_inference.engine.curvature.x_curvature_matrix__mutmut_4": "chunks of 1001 examples instead of 1000: the same sums",
    "influence_over_inference.engine.curvature.x_curvature_matrix__mutmut_6": "GGN built from curvature_products instead of its factor rows: the same matrix by a slower route",
    "influence_over_inference.engine.curvature.x_curvature_matrix__mutmut_7": "GGN built from curvature_products instead of its factor rows: the same matrix by a slower route",
    "influence_over_inference.engine.curvature.x_curvature_matrix__mutmut_60": "curvature_products' default chunk size instead of the setting: the same products",
    "influence_over_inference.engine.curvature.x_curvature_products__mutmut_3": "chunks of 1001 examples instead of 1000: the same sums",
    "influence_over_inference.engine.curvature.x_curvature_products__mutmut_6": "exactly 4 vectors through vmap instead of the loop: the same products by another route",
    "influence_over_inference.engine.curvature.x_curvature_products__mutmut_23": "GGN products by jvp / vjp instead of factor rows: the same products by a slower route",
    "influence_over_inference.engine.curvature.x_curvature_products__mutmut_24": "GGN products by jvp / vjp instead of factor rows: the same products by a slower route",
    "influence_over_inference.engine.curvature.x_curvature_products__mutmut_26": "hooks support judged on the whole model: where it differs, the jvp / vjp route gives the same products",
    "influence_over_inference.engine.curvature.x_curvature_products__mutmut_86": "f_logits(p) without xb: its default argument is bound to the same chunk",
    "influence_over_inference.engine.gradients.x_iter_grad_z__mutmut_27": "grad_z's default chunk inside one streamed chunk: the same gradients",
    "influence_over_inference.engine.gradients.x_class_gradients__mutmut_9": "hooks support judged on the whole model: where it differs, the Jacobian route gives the same rows",
    "influence_over_inference.engine.gradients.x_class_gradients__mutmut_77": "identity in float32 instead of the probabilities' dtype: 0 and 1 are exact and promoted, the same rows",
    "influence_over_inference.engine.gradients.x_class_gradients__mutmut_80": "identity in the default float32 instead of the probabilities' dtype: 0 and 1 are exact and promoted, the same rows",
    "influence_over_inference.engine.gradients.x_class_gradients__mutmut_93": "einsum subscripts in upper case: the same contraction",
    "influence_over_inference.engine.gradients.x_grad_z__mutmut_30": "method 'auto' no longer takes the hooks: the vmap route gives the same gradients (slower)",
    "influence_over_inference.engine.gradients.x_grad_z__mutmut_31": "method 'auto' no longer takes the hooks: the vmap route gives the same gradients (slower)",
    "influence_over_inference.engine.gradients.x_grad_z__mutmut_92": "'hooks' never reaches this check: it returned or raised above",
    "influence_over_inference.engine.gradients.x_grad_z__mutmut_93": "'hooks' never reaches this check: it returned or raised above",
    "influence_over_inference.engine.gradients.x_grad_z__mutmut_35": "hooks support judged on the whole model: where it differs, the vmap route gives the same gradients",
    "influence_over_inference.engine.gradients.x_grad_z__mutmut_42": "dtype and device read from the model's first parameter instead of the first chosen one: the same for a model in one dtype on one device",
    "influence_over_inference.engine.gradients.x_grad_z__mutmut_44": "dtype and device read from the model's first parameter instead of the first chosen one: the same for a model in one dtype on one device",
    "influence_over_inference.engine.gradients.x_grad_z__mutmut_63": "chunks start at every example instead of every chunk_size: each row is rewritten with the same values (slower)",
    "influence_over_inference.engine.curvature.x__products_loop__mutmut_55": "second backward of the Hessian: every parameter that reaches the loss reaches it again through the softmax, so no gradient is None and zip lengths match",
    "influence_over_inference.engine.curvature.x__products_loop__mutmut_59": "second backward of the Hessian: every parameter that reaches the loss reaches it again through the softmax, so no gradient is None and zip lengths match",
    "influence_over_inference.engine.curvature.x__products_loop__mutmut_62": "second backward of the Hessian: every parameter that reaches the loss reaches it again through the softmax, so no gradient is None and zip lengths match",
    "influence_over_inference.engine.curvature.x__products_loop__mutmut_68": "second backward of the Hessian: every parameter that reaches the loss reaches it again through the softmax, so no gradient is None and zip lengths match",
    "influence_over_inference.engine.curvature.x__products_loop__mutmut_70": "second backward of the Hessian: every parameter that reaches the loss reaches it again through the softmax, so no gradient is None and zip lengths match",
    "influence_over_inference.engine.curvature.x__products_loop__mutmut_75": "second backward of the Hessian: every parameter that reaches the loss reaches it again through the softmax, so no gradient is None and zip lengths match",
    "influence_over_inference.engine.curvature.x__products_loop__mutmut_78": "second backward of the Hessian: every parameter that reaches the loss reaches it again through the softmax, so no gradient is None and zip lengths match",
    "influence_over_inference.engine.curvature.x__products_loop__mutmut_79": "second backward of the Hessian: every parameter that reaches the loss reaches it again through the softmax, so no gradient is None and zip lengths match",
    "influence_over_inference.engine.curvature.x__products_loop__mutmut_134": "J^T pullback: every parameter passed the first backward (no allow_unused there), so none is None here and zip lengths match",
    "influence_over_inference.engine.curvature.x__products_loop__mutmut_139": "J^T pullback: every parameter passed the first backward (no allow_unused there), so none is None here and zip lengths match",
    "influence_over_inference.engine.curvature.x__products_loop__mutmut_141": "J^T pullback: every parameter passed the first backward (no allow_unused there), so none is None here and zip lengths match",
    "influence_over_inference.engine.curvature.x__products_loop__mutmut_147": "J^T pullback: every parameter passed the first backward (no allow_unused there), so none is None here and zip lengths match",
    "influence_over_inference.engine.curvature.x__products_loop__mutmut_149": "J^T pullback: every parameter passed the first backward (no allow_unused there), so none is None here and zip lengths match",
    "influence_over_inference.engine.curvature.x__products_loop__mutmut_154": "J^T pullback: every parameter passed the first backward (no allow_unused there), so none is None here and zip lengths match",
    "influence_over_inference.engine.curvature.x__products_loop__mutmut_157": "J^T pullback: every parameter passed the first backward (no allow_unused there), so none is None here and zip lengths match",
    "influence_over_inference.engine.curvature.x__products_loop__mutmut_158": "J^T pullback: every parameter passed the first backward (no allow_unused there), so none is None here and zip lengths match",
    "influence_over_inference.engine.influence_engine.xǁInfluenceEngineǁ__init____mutmut_17": "_key_parts '' instead of None without a cache: never read then (cache_path returns None first)",
    "influence_over_inference.engine.solvers.fast.xǁFastSolverǁ_factor_parts__mutmut_44": "the rows piece keyed by another name: the key only groups the pieces of one chunk",
    "influence_over_inference.engine.solvers.fast.xǁFastSolverǁ_factor_parts__mutmut_45": "the rows piece keyed by another name: the key only groups the pieces of one chunk",
    "influence_over_inference.engine.solvers.fast.xǁFastSolverǁ_factor_parts__mutmut_46": "the rows piece tagged by another kind: anything but 'outer' is read as rows",
    "influence_over_inference.engine.solvers.fast.xǁFastSolverǁ_factor_parts__mutmut_47": "the rows piece tagged by another kind: anything but 'outer' is read as rows",
    "influence_over_inference.engine.influence_engine.xǁInfluenceEngineǁscores__mutmut_2": "the engine's early label check without labels: s_test repeats the same check, with the same message, before any work",
    "influence_over_inference.engine.influence_engine.xǁInfluenceEngineǁscores__mutmut_3": "the engine's early label check without the class count: s_test repeats the same check, with the same message, before any work",
    "influence_over_inference.engine.influence_engine.xǁInfluenceEngineǁscores__mutmut_7": "the engine's early label check without the class count: s_test repeats the same check, with the same message, before any work",
    "influence_over_inference.engine.influence_engine.xǁInfluenceEngineǁscores__mutmut_9": "the engine's early label check without the class count: s_test repeats the same check, with the same message, before any work",
    "influence_over_inference.engine.influence_engine.xǁInfluenceEngineǁ__init____mutmut_46": "a tuple of layer names kept as a tuple in the key: JSON writes it as the same list",
    "influence_over_inference.engine.influence_engine.xǁInfluenceEngineǁ__init____mutmut_52": "_fitted starts as None instead of False: both falsy",
    "influence_over_inference.engine.solvers.lissa.xǁLiSSASolverǁinverse_hvp__mutmut_62": "norm >= limit instead of >: differs only when a norm equals the limit exactly",
    "influence_over_inference.engine.solvers.lissa.xǁLiSSASolverǁ_batch_product__mutmut_15": "curvature_products' default chunk instead of the whole minibatch: the same products",
    "influence_over_inference.engine.gradients.x_grad_dot__mutmut_23": "hooks support judged on the whole model: where it differs, the grad_z route gives the same products",
    "influence_over_inference.engine.gradients.x_grad_dot__mutmut_36": "grad_z's default chunk size in the fallback route: the same gradients",
    "influence_over_inference.engine.io.x__probe_folder__mutmut_17": "a 9-character random part in the probe's name instead of 8: still unique, removed at once",
    "influence_over_inference.engine.io.x__probe_folder__mutmut_19": "the probe file holds 4 bytes instead of none: written and removed at once",
    "influence_over_inference.engine.solvers.fast.x_top_eigh__mutmut_38": "start block drawn in float32, then cast to float64: another fixed, seeded start",
    "influence_over_inference.engine.solvers.lissa.xǁLiSSASolverǁlargest_eigenvalue__mutmut_24": "start vector scaled by its norm instead of divided: the first step's normalisation makes every later iterate the same",
}
# survivors that are not equivalent but change behaviour only under torch.distributed (world size > 1):
# tests/test_distributed.py runs that path with two gloo processes, too slow to repeat per mutant, so it
# is not in the mutation run's test selection; they count as survivors
DISTRIBUTED_ONLY = "changes only the torch.distributed path (world size > 1); not in the mutation run's tests"
DISTRIBUTED = ({f"influence_over_inference.engine.scores.x_self_influence__mutmut_{i}" for i in (8, 9, 12, 60, 61, 64, 65)}
               | {f"influence_over_inference.engine.scores.x_influence__mutmut_{i}" for i in (52, 53, 56, 96, 97, 100, 101)}
               | {f"influence_over_inference.engine.solvers.exact.xǁExactSolverǁ_fit__mutmut_{i}" for i in (34, 35, 38)}
               | {f"influence_over_inference.engine.solvers.fast.xǁFastSolverǁ_fit_one__mutmut_{i}"
                  for i in (7, 11, 12, 14, 15, 18, 19, 21, 22, 69)}
               | {f"influence_over_inference.engine.influence_engine.xǁInfluenceEngineǁ_load__mutmut_{i}"
                  for i in (1, 4, 9, 10, 11, 12, 13, 14, 15, 16, 17)}
               | {f"influence_over_inference.engine.influence_engine.xǁInfluenceEngineǁfit__mutmut_{i}" for i in (3, 5, 8)})
# survivors that change only where the model lives on a GPU (a device argument dropped); they count as
# survivors
DEVICE_ONLY = "changes only where the model is on a GPU: a CPU-only run cannot see it (cuda-marked tests are skipped here)"
DEVICE = ({f"influence_over_inference.engine.scores.x_s_test__mutmut_{i}" for i in (34, 36, 38)}
          | {f"influence_over_inference.engine.solvers.base.xǁInverseHVPǁ_train_tensors__mutmut_{i}" for i in (6, 8, 10)}
          | {f"influence_over_inference.engine.solvers.base.xǁInverseHVPǁ_check_vectors__mutmut_{i}" for i in (20, 22)}
          | {f"influence_over_inference.engine.solvers.exact.xǁExactSolverǁload_state_dict__mutmut_{i}" for i in (2, 4)}
          | {f"influence_over_inference.engine.solvers.exact.xǁExactSolverǁ_fit__mutmut_{i}" for i in (27, 31)}
          | {f"influence_over_inference.engine.solvers.fast.xǁFastSolverǁload_state_dict__mutmut_{i}" for i in (2, 4, 9, 11)}
          | {f"influence_over_inference.engine.solvers.fast.xǁFastSolverǁ_fit_one__mutmut_{i}" for i in (40, 44, 57, 65, 107)}
          | {f"influence_over_inference.engine.solvers.fast.x__basis__mutmut_{i}" for i in (12, 14)}
          | {"influence_over_inference.engine.solvers.fast.x_top_eigh__mutmut_30"}
          | {f"influence_over_inference.engine.influence_engine.xǁInfluenceEngineǁ_read__mutmut_{i}" for i in (11, 14)}
          | {f"influence_over_inference.engine.curvature.x_curvature_matrix__mutmut_{i}" for i in (37, 42, 45)}
          | {f"influence_over_inference.engine.gradients.x_class_gradients__mutmut_{i}" for i in (39, 44, 78, 81)}
          | {f"influence_over_inference.engine.gradients.x_grad_z__mutmut_{i}" for i in (49, 53)}
          | {f"influence_over_inference.engine.solvers.lissa.xǁLiSSASolverǁinverse_hvp__mutmut_{i}" for i in (31, 33, 35)}
          | {f"influence_over_inference.engine.solvers.lissa.xǁLiSSASolverǁlargest_eigenvalue__mutmut_{i}" for i in (4, 6, 8, 12, 14)})
KILLED, SURVIVED, TIMEOUT = {1, 3}, {0}, {-24, 24, 36}  # mutmut 3 exit codes (36/-24: timeout)
NO_TESTS = 33  # no selected test calls the mutated function: counted as survived


def source_sha256(module: str, root: Path = Path(".")) -> str | None:
    """Hash of a mutated module's source as it is now (None when the file is gone)."""
    path = root / module
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _verdicts(row: dict) -> int:
    """Mutants of a module with a verdict: killed, timed out, survived or shown equivalent."""
    return row["killed"] + row["timed_out"] + row["survived"] + row["equivalent"]


def summarise(mutants: Path, minutes: float | None, previous: dict | None = None, root: Path = Path(".")) -> dict:
    """Verdicts per module from ``mutants/``; rows of ``previous`` (an earlier summary) fill the modules this
    run has no verdict for, when their ``source_sha256`` still matches the file under ``root``."""
    modules, totals, not_run = {}, {"engine": [0, 0], "checkpoints": [0, 0]}, 0
    now = []  # modules with verdicts from this run
    kept = {m: r for m, r in ((previous or {}).get("modules") or {}).items()
            if r.get("source_sha256") and r["source_sha256"] == source_sha256(m, root)}
    metas = {str(meta.relative_to(mutants))[: -len(".meta")]: meta for meta in sorted(mutants.rglob("*.py.meta"))}
    for module in sorted(set(metas) | set(kept)):
        codes = json.loads(metas[module].read_text()).get("exit_code_by_key", {}) if module in metas else {}
        row = {"killed": 0, "survived": 0, "equivalent": 0, "timed_out": 0, "not_run": 0, "other": 0, "survivors": []}
        for name, code in sorted(codes.items()):
            if code is None:
                row["not_run"] += 1
            elif code in KILLED:
                row["killed"] += 1
            elif code in TIMEOUT:
                row["timed_out"] += 1
            elif code in SURVIVED or code == NO_TESTS:
                reason = EQUIVALENT.get(name)
                row["equivalent" if reason else "survived"] += 1
                why = reason or ("no selected test calls the mutated function" if code == NO_TESTS else
                                 DISTRIBUTED_ONLY if name in DISTRIBUTED else DEVICE_ONLY if name in DEVICE else "")
                row["survivors"].append({"mutant": name, "equivalent": bool(reason), "reason": why})
            else:
                row["other"] += 1
        if _verdicts(row) == 0 and module in kept:  # not run now: the earlier verdicts on the same source stand
            row = kept[module]
        else:
            not_run += row["not_run"]
            if _verdicts(row) == 0:
                continue  # no mutant of this module run yet
            now.append(module)
            row["source_sha256"] = source_sha256(module, root)
        modules[module] = row
        group = "checkpoints" if module.endswith("study/checkpoints.py") else "engine"
        totals[group][0] += row["killed"] + row["timed_out"]
        totals[group][1] += row["survived"]

    def score(group):
        killed, survived = totals[group]
        return round(killed / (killed + survived), 3) if killed + survived else None

    n_run = sum(_verdicts(r) for r in modules.values())
    # the mutmut runs behind these verdicts, earlier ones included (a rerun of survivors adds to a module's run)
    runs = [r for r in (previous or {}).get("runs", []) if set(r["modules"]) & set(modules)]
    if now:
        runs.append({"minutes": minutes, "n_mutants": sum(_verdicts(modules[m]) for m in now), "modules": now})
    total = sum(r["minutes"] or 0 for r in runs) or None
    return {
        "tool": "mutmut 3.8.1 (bash run.sh mutate; config in pyproject.toml [tool.mutmut])",
        "score_engine": score("engine"), "score_checkpoints": score("checkpoints"),
        "n_mutants": n_run,
        "n_not_run": not_run,  # mutants generated but not run yet (resume: bash run.sh mutate)
        "minutes": round(total, 1) if total else None,  # wall-clock minutes of the runs behind these verdicts
        "seconds_per_mutant": round(60 * total / n_run, 1) if total and n_run else None,
        "runs": runs,
        "modules": modules,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mutants", default="mutants")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock minutes of the mutmut run")
    p.add_argument("--out", default="results/mutation.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() else None
    result = summarise(Path(args.mutants), args.minutes, previous)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"score_engine={result['score_engine']} score_checkpoints={result['score_checkpoints']} "
          f"n_mutants={result['n_mutants']} not_run={result['n_not_run']} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
