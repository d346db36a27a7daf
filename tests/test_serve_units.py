"""Pieces of the Serve app that need no Ray: the ingress's admission line and the request parser's two paths
(the fast one must give exactly what the checked one gives, and hand every doubtful body to it)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from scdrugmap_ray.serve.app import Admission, RequestError, _parse_checked, _parse_fast, parse_json_cells


def test_admission_runs_limit_holds_a_line_and_a_full_line_pushes_out_its_oldest() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        slots = Admission(limit=2, waiting=2, max_wait_s=5.0)
        assert await slots.enter() and await slots.enter()  # two run
        first = asyncio.create_task(slots.enter())  # two wait in line
        second = asyncio.create_task(slots.enter())
        await asyncio.sleep(0.01)
        assert not first.done() and not second.done() and slots.running == 2
        t0 = loop.time()
        third = asyncio.create_task(slots.enter())  # the line is full: the oldest waiter is refused at once
        assert not await first
        assert loop.time() - t0 < 0.05 and not third.done()
        slots.leave()  # a slot frees: handed to the first still waiting, the count of running stays
        assert await second and slots.running == 2 and not third.done()
        slots.leave()
        assert await third
        for _ in range(2):
            slots.leave()
        assert slots.running == 0 and not slots._line

    asyncio.run(scenario())


def test_admission_without_a_line_refuses_at_once() -> None:
    async def scenario() -> None:
        slots = Admission(limit=1, waiting=0, max_wait_s=5.0)
        assert await slots.enter()
        assert not await slots.enter()
        slots.leave()
        assert await slots.enter()

    asyncio.run(scenario())


def test_admission_wait_is_bounded_and_a_gone_client_gives_its_place_back(monkeypatch: pytest.MonkeyPatch) -> None:
    import scdrugmap_ray.serve.app as serve_app

    monkeypatch.setattr(serve_app, "STALL_WAIT_S", 0.3)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        slots = Admission(limit=1, waiting=2, max_wait_s=0.1)
        assert await slots.enter()
        t0 = loop.time()
        assert not await slots.enter()  # the line never moved: a stall is waited out up to STALL_WAIT_S
        assert 0.29 < loop.time() - t0 < 1.5
        gone = asyncio.create_task(slots.enter())  # a client that disconnects while waiting
        await asyncio.sleep(0.01)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert not slots._line
        slots.leave()
        assert slots.running == 0 and await slots.enter()  # the slot was not lost to the gone waiter

    asyncio.run(scenario())


def test_admission_tells_a_stall_from_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stall (no slot freed while a request waits) is waited out; a line that moves but too slowly for a
    request (load) refuses it after max_wait_s."""
    import scdrugmap_ray.serve.app as serve_app

    monkeypatch.setattr(serve_app, "STALL_WAIT_S", 2.0)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        slots = Admission(limit=1, waiting=2, max_wait_s=0.1)
        assert await slots.enter()
        stalled = asyncio.create_task(slots.enter())
        await asyncio.sleep(0.4)  # longer than max_wait_s, nothing freed: still waiting
        assert not stalled.done()
        slots.leave()  # the stall ends: the waiter gets the slot
        assert await stalled
        behind = [asyncio.create_task(slots.enter()) for _ in range(2)]  # the line moves, slowly
        await asyncio.sleep(0.05)
        t0 = loop.time()
        slots.leave()  # the first in line gets it, the second keeps waiting...
        assert await behind[0]
        assert not await behind[1]  # ...and is refused at max_wait_s: the line moved, too slowly
        assert loop.time() - t0 < 0.5

    asyncio.run(scenario())


def test_serve_config_sizes_slots_lines_and_replica_intake() -> None:
    from scdrugmap_ray.serve.app import ServeConfig

    one = ServeConfig(registry="r")  # the CLI's defaults: one CPU predictor replica, two ingress replicas
    assert (one.predictor_ongoing, one.ingress_admit, one.ingress_waiting) == (1, 1, 1)
    # the two ingress replicas' shares round up: the replica takes both, works on one at a time
    assert one.predictor_accepts == 2 and one.autoscaling_target == 1.0
    assert (one.predictor_slots, one.ingress_holds) == (1, 4)  # 4 closed-loop clients are never shed
    two = ServeConfig(registry="r", min_replicas=2, max_replicas=2)
    # a share of one slot each; either replica takes all that both ingress replicas send while the other is replaced
    assert (two.ingress_admit, two.predictor_accepts, two.predictor_slots, two.ingress_holds) == (1, 2, 2, 4)
    gpu = ServeConfig(registry="r", replica_gpus=1, max_batch_size=8)
    assert (gpu.predictor_ongoing, gpu.ingress_admit, gpu.predictor_accepts) == (8, 4, 8)
    own = ServeConfig(registry="r", max_ongoing_requests=3, max_queued_requests=5, target_ongoing_requests=2.5)
    assert (own.predictor_ongoing, own.ingress_admit, own.ingress_waiting, own.autoscaling_target) == (3, 2, 5, 2.5)


def _bodies(n: int, cells: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(300)] + ["HLA-A:1", "Ü-gene"]
    out = []
    for r in range(n):
        cs = []
        for c in range(cells):
            pick = rng.choice(len(genes), size=40, replace=False)
            expr = {genes[g]: (int(v) if v % 2 else float(v) / 3) for g, v in zip(pick, rng.integers(0, 9, 40),
                                                                                strict=True)}
            cs.append({"cell_id": f"r{r}:c{c}", "expression": expr})
        out.append(json.dumps({"model": "m@1", "cells": cs, "ignore_unknown_genes": bool(r % 2)},
                              ensure_ascii=False).encode())
    return out


def test_fast_parse_equals_the_checked_parse() -> None:
    for raw in _bodies(5, 50):
        fast, checked = _parse_fast(raw, 1000), _parse_checked(raw, 1000, (), None)
        assert fast is not None
        assert fast.ids == checked.ids and fast.model == checked.model and fast.lenient == checked.lenient
        assert list(fast.genes["symbol"]) == list(checked.genes["symbol"])
        assert fast.csr.shape == checked.csr.shape and (fast.csr != checked.csr).nnz == 0
        assert fast.csr.dtype == np.float32
    escaped = json.dumps(json.loads(raw))  # the same body with \u escapes: the checked path, same cells
    assert _parse_fast(escaped.encode(), 1000) is None
    assert parse_json_cells(escaped.encode(), 1000).ids == checked.ids


@pytest.mark.parametrize(("raw", "status", "needle"), [
    (b'{"model":"m","cells":[{"expression":{"A":1,"A":2}}]}', 422, "'A' appears twice"),
    # an escaped ':' in a string must not hide a repeated key from the fast path's count of colons
    (b'{"model":"m","cells":[{"cell_id":"a\\u003a","expression":{"A":1,"A":2}}]}', 422, "'A' appears twice"),
    (b'{"model":"m","model":"n","cells":[{"expression":{"A":1}}]}', 422, "'model' appears twice"),
    (b'{"model":"m","cells":[{"expression":{"A":1}}],"cells":[{"expression":{"B":1}}]}', 422,
     "'cells' appears twice"),
    (b'{"model":"m","cells":[{"expression":{"A":NaN}}]}', 422, "NaN is not a JSON number"),
    (b'{"model":"m","cells":[{"expression":{"A":1e999}}]}', 422, "not a number in [0, 2**53)"),
    (b'{"model":"m","cells":[{"expression":{"A":18446744073709551616}}]}', 422, "not a number in [0, 2**53)"),
    (b'{"model":"m","cells":[{"expression":{"A":-1}}]}', 422, "cells[0].expression.A: -1 is not a number"),
    (b'{"model":"m","cells":[{"expression":{"A":0}}]}', 422, "no cell has any non-zero"),
    (b'{"model":"m","cells":[{"cell_id":"x","expression":{"A":1}},{"cell_id":"x","expression":{"A":1}}]}', 422,
     "unique"),
    (b'{"model":"m","cells":[{"expression":{"A":1}},{"expression":{"A":1}}]}', 413, "at most 1"),
    (b'{"model":"m","cells":[]}', 422, "non-empty list"),
])
def test_doubtful_bodies_get_the_checked_paths_answer(raw: bytes, status: int, needle: str) -> None:
    max_cells = 1 if status == 413 else 10
    with pytest.raises(RequestError) as err:
        parse_json_cells(raw, max_cells)
    assert err.value.status == status and needle in err.value.message, err.value.message


def test_colons_in_strings_are_not_keys() -> None:
    raw = b'{"model" : "m:1", "cells" : [ {"cell_id" : "a:b:c", "expression" : {"HLA-A:1" : 2, "B" : 0}} ]}'
    cells = _parse_fast(raw, 10)
    assert cells is not None and cells.ids == ["a:b:c"] and list(cells.genes["symbol"]) == ["HLA-A:1"]
    assert cells.csr.toarray().tolist() == [[2.0]]
