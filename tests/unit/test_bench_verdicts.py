"""The benchmark's verdicts: which rate counts as sustained, the issue's targets against the
floor, and --compare's change per figure (bench/README.md, "The figures")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.compare import compare
from bench.report import targets
from bench.workloads import sustained

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def _step(kind: str, offered: float | None, stored_rate: float, accepted: int = 40,
          stored: int = 40) -> dict[str, Any]:
    return {"kind": kind, "offered_docs_per_s": offered, "stored_docs_per_s": stored_rate,
            "stored_mib_per_s": stored_rate * 0.0625, "accepted": accepted, "stored": stored}


def test_sustained_is_the_best_rate_the_pipeline_kept_up_with() -> None:
    steps = [
        _step("probe", None, 300.0),            # a closed-loop burst: never counts
        _step("step", 50.0, 50.0),
        _step("step", 100.0, 80.0),             # offered more than it took: capacity 80
        _step("step", 150.0, 70.0),
        _step("step", 200.0, 190.0, stored=39),  # one document never stored: not kept up
    ]
    best = sustained(steps)
    assert best is not None
    assert (best["docs_per_s"], best["step"]) == (80.0, 2)
    assert best["mib_per_s"] == pytest.approx(80.0 * 0.0625)
    assert sustained([_step("probe", None, 300.0)]) is None


def _result(small_docs_per_s: float | None, large_mib_per_s: float | None) -> dict[str, Any]:
    half = {"latency_ms": {"stored": {"p99": 16.0}, "accept": {"p99": 60.0}}}
    workloads: dict[str, Any] = {
        "small": {"sustained": {"docs_per_s": small_docs_per_s}, "half": half,
                  "peak_rss_mib": {"serve-worker": 120.0, "secantusd": 400.0}},
    }
    if large_mib_per_s is not None:
        workloads["large"] = {"sustained": {"mib_per_s": large_mib_per_s},
                              "peak_rss_mib": {"worker-storage-0": 149.0}}
    return {
        "floor": {
            "small": {"sequential": {"docs_per_s": 150.0, "mib_per_s": 9.4},
                      "concurrent": {"docs_per_s": 200.0, "mib_per_s": 12.5}},
            "large": {"sequential": {"docs_per_s": 2.0, "mib_per_s": 400.0},
                      "concurrent": {"docs_per_s": 2.5, "mib_per_s": 500.0}},
        },
        "modes": {"services": {"workloads": workloads}},
    }


def _verdicts(result: dict[str, Any]) -> dict[str, tuple[float | None, bool | None]]:
    """(value, met) by the target's opening words."""
    return {t["target"].split(" >=")[0].split(" <")[0]: (t["value"], t["met"])
            for t in targets(result)}


def test_targets_divide_by_the_floors_best_and_judge_each_limit() -> None:
    verdicts = _verdicts(_result(small_docs_per_s=100.0, large_mib_per_s=340.0))
    assert set(verdicts) == {
        "small: sustained throughput", "small: p99 upload->stored", "small: upload 202 p99",
        "large: MiB/s", "peak RSS of every docproc process"}
    # The floor's best of sequential and concurrent: 100 / 200 and 340 / 500.
    assert verdicts["small: sustained throughput"] == (0.5, True)
    large, met = verdicts["large: MiB/s"]
    assert large == pytest.approx(0.68)
    assert met is False
    assert verdicts["small: p99 upload->stored"] == (16.0, True)
    assert verdicts["small: upload 202 p99"] == (60.0, False)  # the limit is 50 ms
    # The database server is not a docproc process: its 400 MiB does not count.
    assert verdicts["peak RSS of every docproc process"] == (149.0, True)


def test_a_target_without_figures_is_neither_met_nor_missed() -> None:
    verdicts = _verdicts(_result(small_docs_per_s=None, large_mib_per_s=None))
    assert verdicts["small: sustained throughput"] == (None, None)
    assert verdicts["large: MiB/s"] == (None, None)


def _floor(small_docs_per_s: float) -> dict[str, Any]:
    return {"sequential": {"docs_per_s": 100.0, "mib_per_s": 6.25,
                           "latency_ms": {"p50": 6.0}, "cpu_s_per_doc": 0.002},
            "concurrent": {"docs_per_s": small_docs_per_s, "mib_per_s": 0.0}}


def test_a_floor_measured_beside_the_workload_is_the_one_its_ratio_uses() -> None:
    result = _result(small_docs_per_s=100.0, large_mib_per_s=None)
    small = result["modes"]["services"]["workloads"]["small"]
    # The run's start measured 200 documents/s; beside the workload the machine was slower.
    small["floor_beside"] = {"before": _floor(180.0), "after": _floor(140.0)}
    by_name = {t["target"]: t for t in targets(result)}
    verdict = by_name["small: sustained throughput >= 50% of the floor's"]
    assert verdict["floor"] == pytest.approx(160.0)  # the mean of before and after
    assert verdict["value"] == pytest.approx(100.0 / 160.0)
    assert verdict["met"] is True
    assert verdict["floor_measured"] == "beside the workload"
    assert verdict["against_start_floor"] == pytest.approx(0.5)
    # Without floors beside it, a workload's ratio is to the run's first floor.
    large = by_name["large: MiB/s >= 70% of the floor's"]
    assert large["floor_measured"] == "at the run's start"


def test_the_latest_full_run_keeps_its_verdicts() -> None:
    """The committed result, judged again by today's code, gives the verdicts it printed."""
    result = json.loads((RESULTS / "latest.json").read_text())
    assert targets(result) == result["targets"]


def test_compare_prints_the_change_of_every_figure(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    old = _result(small_docs_per_s=100.0, large_mib_per_s=None)
    new = _result(small_docs_per_s=90.0, large_mib_per_s=None)
    new["floor"]["small"]["concurrent"]["docs_per_s"] = 250.0
    old_path = tmp_path / "old.json"
    old_path.write_text(json.dumps(old))
    compare(old_path, new)
    lines = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()
             if line.startswith(("services/", "floor/"))}
    assert lines["services/small/sustained/docs_per_s"] == ["100.000", "90.000", "-10.0%"]
    assert lines["floor/small/concurrent/docs_per_s"] == ["200.000", "250.000", "+25.0%"]
    assert lines["services/small/half/stored/p99_ms"] == ["16.000", "16.000", "+0.0%"]


def test_compare_shows_the_floors_beside_a_workload(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    old = _result(small_docs_per_s=100.0, large_mib_per_s=None)
    new = _result(small_docs_per_s=100.0, large_mib_per_s=None)
    for result, before in ((old, 180.0), (new, 240.0)):
        result["modes"]["services"]["workloads"]["small"]["floor_beside"] = {
            "before": _floor(before), "after": _floor(150.0)}
    old_path = tmp_path / "old.json"
    old_path.write_text(json.dumps(old))
    compare(old_path, new)
    lines = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()
             if line.startswith("services/small/floor_")}
    assert lines == {"services/small/floor_before/docs_per_s": ["180.000", "240.000", "+33.3%"],
                     "services/small/floor_after/docs_per_s": ["150.000", "150.000", "+0.0%"]}
