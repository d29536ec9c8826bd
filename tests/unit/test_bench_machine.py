"""The interpreter a benchmark result was measured on, to compare ratios across machines."""

from __future__ import annotations

import sys

from bench.machine import machine


def test_a_result_names_the_interpreter_that_ran_it_and_its_speed() -> None:
    facts = machine()
    assert facts["python_executable"] == sys.executable
    # CPU milliseconds of a fixed piece of work: builds of one Python version differ by a
    # fifth (bench/README.md, Finding 41).
    assert isinstance(facts["python_work_ms"], float)
    assert facts["python_work_ms"] > 0
