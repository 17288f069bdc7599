"""The notebook's trust section: LDS and seed stability read from their result files, or "not computed yet"."""

import json

from matplotlib.figure import Figure

from influence_over_inference.report import trust

LDS = {"n_subsets": 50, "n_test": 500, "alpha": 0.5, "default_solver": "fast",
       "methods": {"fast": {"n_models": 1, "lds_margin": 0.12, "lds_margin_ci": [0.1, 0.14], "lds_loss": 0.1},
                   "grad_dot": {"n_models": 1, "lds_margin": 0.03, "lds_margin_ci": [0.01, 0.05]},
                   "random": {"n_models": 1, "lds_margin": 0.0, "lds_margin_ci": [-0.01, 0.01]},
                   "trak_10": {"n_models": 10, "lds_margin": 0.3, "lds_margin_ci": [0.27, 0.33]}}}


def test_missing_files_say_not_computed_and_name_the_command(tmp_path):
    lds, engine = trust.load_lds(tmp_path / "lds.json"), trust.load_stability(tmp_path / "engine.json")
    assert not lds and not engine
    text = " ".join(trust.trust_sentences(lds, engine))
    assert "validate lds" in text and "not computed yet" in text
    figs = trust.trust_figures(lds, engine)
    assert len(figs) == 2 and all(isinstance(f, Figure) and f.axes for f in figs)  # inline backends skip axes-less figures


def test_an_engine_file_without_the_stability_keys_is_not_computed(tmp_path):
    (tmp_path / "engine.json").write_text(json.dumps({"t100_fast_s": 82}))
    assert not trust.load_stability(tmp_path / "engine.json")


def test_results_become_figures_and_plain_words(tmp_path):
    (tmp_path / "lds.json").write_text(json.dumps(LDS))
    (tmp_path / "engine.json").write_text(json.dumps({"seed_spearman_default": 0.84, "seed_top10_overlap_default": 8.2,
                                                      "pearson_default_vs_exact_small": 0.97}))
    lds, engine = trust.load_lds(tmp_path / "lds.json"), trust.load_stability(tmp_path / "engine.json")
    assert [r[0] for r in trust.lds_rows(lds)] == ["trak_10", "fast", "grad_dot", "random"]
    assert trust.top10_share(engine) == 0.82
    words = trust.trust_sentences(lds, engine)
    assert "Spearman 0.84" in words[0] and "8.2 of their top 10" in words[0] and "not as an exact order" in words[0]
    assert "LDS of 0.12 (95% interval 0.10 to 0.14)" in words[1] and "grad_dot 0.03" in words[1]
    assert "averaged over 10 trained models, trak_10 reaches 0.30" in words[1] and "best method" not in words[1]
    assert "weak signal" in words[2]
    lds_fig, stab_fig = trust.trust_figures(lds, engine)
    assert len(lds_fig.axes[0].patches) == 4 and len(stab_fig.axes[0].patches) == 3


def test_the_best_method_named_is_one_like_the_default_same_checkpoint_test_images_and_no_more_models():
    methods = {**LDS["methods"], "cg": {"n_models": 1, "n_test": 50, "lds_margin": 0.5},  # a subset-only method
               "old": {"n_models": 1, "lds_margin": 0.4}, "kfac": {"n_models": 1, "lds_margin": 0.13}}
    lds = {**LDS, "methods": methods, "methods_from_other_checkpoints": ["old"]}
    line = trust.trust_sentences(lds, trust.load_stability("/nonexistent/engine.json"))[1]
    assert "is kfac (0.13)" in line and "cg" not in line and "old (" not in line


def test_methods_scored_on_an_earlier_checkpoint_are_marked_in_the_figure_and_the_words():
    lds = {**LDS, "methods_from_other_checkpoints": ["trak_10", "gone"]}  # a name without a row is not mentioned
    words = trust.trust_sentences(lds, trust.load_stability("/nonexistent/engine.json"))
    marked = [w for w in words if "earlier training of the same recipe" in w]
    assert len(marked) == 1 and marked[0].endswith("the rest: trak_10.") and "gone" not in marked[0]
    labels = [t.get_text() for t in trust.plot_lds(lds).axes[0].get_yticklabels()]
    assert labels[0] == "trak_10 (10 models) [earlier checkpoint]" and "fast [default]" in labels
    assert not any("earlier" in w for w in trust.trust_sentences(LDS, trust.load_stability("/nonexistent/engine.json")))


def test_paired_differences_and_another_checkpoint_are_put_in_words(tmp_path):
    lds = {**LDS, "checkpoint_sha256": "aaaa1111bbbb2222",
           "methods": {**LDS["methods"], "fast_ens10": {"n_models": 10, "lds_margin": 0.35, "lds_margin_ci": [0.3, 0.4]}},
           "paired": {"fast": {"grad_dot": {"difference": 0.09, "ci": [0.07, 0.11], "n_test": 500, "on": "all"}},
                      "fast_ens10": {"trak_10": {"difference": -0.05, "ci": [-0.08, -0.02], "n_test": 500, "on": "all"}}},
           "methods_from_other_checkpoints": ["fast_ens10", "trak_10"]}
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights")
    engine = trust.load_stability(tmp_path / "engine.json")  # not computed: one sentence saying so
    words = trust.trust_sentences(lds, engine, checkpoint=model)
    assert "against gradient dot product it is ahead by +0.090 (paired over the same 500 test images, 95% interval +0.070 to +0.110)" in words[1]
    ens = [w for w in words if w.startswith("Averaged over the same 10")]
    assert ens == ["Averaged over the same 10 trained models, fast_ens10 reaches 0.35 and TRAK 0.30: ours is behind by -0.050 "
                   "(paired over the same 500 test images, 95% interval -0.080 to -0.020) (both scored on an earlier training of the recipe)."]
    assert any("another training of the same recipe (checkpoint aaaa1111bbbb2222)" in w for w in words)
    from influence_over_inference.engine.hashing import file_sha256

    same = {**lds, "checkpoint_sha256": file_sha256(model)[:16]}
    assert not any("another training" in w for w in trust.trust_sentences(same, engine, checkpoint=model))
    assert not any("another training" in w for w in trust.trust_sentences(lds, engine))  # no model named: nothing to compare


def test_the_noise_ceiling_is_drawn_and_put_in_words():
    """validate lds --noise-ceiling: a dashed line at the ceiling, and how much of it the default and our best
    ensemble reach; without it, neither."""
    lds = {**LDS, "methods": {**LDS["methods"], "fast_ens10": {"n_models": 10, "lds_margin": 0.2}},
           "noise_ceiling": {"retest": 0.16, "ceiling_one": 0.4, "ceiling_mean2": 0.52}}
    assert trust.noise_ceiling(lds) == (0.16, 0.4, 0.52) and trust.noise_ceiling(LDS) is None
    words = trust.trust_sentences(lds, trust.load_stability("/nonexistent/engine.json"))
    line = next(w for w in words if "noise ceiling" in w)
    assert "Spearman 0.16" in line and "exceed about 0.40" in line
    assert "the default reaches 30% of it, fast_ens10 (10 models) 50%." in line
    ax = trust.plot_lds(lds).axes[0]
    assert [round(x, 6) for line_ in ax.get_lines() for x in line_.get_xdata()][-2:] == [0.4, 0.4]
    assert not any("noise ceiling" in w for w in trust.trust_sentences(LDS, trust.load_stability("/x/engine.json")))
    assert trust.plot_lds(LDS).axes[0].get_legend() is None
