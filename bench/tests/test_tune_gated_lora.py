"""bench/tune_gated_lora.py's choice of the fused path's A-slice limit, with synthetic timings
(the tuner itself needs a GPU; its selection logic does not)."""

from __future__ import annotations

import math

from bench import tune_gated_lora as tune
from prism_fast.kernels import gated_lora as gl


class FakeProblem:
    """An op call whose time is a launch cost per stage plus, when fused, A streamed per tile."""

    def __init__(self, m: int, k: int, ns: list[int], us_per_a_elem: float, broken=()):
        self.m, self.k, self.ns = m, k, tuple(ns)
        self.us_per_a_elem, self.broken = us_per_a_elem, broken

    def config_for(self, table: dict) -> dict:
        return gl.config_for(self.m, self.k, self.ns, tune.RANK, "fake GPU", 132, table=table)

    def time_us(self, config: dict) -> float | None:
        fused = config["stages"] == [gl.STAGE_FUSED]
        if fused and self.k in self.broken:
            return None                                    # e.g. a config that fails to compile
        return 5.0 * len(config["stages"]) + (self.k * tune.RANK * self.us_per_a_elem
                                              if fused else 0.0)


def problems(us_per_a_elem: float, broken=()) -> list[FakeProblem]:
    return [FakeProblem(m, k, ns, us_per_a_elem, broken) for m in (1, 8, 64)
            for k, ns in tune.SHAPES]


def test_limit_stays_zero_when_fusing_never_pays():
    """Split is the default (limit 0): a GPU where fusing never pays keeps it."""
    table: dict = {}
    assert not tune.tune_fused_limit(problems(1 / 4096), table, math.inf)   # fused 64K: 21 > 10
    assert table == {}
    assert all(p.config_for(table)["stages"] != [gl.STAGE_FUSED] for p in problems(0.0))


def test_limit_rises_when_fusing_the_large_slice_pays_too():
    table: dict = {}
    assert tune.tune_fused_limit(problems(1 / 65536), table, math.inf)  # down (229K): 8.5 < 10
    assert table["fused_max_a_elems"] >= 14336 * tune.RANK


def test_limit_rises_only_as_far_as_it_pays_and_failures_never_win():
    table: dict = {}
    assert tune.tune_fused_limit(problems(1 / 16384), table, math.inf)  # 64K: 9 < 10; down: 19
    assert 4096 * tune.RANK <= table["fused_max_a_elems"] < 14336 * tune.RANK
    # Raising the limit further would fuse down_proj, whose fused config "fails": never chosen.
    table = {}
    assert tune.tune_fused_limit(problems(1 / 65536, broken=(14336,)), table, math.inf)
    assert 4096 * tune.RANK <= table["fused_max_a_elems"] < 14336 * tune.RANK
