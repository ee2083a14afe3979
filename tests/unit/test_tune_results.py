"""The parent run's results: the table, the Pareto front of top-1 against energy, and the plots
(written as real PNG files) from trial records."""

from __future__ import annotations

import csv

from asnn_dist.tune.results import TrialRecord, best_trial, pareto_front, render_all, table_rows


def rec(tid: str, status: str, top1: float, energy_pj: float, tk=(4, 1), curve=None) -> TrialRecord:
    metrics = {"val_top1": top1, "val_energy/total_pj": energy_pj, "epoch": 3 if status == "finished" else 1,
               "val_anytime_top1_t1": top1 / 2, "val_anytime_top1_t2": top1}
    return TrialRecord(tid, {"encoding.num_steps": tk[0], "encoding.direct_steps": tk[1]}, status, metrics,
                       curve or [(1.0, top1 / 2), (2.0, top1)], f"run-{tid}", tk=tk)


RECORDS = [
    rec("a_00000", "finished", 0.90, 2e6, (4, 1)),
    rec("a_00001", "finished", 0.95, 3e6, (4, 2)),
    rec("a_00002", "finished", 0.85, 2.5e6, (2, 0)),  # dominated by 00000 (better and cheaper)
    rec("a_00003", "finished", 0.80, 1e6, (2, 1)),
    rec("a_00004", "stopped", 0.99, 0.5e6, (2, 2)),  # stopped trials have no final model: not on the front
    TrialRecord("a_00005", {}, "error", {}, error="RuntimeError: boom\nmore"),
]


def test_pareto_front_and_best_use_finished_trials_only():
    front = pareto_front(RECORDS)
    assert [r.trial_id for r in front] == ["a_00003", "a_00000", "a_00001"]
    assert best_trial(RECORDS, "val_top1").trial_id == "a_00001"
    assert best_trial(RECORDS, "val_top1", mode="min").trial_id == "a_00003"


def test_table_and_plots(tmp_path):
    rows = table_rows(RECORDS, "val_top1")
    assert rows[0]["T"] == 4 and rows[0]["k"] == 1 and rows[0]["energy_uj_per_image"] == 2.0
    assert rows[4]["status"] == "stopped" and rows[5]["error"] == "RuntimeError: boom"
    files = render_all(RECORDS, str(tmp_path), "val_top1", "max")
    names = {p.rsplit("/", 1)[-1] for p in files}
    assert names == {"results.csv", "best_top1_by_T_k.png", "top1_vs_energy_pareto.png", "anytime_best_trials.png",
                     "learning_curves.png"}
    for f in files:
        if f.endswith(".png"):
            assert open(f, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "results.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 6 and table[1]["val_top1"] == "0.95" and table[1]["anytime_top1_t2"] == "0.95"


def test_seed_table_averages_finished_trials_over_seeds():
    from asnn_dist.tune.results import seed_table

    recs = [TrialRecord(f"s_{i}", {"encoding.direct_steps": k, "seed": s}, "finished",
                        {"val_top1": v, "val_energy/total_pj": 1e6, "val_sops_per_sample": 10.0})
            for i, (k, s, v) in enumerate([(0, 0, 0.8), (0, 1, 0.9), (1, 0, 0.95), (1, 1, 0.97)])]
    recs.append(TrialRecord("s_9", {"encoding.direct_steps": 1, "seed": 2}, "stopped", {"val_top1": 0.1}))
    lines = seed_table(recs)
    assert lines[0].startswith("| direct_steps | seeds | val_top1 (mean +- std)")
    assert lines[2] == "| 0 | 2 | 0.8500 +- 0.0707 | 1.0000 | 10 |"
    assert lines[3].startswith("| 1 | 2 | 0.9600 +- ")
    assert seed_table(RECORDS) == []
