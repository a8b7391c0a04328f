"""Unit tests of ``analysis.verdicts``: paired ablation verdicts, the noise of the objective, the
MoCo v2 baseline check and group comparisons at one budget.

Everything runs on small hand-made ``trials`` / ``epochs`` frames shaped like the ones
``analysis.Experiment`` builds (no Ray, no training). Every statistic is checked against a slow,
obviously-correct reference written here with plain Python loops and ``scipy.stats.t.ppf``.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import pytest
from scipy import stats

from analysis import verdicts
from analysis.summaries import NOT_SET, ci_table, mean_ci
from analysis.verdicts import Noise, Verdict
from pcl_tune import metrics as registry
from pcl_tune.space import ARM_KEY, BASELINE_ARM, SEED_KEY, Param

METRIC = "knn_top1"
DUP = "pcl.duplicates"
SCHED = "pcl.cluster_schedule"
MINUS = "−"  # the sentences print negative numbers with a Unicode minus sign


# --------------------------------------------------------------------------- references


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _var(xs: list[float]) -> float:
    """Sample variance (ddof=1), by hand."""
    m = _mean(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


def _ref_paired(diffs: list[float]) -> tuple[float, float, float]:
    """Mean of the differences and its two-sided 95 % Student t interval, by hand."""
    n = len(diffs)
    m = _mean(diffs)
    half = stats.t.ppf(0.975, n - 1) * math.sqrt(_var(diffs)) / math.sqrt(n)
    return m, m - half, m + half


def _ref_welch_half(a: list[float], b: list[float]) -> float:
    """Half-width of the unpaired (Welch) 95 % interval of ``mean(b) - mean(a)``, by hand."""
    va, vb = _var(a) / len(a), _var(b) / len(b)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return stats.t.ppf(0.975, df) * math.sqrt(va + vb)


def _ref_binomial_se(best_percent: float, n: int) -> float:
    p = best_percent / 100.0
    return 100.0 * math.sqrt(p * (1 - p) / n)


def _signed(x: float) -> str:
    return f"{x:+.1f}".replace("-", MINUS)


def _diffs(level: dict[Any, float], reference: dict[Any, float]) -> tuple[list[Any], list[float]]:
    """Per-seed ``level - reference`` over the seeds both have."""
    seeds = sorted(s for s in level if s in reference)
    return seeds, [level[s] - reference[s] for s in seeds]


def _assert_matches(v: Verdict, seeds: list[Any], diffs: list[float]) -> None:
    """``v`` pairs exactly ``seeds`` with ``diffs`` and its mean and interval match the reference."""
    assert sorted(v.seeds) == seeds
    got = dict(zip(v.seeds, v.diffs))
    assert [got[s] for s in seeds] == pytest.approx(diffs, abs=1e-9)
    m, lo, hi = _ref_paired(diffs)
    assert v.n == len(diffs)
    assert v.mean == pytest.approx(m, abs=1e-9)
    assert v.low == pytest.approx(lo, abs=1e-9)
    assert v.high == pytest.approx(hi, abs=1e-9)
    assert v.resolved == (lo > 0 or hi < 0)


# --------------------------------------------------------------------------- synthetic experiments

SEED_EFFECT = {0: 0.0, 1: 6.0, 2: -4.0, 3: 9.0, 4: -2.0}
"""Large seed-to-seed offsets: unpaired intervals are wide, paired ones are not."""
DUP_EFFECT = {"dedupe": 0.0, "remap": -2.0, "none": -5.0}
SCHED_EFFECT = {"5,10": 0.0, "80,160": 3.0}
DUP_ORDER = ["dedupe", "remap", "none"]
SCHED_ORDER = ["5,10", "80,160"]
ORDERS: dict[str, list[Any]] = {DUP: DUP_ORDER, SCHED: SCHED_ORDER}


def _jitter(*keys: int) -> float:
    """A small deterministic per-trial perturbation in [-0.2, 0.2] (so intervals are not degenerate)."""
    h = 0
    for k in keys:
        h = (h * 31 + k * 17 + 7) % 101
    return (h % 5 - 2) / 10.0


def _grid_trials(seeds: int = 4) -> tuple[pd.DataFrame, dict[tuple[str, str], dict[int, float]], dict[int, float]]:
    """A ``pcl.duplicates`` x ``pcl.cluster_schedule`` x seeds ablation with the MoCo v2 baseline
    once per seed, additive effects plus a seed effect. Trials appear in an order that differs from
    the listed choice order (``none`` and ``80,160`` first), so the reference must come from
    ``orders``. Returns the trials and the true values by cell and seed and of the baseline."""
    rows: list[dict[str, Any]] = []
    cell_values: dict[tuple[str, str], dict[int, float]] = {}
    base_values: dict[int, float] = {}
    i = 0
    for s in range(seeds):
        for di, dup in enumerate(["none", "remap", "dedupe"]):
            for si, sched in enumerate(["80,160", "5,10"]):
                v = 60.0 + DUP_EFFECT[dup] + SCHED_EFFECT[sched] + SEED_EFFECT[s] + _jitter(s, di, si)
                cell_values.setdefault((dup, sched), {})[s] = v
                rows.append({"trial_id": f"t{i:03d}", "status": "finished", "epochs": 10, DUP: dup, SCHED: sched,
                             SEED_KEY: s, ARM_KEY: math.nan, f"last_{METRIC}": v})
                i += 1
        v = 50.0 + SEED_EFFECT[s] + _jitter(s, 9, 9)
        base_values[s] = v
        rows.append({"trial_id": f"t{i:03d}", "status": "finished", "epochs": 10, DUP: "dedupe", SCHED: "5,10",
                     SEED_KEY: s, ARM_KEY: BASELINE_ARM, f"last_{METRIC}": v})
        i += 1
    return pd.DataFrame(rows), cell_values, base_values


ARM_EFFECT = {"topk": 1.5, "proto_nce": 0.0, "small_weight": 0.0, BASELINE_ARM: -4.0}
ARM_SETTINGS = {"topk": {"pcl.proto_loss": "topk", "pcl.proto_weight": 1.0},
                "proto_nce": {"pcl.proto_loss": "proto_nce", "pcl.proto_weight": 1.0},
                "small_weight": {"pcl.proto_loss": "proto_nce", "pcl.proto_weight": 0.25},
                BASELINE_ARM: {"pcl.proto_loss": "proto_nce", "pcl.proto_weight": 0.0}}


def _arms_trials(stopped: tuple[str, int] | None = ("topk", 4)) -> tuple[pd.DataFrame, dict[str, dict[int, float]]]:
    """An arms ablation (topk first in run order, the reference ``proto_nce`` second) with the
    baseline, 5 seeds; the trial ``stopped`` = (arm, seed) did not finish."""
    rows: list[dict[str, Any]] = []
    values: dict[str, dict[int, float]] = {}
    i = 0
    for s in range(5):
        for ai, arm in enumerate(["topk", "proto_nce", "small_weight", BASELINE_ARM]):
            v = 60.0 + ARM_EFFECT[arm] + SEED_EFFECT[s] + _jitter(s, ai)
            done = (arm, s) != stopped
            if done:
                values.setdefault(arm, {})[s] = v
            rows.append({"trial_id": f"a{i:03d}", "status": "finished" if done else "stopped",
                         "epochs": 10 if done else 4, **ARM_SETTINGS[arm], SEED_KEY: s, ARM_KEY: arm,
                         f"last_{METRIC}": v if done else math.nan})
            i += 1
    return pd.DataFrame(rows), values


def _final(trials: pd.DataFrame) -> pd.Series:
    return verdicts.final_values(trials, pd.DataFrame(columns=["trial_id", "epoch", METRIC]), METRIC, None)


# --------------------------------------------------------------------------- values at a budget


def _epochs() -> pd.DataFrame:
    rows = [
        ("t1", 1, 10.0), ("t1", 2, 11.0), ("t1", 2, 12.5), ("t1", 3, 13.0),  # epoch 2 replayed
        ("t2", 1, 20.0),                                                       # never reached epoch 2
        ("t3", 1, 30.0), ("t3", 2, math.nan),                                  # not measured at 2
        ("t4", 1, 40.0), ("t4", 2, 41.0), ("t4", 3, 42.0), ("t4", 3, 43.0),    # epoch 3 replayed
    ]
    return pd.DataFrame(rows, columns=["trial_id", "epoch", METRIC])


def test_values_at_takes_the_last_record_of_the_epoch() -> None:
    v = verdicts.values_at(_epochs(), METRIC, 2)
    assert v.to_dict() == {"t1": 12.5, "t4": 41.0}  # t2 did not reach 2, t3's value is NaN
    v3 = verdicts.values_at(_epochs(), METRIC, 3)
    assert v3.to_dict() == {"t1": 13.0, "t4": 43.0}
    assert verdicts.values_at(_epochs(), METRIC, 1).to_dict() == {"t1": 10.0, "t2": 20.0, "t3": 30.0, "t4": 40.0}


def test_values_at_epoch_nobody_reached_unknown_metric_and_empty_frame() -> None:
    assert verdicts.values_at(_epochs(), METRIC, 7).empty
    assert verdicts.values_at(_epochs(), "fewshot_5w1s", 1).empty
    assert verdicts.values_at(_epochs().iloc[0:0], METRIC, 1).empty


def test_values_at_reads_epoch_numbers_stored_as_text() -> None:
    ep = _epochs().assign(epoch=lambda d: d["epoch"].astype(str))
    assert verdicts.values_at(ep, METRIC, 2).to_dict() == {"t1": 12.5, "t4": 41.0}


def test_values_at_last_record_wins_even_when_it_has_no_value() -> None:
    ep = pd.DataFrame({"trial_id": ["a", "a", "b"], "epoch": [3, 3, 3], METRIC: [50.0, math.nan, 40.0]})
    # The replayed record of epoch 3 is the one that counts; it has no value, so "a" is absent.
    assert verdicts.values_at(ep, METRIC, 3).to_dict() == {"b": 40.0}


def _status_trials() -> pd.DataFrame:
    return pd.DataFrame({"trial_id": ["t1", "t2", "t3", "t4"],
                         "status": ["finished", "finished", "stopped", "finished"],
                         "epochs": [3, 1, 2, 3],
                         f"last_{METRIC}": [13.0, 20.0, math.nan, math.nan]})


def test_final_values_at_max_t_counts_only_finished_trials() -> None:
    trials = _status_trials().assign(status=["finished", "finished", "finished", "stopped"])
    v = verdicts.final_values(trials, _epochs(), METRIC, 3)
    assert v.to_dict() == {"t1": 13.0}  # t4 reached epoch 3 but was stopped; t2, t3 did not reach it
    v2 = verdicts.final_values(trials, _epochs(), METRIC, 2)
    assert v2.to_dict() == {"t1": 12.5}  # the replayed epoch's last record; t3 NaN, t4 not finished


def test_final_values_without_max_t_reads_the_last_column() -> None:
    v = verdicts.final_values(_status_trials(), _epochs(), METRIC, None)
    assert v.to_dict() == {"t1": 13.0, "t2": 20.0}  # t3 not finished, t4 NaN
    assert verdicts.final_values(_status_trials(), _epochs(), "fewshot_5w1s", None).empty


# --------------------------------------------------------------------------- paired / Verdict


def _paired_frame() -> pd.DataFrame:
    """Level ``b`` ran seeds 0-3, reference ``a`` seeds 0, 1, 2, 4: only 0-2 pair."""
    rows = [("a", 0, 50.0), ("a", 1, 57.0), ("a", 2, 45.5), ("a", 4, 10.0),
            ("b", 0, 53.0), ("b", 1, 59.5), ("b", 2, 49.0), ("b", 3, 99.0),
            ("c", 0, 60.0)]
    return pd.DataFrame(rows, columns=["f", SEED_KEY, "value"])


def test_paired_pairs_only_common_seeds() -> None:
    v = verdicts.paired(_paired_frame(), METRIC, "f", "b", "a", "ctx=1")
    _assert_matches(v, [0, 1, 2], [3.0, 2.5, 3.5])
    assert (v.factor, v.level, v.reference, v.context, v.metric) == ("f", "b", "a", "ctx=1", METRIC)
    assert v.level_mean == pytest.approx(_mean([53.0, 59.5, 49.0]))  # seed 3 left out
    assert v.reference_mean == pytest.approx(_mean([50.0, 57.0, 45.5]))  # seed 4 left out
    assert v.method == "paired t"
    assert v.resolved  # 3.0 +- 4.30 * 0.5 / sqrt(3) = [1.76, 4.24]
    assert v.label == "b − a"


def test_paired_averages_repeated_trials_of_a_seed() -> None:
    d = pd.concat([_paired_frame(), pd.DataFrame({"f": ["b"], SEED_KEY: [0], "value": [55.0]})], ignore_index=True)
    v = verdicts.paired(d, METRIC, "f", "b", "a")
    _assert_matches(v, [0, 1, 2], [(53.0 + 55.0) / 2 - 50.0, 2.5, 3.5])


def test_paired_matches_numeric_levels_by_text() -> None:
    d = pd.DataFrame({"k": [1, 1, 1, 3, 3, 3], SEED_KEY: [0, 1, 2, 0, 1, 2], "value": [1.0, 2.0, 4.0, 2.0, 2.5, 6.0]})
    v = verdicts.paired(d, "loss", "k", 3, 1)
    _assert_matches(v, [0, 1, 2], [1.0, 0.5, 2.0])
    assert (v.level, v.reference) == ("3", "1")


def test_verdicts_of_fractions_keep_three_decimals() -> None:
    """NMI lies in [0, 1]: at one decimal every difference read "−0.0 [−0.0, +0.0]"."""
    d = pd.DataFrame({"f": ["a"] * 3 + ["b"] * 3, SEED_KEY: [0, 1, 2] * 2,
                      "value": [0.090, 0.085, 0.095, 0.080, 0.078, 0.086]})
    v = verdicts.paired(d, "nmi", "f", "b", "a")
    assert v.sentence().startswith("b − a, nmi: ") and "−0.009 [" in v.sentence()
    assert "0: −0.010" in v.row()["diffs"]
    pct = verdicts.paired(d.assign(value=d["value"] * 100), METRIC, "f", "b", "a")
    assert f"{METRIC}: " in pct.sentence() and "−0.9 points [" in pct.sentence()


def test_paired_unresolved_when_the_interval_contains_zero() -> None:
    d = pd.DataFrame({"f": ["a"] * 4 + ["b"] * 4, SEED_KEY: [0, 1, 2, 3] * 2,
                      "value": [50.0, 60.0, 40.0, 55.0, 51.0, 59.0, 41.5, 54.0]})
    v = verdicts.paired(d, METRIC, "f", "b", "a")
    _assert_matches(v, [0, 1, 2, 3], [1.0, -1.0, 1.5, -1.0])
    assert v.low < 0 < v.high
    assert not v.resolved


def test_paired_negative_difference_is_resolved_below_zero() -> None:
    d = pd.DataFrame({"f": ["a"] * 3 + ["b"] * 3, SEED_KEY: [0, 1, 2] * 2,
                      "value": [50.0, 60.0, 40.0, 47.0, 56.5, 37.2]})
    v = verdicts.paired(d, METRIC, "f", "b", "a")
    _assert_matches(v, [0, 1, 2], [-3.0, -3.5, -2.8])
    assert v.high < 0 and v.resolved


def test_paired_with_one_common_seed_has_no_interval() -> None:
    v = verdicts.paired(_paired_frame(), METRIC, "f", "c", "a")
    assert v.n == 1 and v.seeds == (0,) and v.mean == pytest.approx(10.0)
    assert math.isnan(v.low) and math.isnan(v.high)
    assert not v.resolved
    s = v.sentence()
    assert s == f"c − a, {METRIC}: +10.0 points from 1 seed: no interval"
    assert "no difference resolved" not in s


def test_paired_without_common_seed_is_empty() -> None:
    d = pd.DataFrame({"f": ["a", "b"], SEED_KEY: [0, 1], "value": [1.0, 2.0]})
    v = verdicts.paired(d, METRIC, "f", "b", "a")
    assert v.n == 0 and not v.resolved
    assert math.isnan(v.mean) and math.isnan(v.level_mean) and math.isnan(v.reference_mean)


def test_verdict_resolved_is_the_interval_excluding_zero() -> None:
    def make(low: float, high: float, n: int = 3) -> Verdict:
        return Verdict(METRIC, "f", "b", "a", "", tuple(range(n)), (1.0,) * n, 1.0, low, high)

    assert make(0.1, 2.0).resolved
    assert make(-2.0, -0.1).resolved
    assert not make(-0.1, 2.0).resolved
    assert not make(0.0, 2.0).resolved  # touching 0 does not exclude it
    assert not make(0.5, 2.0, n=1).resolved  # one seed never resolves


@pytest.mark.parametrize("diffs", [[3.0, 2.5, 3.5], [1.0, -1.0, 1.5, -1.0], [-3.0, -3.5, -2.8, -2.1, -4.0]])
def test_sentence_wording(diffs: list[float]) -> None:
    seeds = list(range(len(diffs)))
    d = pd.DataFrame({"f": ["a"] * len(diffs) + ["b"] * len(diffs), SEED_KEY: seeds * 2,
                      "value": [50.0 + 5 * s for s in seeds] + [50.0 + 5 * s + x for s, x in zip(seeds, diffs)]})
    v = verdicts.paired(d, METRIC, "f", "b", "a", f"{SCHED}=5,10")
    m, lo, hi = _ref_paired(diffs)
    resolved = lo > 0 or hi < 0
    s = v.sentence()
    assert s.startswith(f"b − a ({SCHED}=5,10), {METRIC}: ")
    assert ("no difference resolved" in s) == (not resolved)
    assert f"{_signed(m)} points [{_signed(lo)}, {_signed(hi)}]" in s
    assert "paired t" in s and f"{len(diffs)} seeds" in s
    assert registry.unit(METRIC) == "%"
    row = v.row()
    assert row["verdict"] == s and row["resolved"] == resolved and row["n_seeds"] == len(diffs)
    assert row["comparison"] == "b − a" and row["context"] == f"{SCHED}=5,10"
    assert row["diffs"] == ", ".join(f"{sd}: {_signed(x)}" for sd, x in zip(seeds, diffs))
    assert (row["diff_mean"], row["ci_low"], row["ci_high"]) == pytest.approx((m, lo, hi))


def test_sentence_minus_sign_and_one_decimal() -> None:
    v = Verdict(METRIC, "f", "b", "a", "", (0, 1, 2), (-3.0, -3.5, -2.8), -3.1, -3.98, -2.21)
    assert v.sentence() == f"b − a, {METRIC}: −3.1 points [−4.0, −2.2], paired t, 3 seeds"
    v = Verdict(METRIC, "f", "b", "a", "", (0, 1), (0.3, 0.34), 0.32, -1.84, 2.46)
    assert v.sentence() == f"b − a, {METRIC}: no difference resolved: +0.3 points [−1.8, +2.5], paired t, 2 seeds"


def test_sentence_of_a_unitless_metric_has_no_double_space() -> None:
    d = pd.DataFrame({SEED_KEY: [0, 1, 0, 1], "f": ["a", "a", "b", "b"], "value": [1.0, 2.0, 3.0, 5.0]})
    s = verdicts.paired(d, "loss", "f", "b", "a").sentence()
    assert "points" not in s
    assert "  " not in s


# --------------------------------------------------------------------------- ablation: a factor grid


def _by_key(vs: list[Verdict]) -> dict[tuple[str, str, str, str], Verdict]:
    out = {(v.factor, v.level, v.reference, v.context): v for v in vs}
    assert len(out) == len(vs), "two verdicts compare the same thing"
    return out


def test_grid_ablation_verdicts_per_level_within_each_other_factor() -> None:
    trials, cell, _ = _grid_trials()
    res = verdicts.ablation_verdicts(trials, _final(trials), METRIC, [DUP, SCHED], ORDERS)
    got = _by_key(res.verdicts)
    expected: dict[tuple[str, str, str, str], tuple[list[Any], list[float]]] = {}
    for sched in SCHED_ORDER:
        for dup in DUP_ORDER[1:]:
            expected[(DUP, dup, "dedupe", f"{SCHED}={sched}")] = _diffs(cell[(dup, sched)], cell[("dedupe", sched)])
    for dup in DUP_ORDER:
        expected[(SCHED, "80,160", "5,10", f"{DUP}={dup}")] = _diffs(cell[(dup, "80,160")], cell[(dup, "5,10")])
    assert set(got) == set(expected)  # 4 + 3: the reference is the first listed level, not the first seen
    for key, (seeds, diffs) in expected.items():
        _assert_matches(got[key], seeds, diffs)
        assert got[key].n == 4
    # The known additive effects come through (the jitter is at most 0.4 between two trials).
    assert got[(DUP, "none", "dedupe", f"{SCHED}=5,10")].mean == pytest.approx(-5.0, abs=0.4)
    assert got[(SCHED, "80,160", "5,10", f"{DUP}=remap")].mean == pytest.approx(3.0, abs=0.4)
    assert all(v.resolved for v in res.verdicts)
    assert res.missing == []
    assert res.metric == METRIC


def test_grid_ablation_pairing_beats_an_unpaired_interval() -> None:
    trials, cell, _ = _grid_trials()
    res = verdicts.ablation_verdicts(trials, _final(trials), METRIC, [DUP, SCHED], ORDERS)
    v = _by_key(res.verdicts)[(DUP, "remap", "dedupe", f"{SCHED}=5,10")]
    a = [cell[("dedupe", "5,10")][s] for s in range(4)]
    b = [cell[("remap", "5,10")][s] for s in range(4)]
    welch = _ref_welch_half(a, b)
    paired_half = (v.high - v.low) / 2
    assert paired_half * 10 < welch  # the seed effect cancels in the differences
    assert -welch < _mean(b) - _mean(a) < welch  # unpaired, the -2 points effect is not resolved
    assert v.resolved and v.high < 0  # paired, it is


def test_grid_ablation_baseline_is_best_cell_minus_moco_paired_by_seed() -> None:
    trials, cell, base = _grid_trials()
    res = verdicts.ablation_verdicts(trials, _final(trials), METRIC, [DUP, SCHED], ORDERS)
    best = max(cell, key=lambda k: _mean(list(cell[k].values())))
    assert best == ("dedupe", "80,160")
    b = res.baseline
    assert b is not None
    assert (b.level, b.reference) == ("best PCL", BASELINE_ARM)
    assert b.context == f"best PCL cell: {DUP}=dedupe, {SCHED}=80,160"
    _assert_matches(b, [0, 1, 2, 3], _diffs(cell[best], base)[1])
    assert b.level_mean == pytest.approx(_mean(list(cell[best].values())))
    assert b.reference_mean == pytest.approx(_mean(list(base.values())))
    # The baseline is compared only there, never as a level of a grid factor.
    assert all(BASELINE_ARM not in (v.level, v.reference) for v in res.verdicts)


def test_grid_ablation_cells_and_table() -> None:
    trials, cell, base = _grid_trials()
    res = verdicts.ablation_verdicts(trials, _final(trials), METRIC, [DUP, SCHED], ORDERS)
    cells = res.cells
    assert len(cells) == 7  # 6 PCL cells + the baseline
    pcl = cells[cells[ARM_KEY] == "PCL"]
    assert len(pcl) == 6 and (cells[ARM_KEY] == BASELINE_ARM).sum() == 1
    # The baseline's grid columns are not settings it was compared on.
    assert (cells.loc[cells[ARM_KEY] == BASELINE_ARM, [DUP, SCHED]] == "—").all(axis=None)
    for _, r in pcl.iterrows():
        xs = list(cell[(r[DUP], r[SCHED])].values())
        m, lo, hi = _ref_paired(xs)  # a one-sample t interval is the same formula
        assert r["n"] == 4 and r["mean"] == pytest.approx(m) and r["ci_low"] == pytest.approx(lo)
        assert r["ci_high"] == pytest.approx(hi)
    r = cells[cells[ARM_KEY] == BASELINE_ARM].iloc[0]
    assert r["mean"] == pytest.approx(_mean(list(base.values())))
    table = res.table()
    assert len(table) == 1 + len(res.verdicts) == 8
    assert table.iloc[0]["comparison"] == f"best PCL − {BASELINE_ARM}"
    assert table.iloc[0]["verdict"] == res.baseline.sentence()
    assert list(table["comparison"].iloc[1:]) == [v.label for v in res.verdicts]


def test_grid_ablation_leaves_out_unfinished_trials_and_their_seeds() -> None:
    trials, cell, _ = _grid_trials()
    tid = trials[(trials[DUP] == "remap") & (trials[SCHED] == "5,10") & (trials[SEED_KEY] == 2)]["trial_id"].item()
    tid2 = trials[(trials[DUP] == "none") & (trials[SCHED] == "80,160") & (trials[SEED_KEY] == 0)]["trial_id"].item()
    trials.loc[trials["trial_id"] == tid, "status"] = "errored"
    trials.loc[trials["trial_id"] == tid2, "status"] = "stopped"
    values = _final(trials)
    assert tid not in values.index and tid2 not in values.index  # last_* is set, but they did not finish
    res = verdicts.ablation_verdicts(trials, values, METRIC, [DUP, SCHED], ORDERS)
    assert res.missing == [f"{tid2} (stopped)", f"{tid} (errored)"]  # in trial order
    got = _by_key(res.verdicts)
    del cell[("remap", "5,10")][2], cell[("none", "80,160")][0]
    _assert_matches(got[(DUP, "remap", "dedupe", f"{SCHED}=5,10")], [0, 1, 3],
                    _diffs(cell[("remap", "5,10")], cell[("dedupe", "5,10")])[1])
    _assert_matches(got[(SCHED, "80,160", "5,10", f"{DUP}=none")], [1, 2, 3],
                    _diffs(cell[("none", "80,160")], cell[("none", "5,10")])[1])
    assert got[(DUP, "remap", "dedupe", f"{SCHED}=80,160")].n == 4


def test_grid_ablation_one_factor_without_baseline() -> None:
    trials, cell, _ = _grid_trials()
    trials = trials[(trials[ARM_KEY] != BASELINE_ARM) & (trials[SCHED] == "5,10")].drop(columns=[ARM_KEY])
    res = verdicts.ablation_verdicts(trials, _final(trials), METRIC, [DUP, SCHED, SEED_KEY], ORDERS)
    assert res.baseline is None
    got = _by_key(res.verdicts)
    assert set(got) == {(DUP, "remap", "dedupe", ""), (DUP, "none", "dedupe", "")}  # SCHED is constant
    for lvl in ("remap", "none"):
        _assert_matches(got[(DUP, lvl, "dedupe", "")], *_diffs(cell[(lvl, "5,10")], cell[("dedupe", "5,10")]))
    assert len(res.cells) == 3 and list(res.cells[DUP]) == DUP_ORDER
    assert len(res.table()) == 2


def test_ablation_factors() -> None:
    trials, _, _ = _grid_trials()
    assert verdicts.ablation_factors(trials, [DUP, SCHED, SEED_KEY, "absent"]) == [ARM_KEY, DUP, SCHED]
    assert verdicts.ablation_factors(trials.drop(columns=[ARM_KEY]), [SCHED, DUP]) == [SCHED, DUP]
    one = trials[trials[SCHED] == "5,10"].assign(**{ARM_KEY: math.nan})
    assert verdicts.ablation_factors(one, [DUP, SCHED]) == [DUP]


def test_ablation_baseline_for_a_min_metric_picks_the_lowest_cell() -> None:
    trials, cell, base = _grid_trials()
    res = verdicts.ablation_verdicts(trials, _final(trials), "loss", [DUP, SCHED], ORDERS)
    worst = min(cell, key=lambda k: _mean(list(cell[k].values())))
    assert worst == ("none", "5,10")
    assert res.baseline is not None
    assert res.baseline.context == f"best PCL cell: {DUP}=none, {SCHED}=5,10"
    _assert_matches(res.baseline, [0, 1, 2, 3], _diffs(cell[worst], base)[1])


# --------------------------------------------------------------------------- ablation: arms


def test_arms_ablation_verdicts_against_the_reference_arm() -> None:
    trials, values = _arms_trials()
    res = verdicts.ablation_verdicts(trials, _final(trials), METRIC, [], {}, reference_arm="proto_nce")
    got = _by_key(res.verdicts)
    expected = {(ARM_KEY, arm, "proto_nce", ""): _diffs(values[arm], values["proto_nce"])
                for arm in ("topk", "small_weight", BASELINE_ARM)}
    assert set(got) == set(expected)  # moco_v2 − reference is a verdict too
    for key, (seeds, diffs) in expected.items():
        _assert_matches(got[key], seeds, diffs)
    assert got[(ARM_KEY, "topk", "proto_nce", "")].n == 4  # seed 4 of topk was stopped
    assert got[(ARM_KEY, BASELINE_ARM, "proto_nce", "")].n == 5
    assert got[(ARM_KEY, BASELINE_ARM, "proto_nce", "")].high < 0
    stopped = trials[trials["status"] == "stopped"]["trial_id"].item()
    assert res.missing == [f"{stopped} (stopped)"]


def test_arms_ablation_baseline_and_table() -> None:
    trials, values = _arms_trials()
    res = verdicts.ablation_verdicts(trials, _final(trials), METRIC, [], {}, reference_arm="proto_nce")
    assert res.baseline is not None
    assert res.baseline.context == f"best PCL cell: {ARM_KEY}=topk"
    _assert_matches(res.baseline, *_diffs(values["topk"], values[BASELINE_ARM]))
    table = res.table()
    assert len(table) == 4
    assert table.iloc[0]["comparison"] == f"best PCL − {BASELINE_ARM}"
    assert set(table["comparison"].iloc[1:]) == {"topk − proto_nce", "small_weight − proto_nce",
                                                f"{BASELINE_ARM} − proto_nce"}
    assert list(table["n_seeds"]) == [4, 4, 5, 5]
    cells = res.cells.set_index(ARM_KEY)
    assert sorted(cells.index) == sorted(ARM_EFFECT)
    assert cells.loc["topk", "n"] == 4 and cells.loc["proto_nce", "n"] == 5
    assert cells.loc["small_weight", "mean"] == pytest.approx(_mean(list(values["small_weight"].values())))


def test_arms_ablation_default_reference_is_the_first_arm() -> None:
    trials, values = _arms_trials(stopped=None)
    for ref in (None, "not_an_arm"):
        res = verdicts.ablation_verdicts(trials, _final(trials), METRIC, [], {}, reference_arm=ref)
        got = _by_key(res.verdicts)
        assert set(got) == {(ARM_KEY, a, "topk", "") for a in ("proto_nce", "small_weight", BASELINE_ARM)}
        _assert_matches(got[(ARM_KEY, "proto_nce", "topk", "")], *_diffs(values["proto_nce"], values["topk"]))


def _arms_by_grid() -> tuple[pd.DataFrame, pd.Series]:
    """Arms ``ref`` / ``b`` crossed with a ``pcl.duplicates`` grid; remap helps by 5 points in arm
    ``b`` and not at all in ``ref`` (an interaction)."""
    rows: list[dict[str, Any]] = []
    for s in range(4):
        for arm in ("ref", "b"):
            for dup in ("dedupe", "remap"):
                v = 50.0 + (10.0 if arm == "b" else 0.0) + (5.0 if (arm, dup) == ("b", "remap") else 0.0) \
                    + SEED_EFFECT[s] + _jitter(s, len(arm), len(dup))
                rows.append({"trial_id": f"x{len(rows):03d}", "status": "finished", "epochs": 10, DUP: dup,
                             SEED_KEY: s, ARM_KEY: arm, f"last_{METRIC}": v})
    trials = pd.DataFrame(rows)
    return trials, _final(trials)


def test_arms_by_grid_compares_arms_within_each_grid_value() -> None:
    trials, values = _arms_by_grid()
    res = verdicts.ablation_verdicts(trials, values, METRIC, [DUP], {DUP: ["dedupe", "remap"]}, "ref")
    arm_vs = {v.context: v for v in res.verdicts if v.factor == ARM_KEY}
    assert set(arm_vs) == {f"{DUP}=dedupe", f"{DUP}=remap"}
    assert arm_vs[f"{DUP}=dedupe"].mean == pytest.approx(10.0, abs=0.4)
    assert arm_vs[f"{DUP}=remap"].mean == pytest.approx(15.0, abs=0.4)


def test_arms_by_grid_compares_grid_levels_within_each_arm() -> None:
    trials, values = _arms_by_grid()
    res = verdicts.ablation_verdicts(trials, values, METRIC, [DUP], {DUP: ["dedupe", "remap"]}, "ref")
    dup_vs = [v for v in res.verdicts if v.factor == DUP]
    assert len(dup_vs) == 2
    assert sorted(v.mean for v in dup_vs) == pytest.approx([0.0, 5.0], abs=0.4)
    assert all(f"{ARM_KEY}=" in v.context for v in dup_vs)


# --------------------------------------------------------------------------- noise


def _noise_trials() -> tuple[pd.DataFrame, list[list[float]]]:
    """Cells of (``pcl.duplicates``, ``optim.lr``) with 3, 2 and 1 seeds, and a trial without a value."""
    groups = {("dedupe", 0.01): [70.0, 72.5, 71.0], ("remap", 0.01): [66.0, 69.0], ("dedupe", 0.1): [80.0]}
    rows: list[dict[str, Any]] = []
    for (dup, lr), vals in groups.items():
        for s, v in enumerate(vals):
            rows.append({"trial_id": f"n{len(rows)}", DUP: dup, "optim.lr": lr, SEED_KEY: s, "_v": v})
    rows.append({"trial_id": "n_nan", DUP: "remap", "optim.lr": 0.01, SEED_KEY: 5, "_v": math.nan})
    return pd.DataFrame(rows), [g for g in groups.values() if len(g) >= 2]


def test_objective_noise_binomial_and_pooled_seed_sd() -> None:
    trials, multi = _noise_trials()
    n = verdicts.objective_noise(trials, METRIC, "_v", 1000, [DUP, "optim.lr"])
    assert n.metric == METRIC and n.n_val == 1000
    assert n.at == 80.0
    assert n.binomial_se == pytest.approx(_ref_binomial_se(80.0, 1000))  # 1.265 points
    pooled = math.sqrt(sum(_var(g) * (len(g) - 1) for g in multi) / sum(len(g) - 1 for g in multi))
    assert n.seed_sd == pytest.approx(pooled)  # 1.67 points
    assert n.seed_groups == 2
    assert n.resolution == pytest.approx(1.959964 * math.sqrt(2) * max(n.binomial_se, pooled), rel=1e-6)
    assert n.seed_sd > n.binomial_se
    # The seed among the parameters changes nothing (it never defines a setting).
    same = verdicts.objective_noise(trials, METRIC, "_v", 1000, [DUP, SEED_KEY, "optim.lr", "absent"])
    assert (same.seed_sd, same.seed_groups) == (n.seed_sd, n.seed_groups)


def test_objective_noise_resolution_uses_the_larger_error() -> None:
    trials, _ = _noise_trials()
    n = verdicts.objective_noise(trials, METRIC, "_v", 100, [DUP, "optim.lr"])
    se = _ref_binomial_se(80.0, 100)  # 4 points: now larger than the seed spread
    assert n.binomial_se == pytest.approx(se) and se > n.seed_sd
    assert n.resolution == pytest.approx(1.959964 * math.sqrt(2) * se, rel=1e-6)


def test_objective_noise_pools_everything_without_other_params() -> None:
    trials, _ = _noise_trials()
    n = verdicts.objective_noise(trials, METRIC, "_v", None, [])
    xs = [v for v in trials["_v"] if not math.isnan(v)]
    assert n.seed_groups == 1 and n.seed_sd == pytest.approx(math.sqrt(_var(xs)))
    assert math.isnan(n.binomial_se)
    assert n.resolution == pytest.approx(1.959964 * math.sqrt(2) * n.seed_sd, rel=1e-6)


def test_objective_noise_binomial_only_for_percent_metrics() -> None:
    trials, _ = _noise_trials()
    n = verdicts.objective_noise(trials.drop(columns=[SEED_KEY]), "loss", "_v", 1000, [DUP])
    assert registry.unit("loss") != "%"
    assert math.isnan(n.binomial_se) and math.isnan(n.seed_sd) and math.isnan(n.resolution)


def test_objective_noise_unknown() -> None:
    trials, _ = _noise_trials()
    n = verdicts.objective_noise(trials.drop(columns=[SEED_KEY]), METRIC, "_v", None, [DUP, "optim.lr"])
    assert math.isnan(n.binomial_se) and math.isnan(n.seed_sd) and n.seed_groups == 0
    assert math.isnan(n.resolution)
    assert n.describe() == f"The noise of `{METRIC}` is unknown (validation size unknown, no repeated seeds)."
    # One seed per setting: no spread either.
    single = verdicts.objective_noise(trials[trials["optim.lr"] == 0.1], METRIC, "_v", None, [DUP, "optim.lr"])
    assert math.isnan(single.seed_sd) and single.seed_groups == 0 and "unknown" in single.describe()
    # No values at all.
    empty = verdicts.objective_noise(trials.iloc[0:0], METRIC, "_v", 1000, [DUP])
    assert math.isnan(empty.at) and math.isnan(empty.binomial_se) and math.isnan(empty.resolution)


def test_objective_noise_with_a_missing_parameter_value() -> None:
    # A grid ablation with the baseline, as Experiment.noise() passes it: `arm` is among the params,
    # NaN for the PCL cells and "moco_v2" for the baseline.
    groups = {("dedupe", math.nan): [70.0, 72.5, 71.0], ("remap", math.nan): [66.0, 69.0, 67.0],
              ("dedupe", BASELINE_ARM): [60.0, 61.0, 63.5]}
    rows = [{DUP: dup, ARM_KEY: arm, SEED_KEY: s, "_v": v}
            for (dup, arm), vals in groups.items() for s, v in enumerate(vals)]
    n = verdicts.objective_noise(pd.DataFrame(rows), METRIC, "_v", 1000, [DUP, ARM_KEY])
    pooled = math.sqrt(sum(_var(g) * 2 for g in groups.values()) / 6)
    assert n.seed_groups == 3 and n.seed_sd == pytest.approx(pooled)


def test_noise_describe() -> None:
    trials, _ = _noise_trials()
    n = verdicts.objective_noise(trials, METRIC, "_v", 1000, [DUP, "optim.lr"])
    text = n.describe()
    assert text.startswith("Binomial standard error")
    assert "1000-image validation split" in text
    assert f"{n.binomial_se:.2f} points (at 80.0 %)" in text
    assert f"seed-to-seed standard deviation: {n.seed_sd:.2f} points (2 setting(s)" in text
    assert f"closer than {n.resolution:.1f} points" in text
    only_seeds = Noise(METRIC, None, 70.0, math.nan, 0.5, 3)
    assert "validation split" not in only_seeds.describe()
    assert only_seeds.describe().startswith("Seed-to-seed standard deviation: 0.50 points (3 setting(s)")
    assert only_seeds.resolution == pytest.approx(1.959964 * math.sqrt(2) * 0.5, rel=1e-6)


# --------------------------------------------------------------------------- baseline check (TPE search)


def _tpe(base_value: float = 65.0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Baseline ``b0`` ran 10 epochs; ``p1`` ran 20 (better later), ``p2`` 10, ``p3`` stopped at 5."""
    trials = pd.DataFrame({"trial_id": ["p1", "b0", "p2", "p3"], "status": ["finished", "finished", "stopped",
                                                                              "stopped"],
                           "epochs": [20, 10, 10, 5], ARM_KEY: [math.nan, BASELINE_ARM, math.nan, math.nan]})
    rows = [("p1", 10, 71.0), ("p1", 20, 90.0), ("b0", 10, base_value), ("p2", 10, 70.0), ("p2", 10, 72.0),
            ("p3", 5, 99.0)]
    return trials, pd.DataFrame(rows, columns=["trial_id", "epoch", METRIC])


def _noise(se: float) -> Noise:
    return Noise(METRIC, 1000, 72.0, se)


def test_baseline_check_at_the_baseline_epoch() -> None:
    trials, epochs = _tpe()
    c = verdicts.baseline_check(trials, epochs, METRIC, _noise(1.0))
    assert c is not None
    assert (c.pcl_trial, c.pcl_value, c.baseline_trial, c.baseline_value) == ("p2", 72.0, "b0", 65.0)
    assert c.epoch == 10 and c.pcl_trials == 2  # p1 and p2 reached epoch 10; p1's 90 at epoch 20 is not used
    assert c.gap == pytest.approx(7.0)
    assert c.noise.resolution == pytest.approx(1.959964 * math.sqrt(2), rel=1e-6)


@pytest.mark.parametrize(("base_value", "se", "verdict"), [
    (65.0, 1.0, "PCL beats MoCo v2"),     # gap +7 > 2.77
    (65.0, 3.0, "not resolved"),          # gap +7 < 8.32
    (80.0, 1.0, "MoCo v2 beats PCL"),     # gap -8 < -2.77
    (80.0, 3.0, "not resolved"),          # gap -8 > -8.32
    (72.0, 0.0, "not resolved"),          # equal: no gap beats a zero resolution
    (65.0, math.nan, "noise unknown"),
])
def test_baseline_check_verdict(base_value: float, se: float, verdict: str) -> None:
    trials, epochs = _tpe(base_value)
    c = verdicts.baseline_check(trials, epochs, METRIC, _noise(se))
    assert c is not None and c.verdict == verdict
    r = 1.959964 * math.sqrt(2) * se
    if not math.isnan(r):
        gap = 72.0 - base_value
        assert verdict == ("PCL beats MoCo v2" if gap > r else "MoCo v2 beats PCL" if gap < -r else "not resolved")
    s = c.sentence()
    assert f"`{METRIC}` 72.00 (trial p2) vs {base_value:.2f} (trial b0) at epoch 10" in s
    assert f"a gap of {_signed(72.0 - base_value)} points" in s
    assert ("**No PCL trial beats MoCo v2 alone**" in s) == (verdict == "MoCo v2 beats PCL")
    assert ("does **not** beat" in s) == (verdict == "not resolved")
    assert "best of the 2 PCL trials that reached epoch 10" in s


def test_baseline_check_for_a_min_metric() -> None:
    trials, epochs = _tpe(60.0)
    epochs = epochs.rename(columns={METRIC: "loss"})
    c = verdicts.baseline_check(trials, epochs, "loss", Noise("loss", None, math.nan, math.nan, 1.0))
    assert c is not None
    assert (c.pcl_trial, c.pcl_value) == ("p1", 71.0)  # the lowest loss at epoch 10
    assert c.gap == pytest.approx(-(71.0 - 60.0))
    assert c.verdict == "MoCo v2 beats PCL"


def test_baseline_check_none_without_a_baseline() -> None:
    trials, epochs = _tpe()
    assert verdicts.baseline_check(trials.drop(columns=[ARM_KEY]), epochs, METRIC, _noise(1.0)) is None
    no_base = trials.assign(**{ARM_KEY: math.nan})
    assert verdicts.baseline_check(no_base, epochs, METRIC, _noise(1.0)) is None
    not_run = trials.assign(epochs=[20, 0, 10, 5])
    assert verdicts.baseline_check(not_run, epochs, METRIC, _noise(1.0)) is None
    # No PCL trial reached the baseline's epoch.
    short = trials[trials["trial_id"].isin(["b0", "p3"])]
    assert verdicts.baseline_check(short, epochs, METRIC, _noise(1.0)) is None


# --------------------------------------------------------------------------- group comparisons


def _groups() -> pd.DataFrame:
    return pd.DataFrame({
        DUP: ["dedupe", "remap", "dedupe", "dedupe", "remap", math.nan, "dedupe"],
        "_value": [70.0, 66.04, 72.5, 71.0, 69.0, 55.5, 69.5],
    })


def test_with_points_lists_points_of_small_cells() -> None:
    d = _groups()
    table = ci_table(d, [DUP], "_value", orders={DUP: ["dedupe", "remap"]})
    before = table.copy()
    t = verdicts.with_points(table, d, [DUP], "_value")
    pd.testing.assert_frame_equal(table, before)  # the input is not modified
    rows = t.set_index(DUP)
    big = rows.loc["dedupe"]
    ref = mean_ci([70.0, 72.5, 71.0, 69.5])
    m, lo, hi = _ref_paired([70.0, 72.5, 71.0, 69.5])
    assert big["n"] == 4 and big["points"] == ""
    assert (big["ci_low"], big["ci_high"], big["mean"]) == pytest.approx((lo, hi, m))
    assert big["std"] == pytest.approx(ref["std"]) and big["ci_half"] == pytest.approx(hi - m)
    small = rows.loc["remap"]
    assert small["n"] == 2 and small["points"] == "66.0, 69.0"
    assert small["mean"] == pytest.approx(67.52)
    assert all(math.isnan(small[c]) for c in ("std", "ci_low", "ci_high", "ci_half"))
    unset = rows.loc[NOT_SET]
    assert unset["n"] == 1 and unset["points"] == "55.5"
    assert math.isnan(unset["ci_low"])


def test_with_points_threshold_is_three_replicates() -> None:
    d = pd.DataFrame({"g": ["a"] * 3 + ["b"] * 2, "v": [1.0, 2.0, 4.0, 5.0, 6.0]})
    t = verdicts.with_points(ci_table(d, ["g"], "v"), d, ["g"], "v").set_index("g")
    assert verdicts.MIN_INTERVAL == 3
    assert t.loc["a", "points"] == "" and not math.isnan(t.loc["a", "ci_low"])
    assert t.loc["b", "points"] == "5.0, 6.0" and math.isnan(t.loc["b", "ci_low"])


def test_with_points_two_columns() -> None:
    d = pd.DataFrame({"a": ["x", "x", "y", "x"], "b": [1, 1, 1, 2], "v": [1.0, 2.0, 3.0, 4.0]})
    t = verdicts.with_points(ci_table(d, ["a", "b"], "v"), d, ["a", "b"], "v")
    points = {(r["a"], r["b"]): r["points"] for _, r in t.iterrows()}
    assert points == {("x", 1): "1.0, 2.0", ("y", 1): "3.0", ("x", 2): "4.0"}


PARAMS = (
    Param(DUP, "choice", choices=("dedupe", "remap", "none")),
    Param("pcl.proto_loss", "choice", choices=("proto_nce", "topk")),
    Param("pcl.k", "int", 1, 5, when=(("pcl.proto_loss", ("topk",)),)),
    Param("optim.lr", "loguniform", 0.001, 0.1, log=True),
    Param("pcl.temperature", "uniform", 0.05, 0.3),
    Param(SEED_KEY, "int", 0, 10),
    Param(ARM_KEY, "choice", choices=("a", "b")),
    Param("model.width", "choice", choices=(16, 32)),
    Param("not.a.column", "choice", choices=(1, 2)),
)


def _search() -> pd.DataFrame:
    return pd.DataFrame({
        DUP: ["dedupe", "remap", "dedupe", "remap"],
        "pcl.proto_loss": ["proto_nce", "topk", "topk", "proto_nce"],
        "pcl.k": [math.nan, 2, 3, math.nan],
        "optim.lr": [0.01, 0.01, 0.05, 0.01],
        "pcl.temperature": [0.1, 0.1, 0.1, 0.1],
        SEED_KEY: [0, 1, 2, 3],
        ARM_KEY: [math.nan, "a", "b", math.nan],
        "model.width": [32, math.nan, 32, math.nan],
    })


def test_confounders() -> None:
    d = _search()
    assert verdicts.confounders(d, ["pcl.proto_loss"], PARAMS) == [DUP, "optim.lr"]
    assert verdicts.confounders(d, [DUP], PARAMS) == ["pcl.proto_loss", "pcl.k", "optim.lr"]
    assert verdicts.confounders(d, [DUP, "pcl.proto_loss", "optim.lr"], PARAMS) == []
    # Only the rows compared count: among the proto_nce trials lr does not vary.
    sub = d[d["pcl.proto_loss"] == "proto_nce"]
    assert verdicts.confounders(sub, [DUP], PARAMS) == []
