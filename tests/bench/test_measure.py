"""flashattn.bench.measure.time_row: the interleaved rounds, on the CPU with a timer that records."""
import torch

from flashattn.bench import measure
from flashattn.bench.cases import Case
from flashattn.bench.peers import Peer

CASE = Case(dtype="fp32", batch=1, nheads=2, seqlen=16, headdim=8, causal=False, pass_="fwd")


def _peer(name: str, fail: bool = False, calls: list | None = None) -> Peer:
    """A peer whose attention records its name in `calls` when it runs."""
    def build(case, device):
        if fail:
            raise RuntimeError(f"{name} cannot run")
        return lambda q, k, v: calls.append(name) if calls is not None else q + k + v
    return Peer(name, "bnhd", build)


def test_rounds_interleave_with_the_order_reversed_and_keep_the_median():
    order, times = [], {"a": iter([3.0, 1.0, 2.0]), "b": iter([5.0, 4.0, 9.0])}

    def timer(calls, grads):
        calls[0]()
        return next(times[order[-1]])

    peers = [_peer("a", calls=order), _peer("b", calls=order)]
    results = measure.time_row(peers, CASE, torch.device("cpu"), timer, rounds=3)
    assert order == ["a", "b", "b", "a", "a", "b"]
    assert results["a"].ms == 2.0 and results["a"].rounds_ms == [3.0, 1.0, 2.0]
    assert results["b"].ms == 5.0 and results["b"].tflops == CASE.flops / 5.0 / 1e9


def test_a_failing_or_skipped_peer_leaves_the_others_measured():
    skipped = Peer("big", "bnhd", lambda case, device: None, max_seqlen=8)
    results = measure.time_row([_peer("bad", fail=True), skipped, _peer("good")], CASE, torch.device("cpu"),
                               lambda calls, grads: 1.0, rounds=2)
    assert list(results) == ["bad", "big", "good"]
    assert results["bad"].status == "error" and "cannot run" in results["bad"].error
    assert results["big"].status == "skipped"
    assert results["good"].ok and results["good"].ms == 1.0


def test_one_round_reports_no_round_list():
    result = measure.time_case(_peer("a"), CASE, torch.device("cpu"), lambda calls, grads: 1.5)
    assert result.ms == 1.5 and "rounds_ms" not in result.as_dict()
