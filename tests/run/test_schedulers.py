"""The two schedules' contract, with stand-in drivers (no model, no study)."""

from types import SimpleNamespace

from evomerge.run.schedulers import AsyncSchedule, GenerationSchedule, make_schedule


class Generations:
    """A generation driver: two generations of three, then nothing."""

    asynchronous = False

    def __init__(self):
        self.asked, self.told = 0, []

    def ask(self):
        if self.asked == 2:
            return []
        self.asked += 1
        return [SimpleNamespace(i=(self.asked, k)) for k in range(3)]

    def tell(self, candidates, values):
        self.told.append(([c.i for c in candidates], values))


class OneAtATime:
    asynchronous = True

    def __init__(self, stop_after):
        self.asked, self.stop_after = 0, stop_after

    def ask(self):
        self.asked += 1
        return [SimpleNamespace(i=self.asked)]

    def should_stop(self):
        return self.asked >= self.stop_after


def outcome(v):
    return SimpleNamespace(values=[v])


def test_make_schedule_follows_the_driver():
    assert isinstance(make_schedule(OneAtATime(1)), AsyncSchedule)
    assert isinstance(make_schedule(Generations()), GenerationSchedule)


def test_a_generation_is_told_whole_in_order_and_its_results_are_held_until_the_hand_out():
    driver = Generations()
    s = GenerationSchedule(driver)
    a, b, c = s.next(), s.next(), s.next()
    assert s.next() is None and not s.exhausted  # the rest of the generation is being scored
    assert s.take(b, outcome(2.0)) is False and s.held == 1  # recorded later, not now
    s.known(a, outcome(1.0))  # a cached member
    s.take(c, outcome(3.0))
    assert s.complete() and driver.told == []
    assert [x for x, _ in s.flush()] == [b, c] and s.held == 0
    s.tell_complete()
    assert driver.told == [([(1, 0), (1, 1), (1, 2)], [[1.0], [2.0], [3.0]])]  # in the population's order
    assert not s.complete() and s.next().i == (2, 0)  # the next generation
    for _ in range(2):
        s.next()
    assert s.next() is None
    for member in s.generation:
        s.take(member, outcome(0.0))
    s.tell_complete()
    assert s.next() is None and s.exhausted and len(driver.told) == 2


def test_the_async_schedule_asks_until_the_driver_stops_and_records_at_once():
    s = AsyncSchedule(OneAtATime(stop_after=2))
    first = s.next()
    assert first.i == 1 and s.take(first, outcome(1.0)) is True and s.held == 0
    assert s.next().i == 2
    assert s.next() is None and s.exhausted
    assert s.flush() == [] and not s.complete()
