"""The judge server (eval/serve.py) as a real process on the tiny model, called over real HTTP:
results equal ``eval.rank`` and the in-process batched scorer, the OpenAI client works unchanged,
16 concurrent clients get exactly their sequential answers, bad input is a one-line 4xx and the
server keeps serving. One server for the whole module."""

from __future__ import annotations

import base64
import json
import socket
import threading

import numpy as np
import pytest
import torch
from conftest import solid

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (make test installs it)")
pytest.importorskip("fastapi", reason='the server needs the serve extra: pip install -e ".[serve]"')
openai = pytest.importorskip(
    "openai", reason="the serve tests need the openai client (make test installs it)"
)

from judge_server import NEW_TOKENS, free_port, png_b64, running_server  # noqa: E402

from eval.adapters import FlowGRPOReward  # noqa: E402
from eval.batch import BatchScorer, Item  # noqa: E402
from eval.client import JudgeClient, JudgeError, request_chunks  # noqa: E402
from eval.rank import main as rank_main  # noqa: E402
from eval.serve import main as serve_main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LIMITS = ("--max-items", "8", "--max-images", "12", "--max-image-pixels", "300000", "--max-image-bytes",
          "1000000", "--max-prompt-tokens", "64", "--max-body-bytes", "4000000")  # fmt: skip
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")


LOG = {}  # the module's server log, for the tests that read it


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    LOG["path"] = tmp_path_factory.mktemp("serve") / "server.log"
    with running_server(tiny_dir, LOG["path"], *LIMITS) as (url, proc):
        yield url


@pytest.fixture(scope="module")
def local(tiny_dir):
    """The same judge in-process, loaded the way the server loads it."""
    return BatchScorer.load(str(tiny_dir), max_new_tokens=int(NEW_TOKENS))


def item_json(prompt: str, colours: list[str], seed: int = 0, size: int = 64) -> dict:
    return {"prompt": prompt, "images": [png_b64(solid(c, size)) for c in colours], "seed": seed}


def post(url: str, path: str, body, **kw) -> httpx.Response:
    if isinstance(body, (dict, list)):
        return httpx.post(url + path, json=body, timeout=120, **kw)
    return httpx.post(url + path, content=body, timeout=120, **kw)


def test_health_and_model_info(server):
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    info = httpx.get(server + "/v1/model").json()
    assert (info["task"], info["method"], info["rating_values"]) == (
        "rating",
        "rating",
        [1, 2, 3, 4, 5, 6, 7],
    )
    assert info["max_new_tokens"] == 8 and info["limits"]["max_items"] == 8


def test_score_equals_eval_rank_json(server, tmp_path):
    """The contract: an item's soft scores are ``eval.rank --json``'s ``ranking[].soft``, same seed,
    for PNG, JPEG and WebP bytes."""
    files = []
    for colour, fmt in (("red", "PNG"), ("green", "JPEG"), ("blue", "WEBP")):
        path = tmp_path / f"{colour}.{fmt.lower()}"
        solid(colour, 80).save(path, format=fmt)
        files.append(path)
    out = tmp_path / "rank.json"
    rank_main(["--model", str(server_model_dir(server)), "--prompt", "a red circle", "--seed", "5",
               "--max-new-tokens", NEW_TOKENS, "--json", str(out), *map(str, files)])  # fmt: skip
    ranked = {r["file"]: r["soft"] for r in json.loads(out.read_text())["ranking"]}
    body = {"items": [{"prompt": "a red circle", "seed": 5,
                       "images": [base64.b64encode(f.read_bytes()).decode() for f in files]}]}  # fmt: skip
    (result,) = post(server, "/v1/score", body).json()["results"]
    np.testing.assert_allclose(result["soft"], [ranked[str(f)] for f in files], rtol=0, atol=1e-5)
    assert len(result["hard"]) == len(result["parsed"]) == len(result["reasoning"]) == 3


def server_model_dir(url: str) -> str:
    return httpx.get(url + "/v1/model").json()["model"]


def test_http_equals_in_process_on_a_mixed_batch(server, local):
    items = [item_json("a red circle", ["red"]), item_json("two cats", ["blue", "green"], seed=2),
             item_json("a sunset over the sea", ["orange", "purple", "yellow"], seed=1, size=96)]  # fmt: skip
    got = post(server, "/v1/score", {"items": items, "details": True}).json()["results"]
    want = local.score([Item(it["prompt"], [solid(c, 96 if len(it["images"]) == 3 else 64) for c in cs], it["seed"])
                        for it, cs in zip(items, (["red"], ["blue", "green"], ["orange", "purple", "yellow"]))])  # fmt: skip
    for g, w in zip(got, want):
        np.testing.assert_allclose(g["soft"], w.soft, rtol=0, atol=1e-5)
        assert g["hard"] == w.hard and g["parsed"] == w.parsed
        assert [q["texts"] for q in g["requests"]] == [q["texts"] for q in w.requests]


def test_compare_and_rank_agree_with_score(server):
    one = item_json("a blue square", ["blue", "red", "green"], seed=4)
    (scored,) = post(server, "/v1/score", {"items": [one]}).json()["results"]
    ranking = post(server, "/v1/rank", one).json()["ranking"]
    assert [r["index"] for r in ranking] == sorted(range(3), key=lambda i: -scored["soft"][i])
    assert [r["soft"] for r in ranking] == sorted(scored["soft"], reverse=True)
    pair = {**one, "images": one["images"][:2]}
    compared = post(server, "/v1/compare", pair).json()
    assert compared["soft"] == pytest.approx(scored["soft"][:2], abs=1e-5)
    assert compared["preferred"] == int(compared["soft"][1] > compared["soft"][0])
    wrong = post(server, "/v1/compare", one)
    assert wrong.status_code == 422 and "expected 2 images" in wrong.json()["error"]


def test_the_openai_client_works_unchanged(server):
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [server_model_dir(server)]
    image = png_b64(solid("red"))
    answer = client.chat.completions.create(
        model="judge", seed=3,
        messages=[{"role": "user", "content": [{"type": "text", "text": "a red circle"},
                                               {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}]}],
    )  # fmt: skip
    (scored,) = post(server, "/v1/score", {"items": [{"prompt": "a red circle", "images": [image], "seed": 3}],
                                           "details": True}).json()["results"]  # fmt: skip
    assert answer.choices[0].message.content == scored["requests"][0]["texts"][0]
    assert answer.model_extra["scores"]["soft"] == pytest.approx(scored["soft"], abs=1e-5)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="judge", messages=[{"role": "user", "content": [
            {"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])  # fmt: skip


def test_sixteen_concurrent_clients_get_their_sequential_answers(server):
    rng = np.random.default_rng(0)
    bodies = []
    for n in range(48):
        items = [item_json(f"prompt {n} {i}", list(rng.choice(COLOURS, size=rng.integers(1, 3))), seed=int(n % 5))
                 for i in range(rng.integers(1, 3))]  # fmt: skip
        bodies.append({"items": items})
    sequential = [post(server, "/v1/score", b).json()["results"] for b in bodies]
    before = httpx.get(server + "/v1/model").json()["stats"]
    answers: dict[int, httpx.Response] = {}

    def client(c: int) -> None:
        with httpx.Client(timeout=120) as http:
            for n in range(c, len(bodies), 16):
                answers[n] = http.post(server + "/v1/score", json=bodies[n])

    threads = [threading.Thread(target=client, args=(c,)) for c in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(answers) == list(range(48)), "every request answered"
    for n, answer in answers.items():
        assert answer.status_code == 200, answer.text
        for got, want in zip(answer.json()["results"], sequential[n]):
            np.testing.assert_allclose(got["soft"], want["soft"], rtol=0, atol=1e-5)
            assert got["hard"] == want["hard"] and got["reasoning"] == want["reasoning"]
    after = httpx.get(server + "/v1/model").json()["stats"]
    assert after["jobs"] - before["jobs"] == 48
    assert after["batches"] - before["batches"] < 48, "concurrent requests were coalesced"


BAD = [
    (b"{not json", 400, "invalid JSON"),
    (b'{"items": 3}', 422, "expected list"),
    (b'{"items": []}', 422, "empty"),
    (b'{"items": [{"images": []}]}', 422, "missing 'prompt'"),
    (b'{"items": [{"prompt": 7, "images": ["x"]}]}', 422, "expected str"),
    (b'{"items": [{"prompt": "  ", "images": ["x"]}]}', 422, "prompt"),
    (b'{"items": [{"prompt": "a", "images": "abc"}]}', 422, "expected list"),
    (b'{"items": [{"prompt": "a", "images": ["%%%"]}]}', 422, "not valid base64"),
    (b'{"items": [{"prompt": "a", "images": ["/etc/hostname"]}]}', 422, "never opens a path"),
    (b'{"items": [{"prompt": "a", "images": ["https://example.com/x.png"]}]}', 422, "never fetches"),
    (b'{"items": [{"prompt": "a", "images": [3]}]}', 422, "expected a base64 string"),
    (b'{"items": [{"prompt": "a", "images": ["aGVsbG8="]}]}', 422, "bad image"),
    ({"items": [{"prompt": "a", "images": [png_b64(solid("red"))], "seed": -1}]}, 422, "seed"),
    ({"items": [{"prompt": "a", "images": [png_b64(solid("red"))]}] * 9}, 413, "over the limit of 8"),
    ({"items": [{"prompt": "a", "images": [png_b64(solid("red"))] * 13}]}, 413, "over the limit of 12"),
    ({"items": [{"prompt": "a", "images": [png_b64(solid("red", 600))]}]}, 413, "pixels"),
    ({"items": [{"prompt": "word " * 200, "images": [png_b64(solid("red"))]}]}, 413, "tokens"),
    ({"items": [{"prompt": "a", "images": [png_b64(solid("red"), "GIF")]}]}, 422, "GIF"),
    (b"x" * 4_100_000, 413, "request body"),
]


@pytest.mark.parametrize("body,status,fragment", BAD, ids=[f"{s}-{f}" for _, s, f in BAD])
def test_bad_input_is_a_one_line_4xx(server, body, status, fragment):
    answer = post(server, "/v1/score", body)
    assert answer.status_code == status, answer.text
    message = answer.json()["error"]
    assert fragment in message and "\n" not in message


def test_truncated_images_and_wrong_routes_then_still_serving(server):
    raw = base64.b64decode(png_b64(solid("red", 200)))
    for cut in (raw[: len(raw) // 2], raw[:40]):
        body = {"items": [{"prompt": "a", "images": [base64.b64encode(cut).decode()]}]}
        answer = post(server, "/v1/score", body)
        assert answer.status_code == 422 and answer.json()["error"].startswith("bad image items[0].images[0]")
    assert httpx.get(server + "/v1/score").status_code == 405
    assert httpx.get(server + "/nowhere").json() == {"error": "Not Found"}
    stream = post(server, "/v1/chat/completions", {"messages": [], "stream": True})
    assert stream.status_code == 422 and "stream" in stream.json()["error"]
    assert post(server, "/v1/score", {"items": [item_json("a", ["red"])]}).status_code == 200


def test_a_client_that_disconnects_does_not_stall_the_worker(server):
    host, port = server.removeprefix("http://").split(":")
    body = json.dumps({"items": [item_json(f"gone {i}", ["red", "blue"]) for i in range(4)]}).encode()
    head = f"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    for payload in (head.encode() + body, head.encode() + body[: len(body) // 2]):  # whole, then cut short
        with socket.create_connection((host, int(port))) as s:
            s.sendall(payload)
    answer = post(server, "/v1/score", {"items": [item_json("still here", ["green"])]})
    assert answer.status_code == 200 and len(answer.json()["results"][0]["soft"]) == 1
    assert httpx.get(server + "/v1/model").json()["stats"]["failed"] == 0
    assert "Traceback" not in LOG["path"].read_text()


def test_judge_client_flow_grpo_shape_equals_in_process(server, local):
    client = JudgeClient(server)
    images = torch.rand(4, 3, 40, 56)  # (B, 3, H, W) in [0, 1], as a diffusion decoder returns them
    prompts = ["a cat", "a dog", "a cat", "a bird"]
    scores, info = client(images, prompts, {"seed": 1})
    want, _ = FlowGRPOReward(local)(images, prompts, {"seed": 1})
    np.testing.assert_allclose(scores, want, rtol=0, atol=1e-5)
    assert info["method"] == "rating" and client.retried == 0
    with pytest.raises(JudgeError, match="422"):
        client.score([Item(" ", [solid("red")])])
    assert client.retried == 0, "a 4xx is not retried"


def test_judge_client_splits_a_list_beyond_the_server_limits(server, local):
    # the server takes at most 8 items and 12 images a request (LIMITS): 10 items of 1–2 images go as
    # several requests, and each item's scores are its in-process ones (seeded per item)
    items = [
        Item(f"a {c} thing", [solid(c)] * (1 + i % 2), seed=i)
        for i, c in enumerate(COLOURS + ("red", "blue"))
    ]
    client = JudgeClient(server)
    got = client.score(items)
    want = local.score(items)
    assert len(got) == len(items)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g["soft"], w.soft, rtol=0, atol=1e-5)


def test_request_chunks_respect_both_limits_in_order():
    items = [Item("p", [None] * n) for n in (1, 2, 3, 1, 5, 1)]
    chunks = request_chunks(items, max_items=3, max_images=5)
    assert [[len(it.images) for it in c] for c in chunks] == [[1, 2], [3, 1], [5], [1]]
    assert [it for c in chunks for it in c] == items
    assert request_chunks(items, None, None) == [items]


def test_judge_client_retries_with_backoff_then_gives_up():
    client = JudgeClient(f"http://127.0.0.1:{free_port()}", retries=2, backoff_s=0.05)
    with pytest.raises(JudgeError, match="no answer after 3 attempts"):
        client.health()
    assert client.retried == 2


@pytest.mark.parametrize(
    "argv,fragment",
    [(["--model", "runs/nope/checkpoint-000100"], "runs/nope"), (["--model", "x", "--max-items", "0"], "--max-items"),
     (["--model", "x", "--k", "0"], "≥ 1"), (["--model", "x", "--scale", "7-1"], "--scale"),
     (["--model", "x", "--max-queue-items", "8"], "below --max-items 64")],
)  # fmt: skip
def test_serve_command_errors_are_one_line(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_:
        serve_main(argv)
    assert exit_.value.code == 2
    (line,) = [x for x in capsys.readouterr().err.strip().splitlines() if x.startswith("error: ")]
    assert fragment in line
