"""The idle-machine benchmark (bench/hygiene.py, bench/trust.py): waiting for idle, medians, the merge, a smoke run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import hygiene  # noqa: E402

TRUST_KEYS = ("seed_spearman_default", "seed_top10_overlap_default", "pearson_default_vs_exact_small", "t100_default_s",
              "epoch_s", "t100_default_epochs", "kronfluence_t100_s", "peak_rss_mb", "load_avg_at_start")


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, s):
        self.now += s


def test_waits_until_the_load_falls_below_the_threshold():
    loads, clock = iter([3.0, 2.0, 0.3]), _Clock()
    out = hygiene.wait_until_idle(hygiene.IdleWait(threshold=0.5, timeout_s=100, poll_s=10), lambda: next(loads),
                                  clock.sleep, clock)
    assert out["idle"] and out["load_avg_at_start"] == 0.3 and out["load_avg_first"] == 3.0
    assert out["waited_s"] == 20 and "note" not in out


def test_gives_up_after_the_timeout_and_says_so():
    clock = _Clock()
    out = hygiene.wait_until_idle(hygiene.IdleWait(threshold=0.5, timeout_s=30, poll_s=10), lambda: 4.0,
                                  clock.sleep, clock)
    assert not out["idle"] and out["waited_s"] == 30 and "under load" in out["note"]


def test_summary_is_median_min_max():
    s = hygiene.summarize([3.0, 1.0, 10.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (3.0, 1.0, 10.0, 3)
    with pytest.raises(ValueError):
        hygiene.summarize([])


def test_timings_taken_under_load_are_superseded_and_the_rest_kept(tmp_path):
    import trust

    path = tmp_path / "engine.json"
    path.write_text(json.dumps({"epoch_s": 33.6, "t100_fast_s": 81.8, "spearman_fast_vs_cg": 0.65,
                                "load_avg_by_stage": {"epoch": [5.6, 6.4, 6.6]}}))
    merged = trust.merge_into(path, {"epoch_s": 8.0, "t100_default_s": 40.0}, threshold=0.5)
    assert merged["epoch_s"] == 8.0 and merged["spearman_fast_vs_cg"] == 0.65 and "t100_fast_s" not in merged
    assert merged["superseded_under_load"]["keys"] == {"epoch_s": 33.6, "t100_fast_s": 81.8}
    path.write_text(json.dumps({**merged, "trust_run": {}}))
    again = trust.merge_into(path, {"epoch_s": 7.5}, threshold=0.5)  # a second trust run replaces the first's keys
    assert again["epoch_s"] == 7.5 and again["superseded_under_load"] == merged["superseded_under_load"]


def test_the_plan_alternates_epoch_and_scoring_at_each_thread_count():
    import trust

    cfg = trust.TrustConfig(repeats=3, threads=(1, 2), kronfluence_repeats=1, kronfluence_threads=(1,))
    jobs = trust.plan(cfg)
    assert [j[0] for j in jobs[:4]] == ["stability", "small", "epoch", "t100"]
    assert sum(j[0] == "epoch" for j in jobs) == 6 and [j for j in jobs if j[0] == "kronfluence"] == [("kronfluence", 1, 0)]
    with pytest.raises(ValueError):
        trust.TrustConfig(stability_n_test=5)


@pytest.mark.slow
def test_smoke_run_writes_every_key_with_the_solvers_own_defaults(tmp_path):
    """The whole script on synthetic data, five child processes (~20 s of CPU; 100 s on the loaded machine)."""
    from influence_over_inference.engine.solvers.fast import FastSolver

    out = tmp_path / "engine.json"
    out.write_text(json.dumps({"spearman_fast_vs_cg": 0.65}))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "trust.py"), "--smoke", "--cache-dir", str(tmp_path / "c"),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert all(isinstance(res[k], float) for k in TRUST_KEYS), {k: res.get(k) for k in TRUST_KEYS}
    assert res["spearman_fast_vs_cg"] == 0.65  # the other keys stay
    assert res["trust_run"]["default_settings"] == FastSolver().describe()  # the solver's own defaults, as it names them
    assert len(res["seed_stability"]["seed_spearman_per_test"]) >= 10
    assert "[5/5] kronfluence" in proc.stdout and "estimate" in proc.stdout
