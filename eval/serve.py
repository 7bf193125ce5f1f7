"""Serve a trained judge over HTTP: ``python -m eval.serve --model DIR [--host H] [--port P]``.

    python -m eval.serve --model runs/imagereward/checkpoint-001000 --host 0.0.0.0 --port 8000

FastAPI + uvicorn (the ``serve`` extra: ``pip install -e ".[serve]"``). Endpoints (docs/serving.md):

| endpoint | body | answer |
|---|---|---|
| ``GET /health`` | | 200 ``{"status": "ok"}`` once the model is loaded |
| ``GET /v1/model`` | | checkpoint, task, method, rating scale, sampling, limits, counters |
| ``GET /v1/models`` | | the OpenAI model list (one model) |
| ``POST /v1/score`` | ``{"items": [{"prompt", "images": [base64…], "seed"?}], "details"?}`` | ``{"results": [{"soft", "hard", "parsed", "reasoning", "anchor"}]}`` |
| ``POST /v1/compare`` | ``{"prompt", "images": [a, b], "seed"?}`` | one result and ``preferred`` (0 or 1) |
| ``POST /v1/rank`` | ``{"prompt", "images": [...], "seed"?}`` | ``{"ranking": [{"index", "soft", "hard", …}], "anchor"}``, best first |
| ``POST /v1/chat/completions`` | OpenAI chat with ``data:`` image URLs | the rollout's text, and ``scores`` |

Scores use the checkpoint's own task, rating scale and method (``eval.scale``), exactly as
``python -m eval.rank --model DIR --prompt P IMAGES…`` does: an item's ``soft`` equals that
command's ``ranking[].soft`` for the same seed. Images are PNG, JPEG or WebP bytes in base64 (or
a ``data:`` URL); the server never opens a path or fetches a URL it is sent. Concurrent requests
are coalesced into batched rollouts (``eval.coalesce``); a full queue answers 503 with
``Retry-After``; a request over a limit, an undecodable image, invalid JSON or a wrong type
answers 4xx; every rejection is ``{"error": "one line"}``. SIGINT/SIGTERM stop accepting
connections, finish the requests in flight, then exit.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import uuid
from contextlib import asynccontextmanager

import torch

from common.config import SamplingSpec
from common.errors import UserError, user_errors_exit
from eval.batch import DEFAULT_TOKEN_BUDGET, BatchScorer
from eval.coalesce import Coalescer, Overloaded
from eval.scale import parse_scale
from eval.score import METHODS, ScoringSpec
from eval.serve_io import Limits, RequestError, parse_chat, parse_group, parse_items, read_json

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
except ImportError:  # reported as one line by main()
    FastAPI = None


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


def create_app(scorer: BatchScorer, info: dict, limits: Limits, coalescer: Coalescer) -> FastAPI:
    """The FastAPI app: ``coalescer`` runs ``scorer`` on its worker; ``info`` is served at ``/v1/model``."""

    @asynccontextmanager
    async def lifespan(app):
        coalescer.start()
        yield
        coalescer.stop()  # after uvicorn has finished the requests in flight

    app = FastAPI(title="visual-preference judge", lifespan=lifespan, docs_url=None, redoc_url=None)
    # Prompts are checked on the thread pool while the worker's processor sets padding on its own
    # tokenizer; a copy that only ever encodes keeps the two from borrowing one Rust object at once.
    tokenizer = copy.deepcopy(scorer.processor.tokenizer)

    @app.exception_handler(RequestError)
    async def bad_request(request, exc: RequestError):
        return error(exc.status, exc.message)

    @app.exception_handler(Overloaded)
    async def overloaded(request, exc: Overloaded):
        return error(503, exc, headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(ClientDisconnect)
    async def gone(request, exc: ClientDisconnect):  # the body never arrived whole; nobody reads this
        return error(400, "the client disconnected before sending the whole body")

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return error(exc.status_code, exc.detail)

    @app.exception_handler(Exception)
    async def internal(request, exc: Exception):
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    async def score(payload_items) -> list:
        return await coalescer.submit(payload_items)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model_info():
        return {**info, "limits": limits.as_dict(), "batching": {"max_batch_items": coalescer.max_batch_items,
                "max_wait_ms": coalescer.max_wait_s * 1000, "max_queue_items": coalescer.max_queue_items,
                "token_budget": scorer.token_budget}, "stats": {**coalescer.stats, "queued_items":
                coalescer.queued_items, "rollouts": scorer.batches_run}}  # fmt: skip

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": info["model"], "object": "model", "created": 0,
                                            "owned_by": "visual-preference-grpo"}]}  # fmt: skip

    @app.post("/v1/score")
    async def score_items(request: Request):
        payload = await read_json(request, limits.max_body_bytes)
        items, details = await run_in_threadpool(parse_items, payload, limits, tokenizer)
        results = await score(items)
        return {"results": [result_json(r, details) for r in results]}

    @app.post("/v1/compare")
    async def compare(request: Request):
        payload = await read_json(request, limits.max_body_bytes)
        item = await run_in_threadpool(parse_group, payload, limits, tokenizer, 2)
        (result,) = await score([item])
        return {**result_json(result, False), "preferred": int(result.soft[1] > result.soft[0])}

    @app.post("/v1/rank")
    async def rank(request: Request):
        payload = await read_json(request, limits.max_body_bytes)
        item = await run_in_threadpool(parse_group, payload, limits, tokenizer, None)
        (result,) = await score([item])
        order = sorted(range(len(result.soft)), key=lambda i: -result.soft[i])
        return {"ranking": [{"rank": n, "index": i, "soft": result.soft[i], "hard": result.hard[i],
                             "parsed": result.parsed[i], "reasoning": result.reasoning[i]}
                            for n, i in enumerate(order, 1)], "anchor": result.anchor}  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        payload = await read_json(request, limits.max_body_bytes)
        item = await run_in_threadpool(parse_chat, payload, limits, tokenizer)
        (result,) = await score([item])
        text = "\n\n".join(q["texts"][0] for q in result.requests)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": info["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "scores": result_json(result, False),
        }  # fmt: skip

    return app


def result_json(result, details: bool) -> dict:
    """An ``ItemResult`` as JSON; ``details`` keeps every request's rollouts."""
    out = result.to_json()
    if not details:
        out.pop("requests")
    return out


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        prog="python -m eval.serve",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--model", required=True, help="checkpoint folder or hub id of a Qwen2.5-VL judge")
    add("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    add("--port", type=int, default=8000, help="port to listen on (default 8000)")
    add("--method", choices=METHODS, default=None, help="default: anchor for a pair checkpoint, else rating")
    add("--k", type=int, default=1, help="Mean@k: reasoning rollouts per question")
    add("--scale", help="rating scale, LO-HI or a comma list (default: the checkpoint's, else 1-7)")
    add("--max-new-tokens", type=int, default=SamplingSpec.max_new_tokens, help="completion length limit")
    add("--temperature", type=float, default=SamplingSpec.temperature, help="sampling temperature")
    add("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    add("--device", default="cpu", help="cpu | cuda | cuda:N (one process serves one device)")
    add("--max-pixels", type=int, default=None, help="cap on each image's area, as eval.rank's --max-pixels")
    add("--token-budget", type=int, default=DEFAULT_TOKEN_BUDGET, help="tokens per batched rollout")
    add("--max-batch-items", type=int, default=64, help="items coalesced into one batch at most")
    add(
        "--max-wait-ms",
        type=float,
        default=10.0,
        help="longest wait for a batch to fill, from its oldest request",
    )
    add("--max-queue-items", type=int, default=256, help="items waiting at most; beyond: 503 + Retry-After")
    add("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    Limits.add_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with user_errors_exit():
        if FastAPI is None:
            raise UserError('eval.serve needs FastAPI and uvicorn: pip install -e ".[serve]"')
        if args.threads:
            torch.set_num_threads(args.threads)
        try:
            limits = Limits.from_args(args)
            scale = parse_scale(args.scale) if args.scale else None
            ScoringSpec(args.method or "anchor", (), args.k, args.max_new_tokens, args.temperature)
            if args.max_queue_items < limits.max_items:  # else the largest request could never be queued
                raise ValueError(
                    f"--max-queue-items {args.max_queue_items} is below --max-items {limits.max_items}"
                )
        except ValueError as e:
            raise UserError(str(e)) from None
        scorer = BatchScorer.load(args.model, token_budget=args.token_budget, method=args.method, k=args.k,
                                  scale=scale, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  dtype=args.dtype, device=args.device, max_pixels=args.max_pixels)  # fmt: skip
        spec = scorer.spec
        info = {"model": args.model, "task": spec.task, "method": spec.method,
                "rating_values": list(spec.rating_values) or None, "k": spec.k,
                "max_new_tokens": spec.max_new_tokens, "temperature": spec.temperature, "dtype": args.dtype,
                "device": args.device,
                "max_pixels": scorer.processor.image_processor.size["longest_edge"]}  # fmt: skip
        coalescer = Coalescer(
            scorer.score, args.max_batch_items, args.max_wait_ms / 1000, args.max_queue_items
        )
        app = create_app(scorer, info, limits, coalescer)
    print(
        f"serving {args.model} ({spec.task}, {spec.method}) on http://{args.host}:{args.port}",
        file=sys.stderr,
    )
    # uvicorn finishes the requests in flight on SIGINT/SIGTERM, then re-raises the signal so that
    # the exit status says which one stopped it: -SIGTERM (143 in a shell), or KeyboardInterrupt.
    with user_errors_exit():
        uvicorn.run(
            app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=None
        )


if __name__ == "__main__":
    main()
