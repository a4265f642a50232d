"""flashattn.bench.measure: the interleaved rounds, their spread, the reruns of a noisy cell, with timers
that return scripted times (no real timing, so nothing here can be flaky)."""
import pytest
import torch

from flashattn.bench import measure
from flashattn.bench.cases import Case
from flashattn.bench.peers import Peer

CASE = Case(dtype="fp32", batch=1, nheads=2, seqlen=16, headdim=8, causal=False, pass_="fwd")
STEADY = [1.0, 1.02, 0.99, 1.01, 1.0]          # spread 3%
NOISY = [1.0, 1.5, 1.0, 1.0, 1.0]              # spread 50%: one disturbed round


def _peer(name: str, fail: bool = False, calls: list | None = None) -> Peer:
    """A peer whose attention records its name in `calls` when it runs."""
    def build(case, device):
        if fail:
            raise RuntimeError(f"{name} cannot run")
        return lambda q, k, v: calls.append(name) if calls is not None else q + k + v
    return Peer(name, "bnhd", build)


def _scripted(*attempts: list[float]):
    """A round timer returning the given rounds one after the other, and the list of what it returned."""
    times = iter([t for rounds in attempts for t in rounds])
    returned = []

    def timer():
        returned.append(next(times))
        return returned[-1]
    return timer, returned


def test_rounds_interleave_with_the_order_reversed_after_one_warm_up_call():
    order, times = [], {"a": iter([2.0, 2.02, 1.98]), "b": iter([5.0, 4.9, 5.05])}

    def timer(calls, grads):
        calls[0]()
        return next(times[order[-1]])

    peers = [_peer("a", calls=order), _peer("b", calls=order)]
    results = measure.time_row(peers, CASE, torch.device("cpu"), timer, rounds=3)
    assert order == ["a", "b"] + ["a", "b", "b", "a", "a", "b"]     # warm-up calls, then the rounds
    assert results["a"].ms == 2.0 and results["a"].rounds_ms == [2.0, 2.02, 1.98]
    assert results["b"].ms == 5.0 and results["b"].tflops == CASE.flops / 5.0 / 1e9
    assert results["a"].reruns == 0 and results["a"].noisy is False
    assert results["a"].spread == pytest.approx(0.04 / 2.0)


def test_a_failing_or_skipped_peer_leaves_the_others_measured():
    skipped = Peer("big", "bnhd", lambda case, device: None, max_seqlen=8)
    results = measure.time_row([_peer("bad", fail=True), skipped, _peer("good")], CASE, torch.device("cpu"),
                               lambda calls, grads: 1.0, rounds=2)
    assert list(results) == ["bad", "big", "good"]
    assert results["bad"].status == "error" and "cannot run" in results["bad"].error
    assert results["big"].status == "skipped"
    assert results["good"].ok and results["good"].ms == 1.0 and results["good"].spread == 0.0


def test_one_round_has_no_spread_and_is_never_rerun():
    result = measure.time_case(_peer("a"), CASE, torch.device("cpu"), lambda calls, grads: 1.5)
    assert result.ms == 1.5 and result.rounds_ms == [1.5] and result.reruns == 0
    assert "spread" not in result.as_dict() and result.noisy is False


def test_spread_is_max_minus_min_over_the_median():
    assert measure.spread([1.0, 1.2, 0.9, 1.0, 1.1]) == pytest.approx(0.3)
    assert measure.spread([1.0, 1.2, 0.9, 1.0, 1.1], floor=0.5) == pytest.approx(0.7)
    assert measure.spread([1.0, 1.2, 0.9, 1.0, 1.1], floor=1.0) == pytest.approx(0.3)   # not lower: no effect
    assert measure.spread([2.0]) is None
    assert measure.format_spread(0.1) == "10%" and measure.format_spread(0.1001) == "11%"


def test_a_cell_noisy_then_steady_is_rerun_and_not_marked():
    timer, returned = _scripted(NOISY, STEADY)
    m = measure.time_rounds({"x": timer}, rounds=5)["x"]
    assert returned == NOISY + STEADY                      # one rerun, then it stopped
    assert m.ok and m.reruns == 1 and m.noisy is False
    assert m.rounds_ms == STEADY and m.ms == 1.0 and m.spread == pytest.approx(0.03)
    assert m.other_attempts_ms == [NOISY]
    assert measure.noise_mark(m) == ""
    d = m.as_dict()
    assert d["rounds_ms"] == STEADY and d["reruns"] == 1 and d["noisy"] is False and d["spread"] > 0


def test_a_cell_that_stays_noisy_is_marked_and_keeps_its_steadiest_attempt():
    attempts = [[1.0, 2.0, 1.0, 1.0, 1.0], [1.0, 1.2, 1.0, 1.0, 1.0], [3.0, 1.0, 1.0, 1.0, 1.0]]
    assert measure.MAX_RERUNS == len(attempts) - 1
    timer, returned = _scripted(*attempts)
    m = measure.time_rounds({"x": timer}, rounds=5)["x"]
    assert len(returned) == 15
    assert m.reruns == measure.MAX_RERUNS and m.noisy is True
    assert m.rounds_ms == attempts[1] and m.spread == pytest.approx(0.2)
    assert m.other_attempts_ms == [attempts[0], attempts[2]]
    assert measure.noise_mark(m) == " ~20%"


def test_a_steady_attempt_slower_than_an_earlier_one_does_not_clear_the_cell():
    """A disturbance that outlasts an attempt: its rounds agree with each other, not with the faster
    attempt before it, so the cell stays noisy (its spread counts the fastest attempt's median)."""
    fast = [100.0, 96.0, 100.0, 128.0, 247.0]                 # median 100
    slow = [230.0, 240.0, 235.0, 238.0, 232.0]                # spread 4% alone
    timer, _ = _scripted(fast, slow, slow)
    m = measure.time_rounds({"x": timer}, rounds=5)["x"]
    assert m.reruns == 2 and m.noisy is True
    assert m.rounds_ms == slow and m.spread == pytest.approx((240.0 - 100.0) / 235.0)
    # The same attempts the other way round: a slow, disturbed first attempt, then steady fast ones.
    timer, _ = _scripted([2.3, 1.0, 2.4, 2.35, 2.38], STEADY)
    m = measure.time_rounds({"x": timer}, rounds=5)["x"]
    assert m.reruns == 1 and m.noisy is False and m.rounds_ms == STEADY


def test_only_the_noisy_cells_are_rerun_interleaved_among_themselves():
    order = []

    def recording(name, *attempts):
        timer, _ = _scripted(*attempts)
        return lambda: order.append(name) or timer()

    timers = {"steady": recording("steady", STEADY[:3]), "noisy": recording("noisy", NOISY[:3], STEADY[:3]),
              "shaky": recording("shaky", NOISY[:3], STEADY[:3])}
    results = measure.time_rounds(timers, rounds=3)
    assert order[:9] == ["steady", "noisy", "shaky", "shaky", "noisy", "steady", "steady", "noisy", "shaky"]
    assert order[9:] == ["noisy", "shaky", "shaky", "noisy", "noisy", "shaky"]
    assert results["steady"].reruns == 0 and results["noisy"].reruns == 1 and results["shaky"].reruns == 1
    assert not any(m.noisy for m in results.values())


def test_a_failure_in_a_rerun_fails_the_cell():
    returned = []

    def timer():
        if len(returned) == len(NOISY):
            raise torch.OutOfMemoryError("out of memory")
        returned.append(NOISY[len(returned)])
        return returned[-1]

    m = measure.time_rounds({"x": timer}, rounds=5)["x"]
    assert m.status == "oom" and m.ms is None


def test_warm_up_calls_every_input_set_untimed_and_failures_there_fail_the_cell():
    calls = []
    prepared = {"ok": ([lambda: calls.append(0), lambda: calls.append(1)], []),
                "bad": ([lambda: 1 / 0], [])}
    results = measure.time_prepared(prepared, lambda calls_, grads: 1.0, rounds=2)
    assert calls == [0, 1]                   # the scripted timer itself calls nothing
    assert results["ok"].ok and results["bad"].status == "error" and "ZeroDivisionError" in results["bad"].error
