"""The judge server under overload and shutdown (a real process on the tiny model, a small queue):
a full queue answers 503 with Retry-After and loses nothing, a retrying client gets every answer,
and SIGTERM finishes the requests in flight before the process exits."""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest
from conftest import solid

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (make test installs it)")
pytest.importorskip("fastapi", reason='the server needs the serve extra: pip install -e ".[serve]"')

from judge_server import png_b64, running_server  # noqa: E402

from eval.batch import Item  # noqa: E402
from eval.client import JudgeClient  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

QUEUE = ("--max-queue-items", "16", "--max-batch-items", "16", "--max-items", "16")
COLOURS = ("red", "green", "blue", "yellow")


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-load") / "server.log"
    with running_server(tiny_dir, log, *QUEUE) as (url, proc):
        yield url, proc


def body(n: int, items: int = 16) -> dict:
    """``items`` items of two images each: 32 ratings for 16, long enough to keep the worker busy."""
    return {"items": [{"prompt": f"request {n} item {i}", "seed": n,
                       "images": [png_b64(solid(c)) for c in COLOURS[i % 2 : i % 2 + 2]]} for i in range(items)]}  # fmt: skip


def concurrently(fn, n: int) -> list:
    out = [None] * n

    def run(i):
        out[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_a_full_queue_answers_503_with_retry_after_and_keeps_serving(server):
    url, _ = server
    answers = concurrently(lambda i: httpx.post(url + "/v1/score", json=body(i), timeout=120), 6)
    codes = [a.status_code for a in answers]
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
    for a in answers:
        if a.status_code == 503:
            assert a.headers["Retry-After"] == "1" and "queue full" in a.json()["error"]
        else:
            assert len(a.json()["results"]) == 16
    assert httpx.get(url + "/v1/model").json()["stats"]["refused"] >= 1
    assert httpx.post(url + "/v1/score", json=body(0), timeout=120).status_code == 200


def test_retrying_clients_lose_nothing_under_overload(server):
    url, _ = server
    items = [[Item(it["prompt"], [solid(c) for c in COLOURS[i % 2 : i % 2 + 2]], it["seed"])
              for i, it in enumerate(body(n)["items"])] for n in range(4)]  # fmt: skip
    clients = [JudgeClient(url, backoff_s=0.2) for _ in range(4)]
    got = concurrently(lambda i: clients[i].soft_scores(items[i]), 4)
    sequential = [JudgeClient(url).soft_scores(x) for x in items]
    for g, s in zip(got, sequential):
        np.testing.assert_allclose(g, s, rtol=0, atol=1e-5)
    assert sum(c.retried for c in clients) >= 1, "the queue was full at least once"


def test_sigterm_finishes_the_requests_in_flight(server):
    url, proc = server
    answers: dict[int, httpx.Response] = {}
    before = httpx.get(url + "/v1/model").json()["stats"]

    def send(i):
        answers[i] = httpx.post(
            url + "/v1/score", json=body(10 + i, items=8), timeout=120
        )  # both fit the queue

    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while (stats := httpx.get(url + "/v1/model").json()["stats"])["accepted"] < before["accepted"] + 2:
        assert time.monotonic() < deadline, "the requests never reached the queue"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert stats["jobs"] < before["jobs"] + 2, "a request was still in flight when SIGTERM came"
    for t in threads:
        t.join()
    assert [answers[i].status_code for i in range(2)] == [200, 200]
    assert all(len(answers[i].json()["results"]) == 8 for i in range(2))
    assert proc.wait(30) == -signal.SIGTERM  # after a graceful shutdown, uvicorn exits by the signal it got
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)
