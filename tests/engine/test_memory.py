"""The memory plan's arithmetic (evomerge.engine.memory): strategies against
budgets on a GPU (offload needs host memory too), the caches auto keeps beside
lean, budgets as fractions or sizes, and a plan split over two devices."""

import pytest
import torch

from evomerge.engine.memory import DeviceBytes, MemoryPlan, budgets, choose, parse_budget
from evomerge.errors import EvomergeError

GPU = torch.device("cuda", 0)  # a plan only names devices; nothing is allocated


def gpu_plan(host_limit=None) -> MemoryPlan:
    part = DeviceBytes(live=10_000_000, sources=40_000_000, cache=90_000_000, temporaries=5_000_000)
    caches = {f"t{i}": (0, 30_000_000) for i in range(3)}
    return MemoryPlan([GPU], [part], host=40_000_000, model_bytes=10_000_000, caches=caches, host_limit=host_limit)


def test_each_strategy_needs_what_it_holds_on_a_gpu():
    plan = gpu_plan()
    assert plan.need("cached") == [145_000_000]
    assert plan.need("lean") == [55_000_000]
    assert plan.need("offload") == [15_000_000]  # the sources stay in host memory
    assert [choose(plan, "auto", [b]) for b in (145_000_000, 144_999_999, 54_999_999)] == ["cached", "lean", "offload"]
    with pytest.raises(EvomergeError, match=r"^the in-place merge does not fit: even offload: 15.0 MB on cuda:0"):
        choose(plan, "auto", [14_000_000])


def test_offload_needs_room_for_the_sources_in_host_memory():
    assert choose(gpu_plan(host_limit=50_000_000), "auto", [20_000_000]) == "offload"
    with pytest.raises(EvomergeError) as e:
        choose(gpu_plan(host_limit=30_000_000), "auto", [20_000_000])
    assert "offload's sources need 40.0 MB of host memory, 30.0 MB may be pinned" in str(e.value)
    assert len(str(e.value).splitlines()) == 1


def test_a_forced_strategy_that_does_not_fit_names_the_one_that_would():
    with pytest.raises(EvomergeError) as e:
        choose(gpu_plan(), "cached", [60_000_000])
    text = str(e.value)
    assert "cached: 145.0 MB on cuda:0" in text and "leanest: offload: 15.0 MB" in text and "memory: auto" in text


def test_auto_keeps_the_caches_that_fit_beside_lean_in_order():
    plan = gpu_plan()
    assert plan.cache_within([55_000_000]) == set()
    assert plan.cache_within([85_000_000]) == {"t0"}
    assert plan.cache_within([144_999_999]) == {"t0", "t1"}
    assert plan.cache_within([145_000_000]) == {"t0", "t1", "t2"}


def test_budgets_are_fractions_of_free_memory_or_bytes():
    cpu = [torch.device("cpu")]
    assert budgets(cpu, 5e9) == [5_000_000_000]
    half, most = budgets(cpu, 0.5)[0], budgets(cpu, None)[0]  # the default is 90%
    assert 0 < half < most
    assert parse_budget("70GB") == 70e9 and parse_budget("1.5GiB") == 1.5 * 2**30 and parse_budget(0.8) == 0.8
    for bad in ("lots", "-1GB", 0, "GB"):
        with pytest.raises(ValueError, match="budget|positive"):
            parse_budget(bad)


def test_a_model_split_over_two_devices_plans_each_part(llama):
    from test_inplace import recipe

    from evomerge.engine.merge import InPlaceMerger

    r = recipe("ties", llama)
    one = InPlaceMerger(r, allow_outside=True, memory="lean").memory_plan
    two = InPlaceMerger(r, allow_outside=True, device="cpu,cpu", memory="lean").memory_plan
    assert len(two.parts) == 2 and all(p.live > 0 and p.sources > 0 for p in two.parts)
    assert sum(p.live for p in two.parts) == one.parts[0].live
    assert sum(p.sources for p in two.parts) == one.parts[0].sources
    assert sum(p.cache for p in two.parts) == one.parts[0].cache
    assert max(two.need("lean")) < one.need("lean")[0]  # each device holds part of it
