"""tools/mutation.py: mutmut's verdicts summarised per module, and earlier rows kept only while the module's
source is unchanged (so a partial or fresh-clone run never drops, or wrongly keeps, measured verdicts)."""

from __future__ import annotations

import json

from tools.mutation import source_sha256, summarise

KILLED, SURVIVED, TIMEOUT, NOT_RUN = 1, 0, 36, None


def _mutants(tmp_path, module: str, codes: dict) -> None:
    meta = tmp_path / "mutants" / f"{module}.meta"
    meta.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps({"exit_code_by_key": codes}))


def _source(tmp_path, module: str, text: str) -> None:
    path = tmp_path / module
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_counts_and_scores_per_group(tmp_path):
    _source(tmp_path, "pkg/engine/a.py", "x = 1\n")
    _source(tmp_path, "pkg/study/checkpoints.py", "y = 2\n")
    _mutants(tmp_path, "pkg/engine/a.py", {"a_1": KILLED, "a_2": KILLED, "a_3": TIMEOUT, "a_4": SURVIVED, "a_5": NOT_RUN})
    _mutants(tmp_path, "pkg/study/checkpoints.py", {"c_1": KILLED, "c_2": SURVIVED})
    out = summarise(tmp_path / "mutants", 3.0, root=tmp_path)
    a = out["modules"]["pkg/engine/a.py"]
    assert (a["killed"], a["timed_out"], a["survived"], a["not_run"]) == (2, 1, 1, 1)
    assert [s["mutant"] for s in a["survivors"]] == ["a_4"]
    assert a["source_sha256"] == source_sha256("pkg/engine/a.py", tmp_path)
    assert out["score_engine"] == 0.75 and out["score_checkpoints"] == 0.5  # timeouts count as killed
    assert (out["n_mutants"], out["n_not_run"], out["minutes"]) == (6, 1, 3.0)
    assert out["seconds_per_mutant"] == 30.0


def test_earlier_rows_kept_only_for_unchanged_sources(tmp_path):
    _source(tmp_path, "pkg/engine/old.py", "old = 1\n")
    _source(tmp_path, "pkg/engine/changed.py", "changed = 2\n")
    _source(tmp_path, "pkg/engine/new.py", "new = 3\n")
    earlier = {"runs": [{"minutes": 10.0, "n_mutants": 15, "modules": ["pkg/engine/changed.py", "pkg/engine/old.py"]},
                        {"minutes": 7.0, "n_mutants": 5, "modules": ["pkg/engine/changed.py"]}], "modules": {
        "pkg/engine/old.py": {"killed": 9, "survived": 1, "equivalent": 0, "timed_out": 0, "not_run": 0, "other": 0,
                              "survivors": [{"mutant": "o_1", "equivalent": False, "reason": ""}],
                              "source_sha256": source_sha256("pkg/engine/old.py", tmp_path)},
        "pkg/engine/changed.py": {"killed": 5, "survived": 0, "equivalent": 0, "timed_out": 0, "not_run": 0, "other": 0,
                                  "survivors": [], "source_sha256": "0" * 64},
    }}
    # this run: the new module run, the old and changed ones generated but not run (a fresh mutants/ cache)
    _mutants(tmp_path, "pkg/engine/new.py", {"n_1": KILLED, "n_2": SURVIVED})
    _mutants(tmp_path, "pkg/engine/old.py", {"o_1": NOT_RUN, "o_2": NOT_RUN})
    _mutants(tmp_path, "pkg/engine/changed.py", {"c_1": NOT_RUN})
    out = summarise(tmp_path / "mutants", 2.0, earlier, root=tmp_path)
    assert set(out["modules"]) == {"pkg/engine/old.py", "pkg/engine/new.py"}
    assert out["modules"]["pkg/engine/old.py"] == earlier["modules"]["pkg/engine/old.py"]
    assert out["score_engine"] == round(10 / 12, 3)
    assert out["n_not_run"] == 1  # the changed module's mutant; the kept module's are not counted twice
    # the run that measured only the changed module is dropped with it
    assert out["minutes"] == 12.0 and [r["minutes"] for r in out["runs"]] == [10.0, 2.0]
    # a second summary of the same run keeps the earlier run's minutes without counting this one twice
    again = summarise(tmp_path / "mutants", 2.0, {**out, "runs": out["runs"][:1]}, root=tmp_path)
    assert again["minutes"] == 12.0 and again["modules"] == out["modules"]


def test_a_rerun_of_a_module_replaces_its_earlier_row(tmp_path):
    _source(tmp_path, "pkg/engine/a.py", "a = 1\n")
    earlier = {"runs": [{"minutes": 4.0, "n_mutants": 2, "modules": ["pkg/engine/a.py"]}], "modules": {"pkg/engine/a.py": {
        "killed": 1, "survived": 1, "equivalent": 0, "timed_out": 0, "not_run": 0, "other": 0,
        "survivors": [{"mutant": "a_2", "equivalent": False, "reason": ""}],
        "source_sha256": source_sha256("pkg/engine/a.py", tmp_path)}}}
    _mutants(tmp_path, "pkg/engine/a.py", {"a_1": KILLED, "a_2": KILLED})
    out = summarise(tmp_path / "mutants", 1.0, earlier, root=tmp_path)
    assert out["modules"]["pkg/engine/a.py"]["survived"] == 0 and out["score_engine"] == 1.0
    assert out["minutes"] == 5.0  # both runs' minutes: the verdicts of a partial rerun rest on the first run too
