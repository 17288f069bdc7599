"""The evidence slides: leave-one-out, flipped labels, the sign, the LDS, the engine benchmark, applications, references.

Each function takes the loaded :class:`~.slide_inputs.Inputs` and the
:class:`~.slide_inputs.SlidesConfig` and returns ``(title, page)``. Numbers come from the result
files only.
"""

from __future__ import annotations

from . import plots, trust
from .deck import BODY_PT, SMALL_PT, _bullets, _new_page, _not_computed
from .evidence import _n_of, flip_curves, loo_pairs, network_prefix
from .slide_inputs import COMMANDS, Missing
from .slide_text import NOT_COMPUTED, _corr, _count, _fmt, _footer, _get, _pct, _source


def loo_slide(inputs, config):
    title = "Does influence predict retraining?"
    val = inputs.validation
    fig, body = _new_page(title, _footer("results/validation.json", _source(val)))
    if isinstance(val, Missing):
        _not_computed(body, val)
        return title, fig
    plots_area, text = body.subfigures(1, 2, width_ratios=[2.2, 1])
    axes = plots_area.subplots(1, 2)
    for ax, kind, name in ((axes[0], "convex", "last layer"), (axes[1], "network", "whole network (CG)")):
        pairs = loo_pairs(val, kind)
        if pairs:
            label, p, a = pairs[0]
            plots.plot_loo_scatter(p, a, ax=ax, title=f"{name}\n{label}", separator="\n")
        else:
            ax.set_axis_off()
            ax.text(0.5, 0.5, f"{name}:\n{NOT_COMPUTED}\nrun: python -m\ninfluence_over_inference\n"
                    f"{COMMANDS['validation'].split()[-2]} {COMMANDS['validation'].split()[-1]}",
                    ha="center", va="center", fontsize=SMALL_PT, color="0.25",
                    bbox={"boxstyle": "round,pad=0.6", "facecolor": "0.93", "edgecolor": "0.6"})
    convex = val.get("loo_convex_pearson")
    prefix = network_prefix(val)
    network = val.get(f"{prefix}_pearson")
    retrain = ((val.get("settings") or {}).get(prefix) or {}).get("retrain") or {}
    items = ["Remove one training image, retrain, compare the change in test loss with the prediction."]
    items.append(f"Last layer as logistic regression, exact Hessian, {_count(_n_of(val, 'loo_convex'))} "
                 f"images \u2014 Pearson per test image: {_corr(convex) if convex else NOT_COMPUTED}.")
    n_net = _n_of(val, prefix)
    how = ", ".join(p for p in (f"lr {retrain['lr']}" if "lr" in retrain else "",
                                f"{retrain['steps']} steps" if "steps" in retrain else "") if p)
    items.append(f"Whole network{f', {n_net:,}-image subset' if n_net else ''}, retrained"
                 f"{f' ({how})' if how else ''} minus a control run \u2014 Pearson: "
                 f"{_corr(network) if network else NOT_COMPUTED}.")
    items.append("Koh & Liang report 0.86 for their CNN.")
    _bullets(text, items, fontsize=SMALL_PT + 1, top=0.97, gap=0.45)
    return title, fig


def flipped_slide(inputs, config):
    title = "Finding flipped labels"
    val = inputs.validation
    fig, body = _new_page(title, _footer("results/validation.json", _source(val)))
    if isinstance(val, Missing):
        _not_computed(body, val)
        return title, fig
    left, right = body.subfigures(1, 2, width_ratios=[1, 1.2])
    cmd = COMMANDS["validation"].rsplit(" ", 1)[0]  # "... validate"
    curves = flip_curves(val)
    if curves:
        plots.plot_fraction_found(curves, ax=left.subplots(), title="10% of labels flipped")
    else:
        _not_computed(left, f"fraction-found curves \u2014 run: {cmd} flipped")
    n_flip = _n_of(val, "flipped")
    if val.get("flipped_found_at_20") is None:
        items = [f"Flipped labels: {NOT_COMPUTED} \u2014 run: {cmd} flipped"]
    else:
        items = [
            f"Flipped labels ({_count(n_flip)} training images): self-influence finds "
            f"{_pct(val.get('flipped_found_at_10'))} after checking 10% of the data, "
            f"{_pct(val.get('flipped_found_at_20'))} after 20% (training loss: "
            f"{_pct(val.get('loss_found_at_20'))}); ROC-AUC {_fmt(val.get('flipped_auc'))}"
            + (f" (loss: {_fmt(val['loss_auc'])})." if val.get("loss_auc") is not None else "."),
        ]
        if val.get("last_layer_found_at_20") is not None:
            items.append(f"Self-influence of the last layer alone: {_pct(val['last_layer_found_at_20'])} "
                         f"after 20%; ROC-AUC {_fmt(val.get('last_layer_auc'))}.")
        if val.get("memorising_flipped_found_at_20") is not None:
            details = val.get("memorising_flipped_details") or {}
            train_acc = details.get("train_accuracy")
            items.append(
                f"A model that memorises them ({_count(_n_of(val, 'flipped_memorising'))} images"
                + (f", {_pct(train_acc)} training accuracy" if train_acc is not None else "")
                + f"): after 20%, self-influence {_pct(val['memorising_flipped_found_at_20'])}, last "
                f"layer {_pct(val.get('memorising_last_layer_found_at_20'))}, training loss "
                f"{_pct(val.get('memorising_loss_found_at_20'))}.")
    _bullets(right, items, fontsize=SMALL_PT + 1, top=0.97, gap=0.45)
    return title, fig


def sign_slide(inputs, config):
    title = "The sign, checked by retraining"
    val = inputs.validation
    fig, body = _new_page(title, _footer("results/validation.json", _source(val)))
    cmd = COMMANDS["validation"].rsplit(" ", 1)[0] + " sign"
    if isinstance(val, Missing):
        _not_computed(body, val)
        return title, fig
    if val.get("sign_harmful_removed_delta") is None:
        _not_computed(body, f"the sign by retraining \u2014 run: {cmd}")
        return title, fig
    left, right = body.subfigures(1, 2, width_ratios=[1.2, 1])
    harm, helps = val.get("sign_harmful_removed_deltas"), val.get("sign_helpful_removed_deltas")
    if harm and helps and len(harm) == len(helps):
        tests = val.get("sign_test_indices")
        labels = [f"#{t}" for t in tests] if tests and len(tests) == len(harm) else None
        ax = left.subplots()
        plots.plot_sign_deltas(harm, helps, labels=labels, ax=ax)
        if labels and len(labels) > 5:
            ax.tick_params(axis="x", labelrotation=90)
    else:
        _not_computed(left, f"per-image changes \u2014 run: {cmd}")
    sign = (val.get("settings") or {}).get("sign") or {}
    n_remove, n_test = sign.get("n_remove"), val.get("sign_n_test")
    n_model = _n_of(val, "sign")
    items = [
        f"For {_fmt(n_test, '.0f') if n_test is not None else 'each of the'} misclassified test "
        f"images, remove the {(_fmt(n_remove, '.0f') + ' ') if n_remove is not None else ''}training "
        "images ranked most harmful (or most helpful) and retrain"
        + (f" (a {n_model:,}-image model)" if n_model else "") + ".",
        f"Most harmful removed: mean change {_fmt(val.get('sign_harmful_removed_delta'), '+.3f')} "
        "(should fall)" + (f"; fell for {val['sign_harmful_removed_fell']} of {n_test}"
                           if val.get("sign_harmful_removed_fell") is not None and n_test else "") + ".",
        f"Most helpful removed: mean change {_fmt(val.get('sign_helpful_removed_delta'), '+.3f')} "
        "(should rise)" + (f"; rose for {val['sign_helpful_removed_rose']} of {n_test}"
                           if val.get("sign_helpful_removed_rose") is not None and n_test else "") + ".",
    ]
    if val.get("sign_flipped_to_correct") is not None:
        items.append(f"Classified correctly after removing the most harmful: "
                     f"{_fmt(val['sign_flipped_to_correct'], '.0f')}" + (f" of {n_test}" if n_test else "") + ".")
    _bullets(right, items, fontsize=SMALL_PT + 2, top=0.95, gap=0.5)
    return title, fig


# Engine, applications, references


def engine_slide(inputs, config):
    title = "Our engine against nimarb and kronfluence"
    eng = inputs.engine
    quick = bool(_get(eng, "quick"))
    fig, body = _new_page(title, _footer("bench/results/engine.json", _source(eng),
                                         "QUICK SMOKE RUN, not the real benchmark" if quick else None))
    n_test, n_train = _get(eng, "n_test"), _get(eng, "n_train")
    task = (f"{n_test} test \u00d7 {n_train:,} training images" if n_test and n_train
            else "100 test images \u00d7 all training images")
    if isinstance(eng, Missing):
        top, bottom = body.subfigures(2, 1, height_ratios=[1, 1.1])
        _not_computed(top, eng)
    else:
        top, bottom = body.subfigures(2, 1, height_ratios=[1.1, 1])
        left, right = top.subfigures(1, 2, width_ratios=[1.1, 1])
        old = _get(eng, "superseded_under_load") or {}
        old = old.get("keys", {}) if isinstance(old, dict) else {}
        plots.plot_timings({"nimarb*": old.get("nimarb_t100_s", eng.get("nimarb_t100_s")),
                            "kronfluence EK-FAC": eng.get("kronfluence_t100_s"),
                            "ours, CG*": old.get("t100_cg_s", eng.get("t100_cg_s")),
                            "ours, fast": eng.get("t100_default_s", eng.get("t100_fast_s"))},
                           ax=left.subplots(), title=task)
        plots.plot_agreement({"nimarb, sign fixed": eng.get("spearman_nimarb_vs_cg"),
                              "kronfluence": eng.get("spearman_kronfluence_vs_cg"),
                              "ours, LiSSA": eng.get("spearman_lissa_vs_cg"),
                              "ours, fast": eng.get("spearman_fast_vs_cg")},
                             ax=right.subplots(), title="agreement with CG (Spearman)")
    items = [
        "Idle machine, 1 thread, default solvers; * extrapolated, timed under load with the old fast default.",
        "nimarb's s_test as published returns one step of the recursion whatever the depth, never "
        "divided by scale; its \u201charmful\u201d list is what Koh & Liang call helpful.",
    ]
    ours = []
    t_fast, t_kron = _get(eng, "t100_default_s"), _get(eng, "kronfluence_t100_s")
    if t_fast is not None and t_kron is not None:
        ours.append(f"{_fmt(t_fast, ',.0f')} s, {_fmt(t_kron / t_fast, ',.2f')}\u00d7 faster than kronfluence (idle, 1 thread)")
    if _get(eng, "t100_default_epochs") is not None:
        ours.append(f"{_fmt(eng['t100_default_epochs'], '.1f')} training-epoch times")
    if _get(eng, "peak_rss_mb") is not None:
        ours.append(f"peak memory {_fmt(eng['peak_rss_mb'], ',.0f')} MB")
    if _get(eng, "seed_spearman_default") is not None:
        ours.append(f"two curvature seeds agree at Spearman {_fmt(eng['seed_spearman_default'], '.3f')}")
    if ours:
        items.append(f"Fast solver, {task}: " + "; ".join(ours) + ".")
    if _get(eng, "speedup_1test_same_settings") is not None:
        items.append(f"Under load, old default: one test image, the same LiSSA settings: nimarb {_fmt(eng.get('nimarb_s_per_test'), ',.0f')} s, "
                     f"ours {_fmt(eng.get('ours_s_per_test'), ',.1f')} s "
                     f"({_fmt(eng['speedup_1test_same_settings'], ',.1f')}\u00d7, vectorised gradients alone).")
    small_acc = _get(eng, "small_test_accuracy")
    if _get(eng, "pearson_default_vs_exact_small") is not None:
        items.append(f"Against exact influence on a small LeNet: Pearson "
                     f"{plots.format_correlation(eng['pearson_default_vs_exact_small'])} (default solver, its damping).")
    elif _get(eng, "pearson_fast_vs_exact_small") is not None and (small_acc is None or small_acc > 0.2):
        # only for a trained small net: near initialisation any method agrees with exact influence
        items.append(f"Against exact influence on a small LeNet ({_fmt(_get(eng, 'small_params'), ',.0f')} "
                     f"parameters): Pearson fast {plots.format_correlation(eng['pearson_fast_vs_exact_small'])}, "
                     f"kronfluence {_fmt(_get(eng, 'pearson_kronfluence_vs_exact_small'))}.")
    _bullets(bottom, items, fontsize=SMALL_PT + 1, top=0.97, gap=0.35)
    return title, fig


def applications_slide(inputs, config):
    title = "Applications and future work"
    fig, body = _new_page(title)
    left, right = body.subfigures(1, 2)
    found = _get(inputs.validation, "flipped_found_at_20", None)
    loss = _get(inputs.validation, "loss_found_at_20", None)
    left.text(0.07, 0.97, "Applications", fontsize=24, fontweight="bold", va="top")
    _bullets(left, [
        "Checking labels: review the training images with the highest self-influence first"
        + (f" ({_pct(found)} of flipped labels in the top 20%" if found is not None else "")
        + (f"; ranking by training loss: {_pct(loss)})." if found is not None and loss is not None
           else ")." if found is not None else "."),
        "Debugging: the most harmful training images of a wrong prediction show what misled it.",
        "Trust: a prediction backed by similar, correctly labelled images is easier to believe.",
    ], fontsize=BODY_PT - 2, top=0.84, left=0.07, gap=0.45)
    right.text(0.07, 0.97, "Future work", fontsize=24, fontweight="bold", va="top")
    _bullets(right, [
        "Perturbation stress tests: are the rankings stable under small changes of the test image "
        "or of the training run (seed, data order)?",
        "Closer to retraining: ensembles of trained models lift the LDS.",
        "Stable and exact at once: merged spans get both at 4x the fits; make them cheap.",
        "Larger models (ResNets), other solvers (Arnoldi); the GPU and many machines for the whole test set.",
    ], fontsize=BODY_PT - 2, top=0.84, left=0.07, gap=0.45)
    return title, fig


def references_slide(inputs, config):
    title = "References"
    fig, body = _new_page(title)
    _bullets(body, [
        "Koh, P. W. & Liang, P. (2017). Understanding black-box predictions via influence "
        "functions. ICML.",
        "Agarwal, N., Bullins, B. & Hazan, E. (2017). Second-order stochastic optimization for "
        "machine learning in linear time (LiSSA). JMLR.",
        "George, T. et al. (2018). Fast approximate natural gradient descent in a Kronecker-factored "
        "eigenbasis (EK-FAC). NeurIPS.  Grosse, R. et al. (2023). Studying large language model "
        "generalization with influence functions. arXiv:2308.03296.",
        "Schioppa, A. et al. (2022). Scaling up influence functions (Arnoldi). AAAI.",
        "Basu, S., Pope, P. & Feizi, S. (2021). Influence functions in deep learning are fragile. ICLR.",
        "Krizhevsky, A. (2009). Learning multiple layers of features from tiny images (CIFAR-10).",
        "Software: nimarb/pytorch-influence-functions 0.1.1, kronfluence 1.0.1, captum 0.9, PyTorch.",
    ], fontsize=SMALL_PT + 2, top=0.97, gap=0.45)
    return title, fig


SLIDE_LDS_METHODS = ("fast", "kronfluence_ekfac", "trak_1", "grad_dot", "random", "fast_ens10", "trak_10")  # the bars shown


def lds_slide(inputs, config):
    """The LDS of the default and its main rivals (bars with 95% intervals) and the paired differences in words."""
    title = "Retraining on random halves: the LDS"
    lds = inputs.lds
    fig, body = _new_page(title, _footer("results/lds.json", _source(lds)))
    if lds is None or isinstance(lds, Missing):
        _not_computed(body, lds if isinstance(lds, Missing) else trust.LDS_COMMAND)
        return title, fig
    rows = {name: (v, ci, n) for name, v, ci, n in trust.lds_rows(lds)}
    default = lds.get("default_solver", "fast")
    shown = [k for k in SLIDE_LDS_METHODS if k in rows] or list(rows)[:7]
    left, right = body.subfigures(1, 2, width_ratios=[1, 1.1])
    ax = left.subplots()
    ceiling = trust.noise_ceiling(lds)
    trust.draw_lds_bars(ax, [(k, *rows[k]) for k in shown], default,
                        [k + (f" ({rows[k][2]})" if (rows[k][2] or 1) > 1 else "") for k in shown], fontsize=SMALL_PT,
                        ceiling=ceiling and ceiling[1])
    ax.set_xlabel("LDS (95% interval)", fontsize=SMALL_PT)
    paired = lds.get("paired") or {}
    items = [f"{lds.get('n_subsets', '?')} retrained halves, {lds.get('n_test', '?')} test images: does the sum of a "
             "half's scores rank its model's margin?"]
    for rival, label in (("grad_dot", "gradient dot product"), ("kronfluence_ekfac", "kronfluence")):
        c = paired.get(default, {}).get(rival)
        if c:
            items.append(f"Ours minus {label}: {c['difference']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}], paired.")
    for ours, rivals in paired.items():
        for rival, c in rivals.items():
            if ours != default and rival.startswith("trak_") and ours in shown:
                other = " (another training)" if ours in (lds.get("methods_from_other_checkpoints") or ()) else ""
                items.append(f"{rows[ours][2]} models{other}, ours minus TRAK: {c['difference']:+.3f} "
                             f"[{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}].")
    if ceiling is not None and default in rows:
        items.append(f"Noise ceiling: a half trained twice agrees with itself at Spearman {ceiling[0]:.2f}, so no method "
                     f"can pass ~{ceiling[1]:.2f} (dashed); ours reaches {rows[default][0] / ceiling[1]:.0%} of it.")
    if default in rows and rows[default][0] < 0.2:
        items.append("A real but weak signal: find images to inspect, not a removal's exact effect.")
    _bullets(right, items, fontsize=SMALL_PT, top=0.97, gap=0.35)
    return title, fig
