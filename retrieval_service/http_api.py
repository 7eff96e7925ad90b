"""Search-R1-compatible HTTP endpoint (aiohttp), fed by the same micro-batcher as gRPC.

    POST /retrieve {"queries": [...], "topk": 3, "return_scores": true}
    -> {"result": [[{"document": {"id": ..., "contents": "\"Title\"\ntext"}, "score": 0.83}, ...], ...]}
    (without return_scores each entry is the document itself, as in Search-R1's retrieval_server.py)
    GET /health -> {"status": "ok", "num_documents": N}

Errors: 400 with {"error": reason} for a bad request, 413 for an oversized body, 503 when the queue is full, 504
past the deadline (the request's queued work is dropped), 404/405 naming the endpoints. aiohttp speaks HTTP/1.1 with
keep-alive, so a client reuses its connection, and the listening socket gets a backlog sized for bursts of
connections (`backlog`, default 1024) instead of Python's http.server's 5. The event loop runs on its own thread;
waiting requests cost no thread each.
"""

import asyncio
import json
import socket
import threading
import time

from aiohttp import web

from retrieval_service.batcher import DeadlineExceeded, Job, MicroBatcher, Overloaded
from retrieval_service.server import ServiceLimits, retrieve_request_problem


def search_r1_document(doc) -> dict:
    return {"id": doc.id, "contents": doc.contents}


def search_r1_response(hits, return_scores: bool) -> dict:
    """hits: per query [(CorpusDocument, score)] -> Search-R1's response body."""
    if return_scores:
        return {"result": [[{"document": search_r1_document(d), "score": s} for d, s in q] for q in hits]}
    return {"result": [[search_r1_document(d) for d, _ in q] for q in hits]}


def _reply(status: int, body: dict) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode("utf-8"), content_type="application/json")


class SearchR1Handlers:
    def __init__(self, batcher: MicroBatcher, limits: ServiceLimits, default_top_k: int):
        self.batcher, self.limits, self.default_top_k = batcher, limits, default_top_k

    async def health(self, request: web.Request) -> web.Response:
        return _reply(200, {"status": "ok", "num_documents": len(self.batcher.searcher)})

    async def not_found(self, request: web.Request) -> web.Response:
        if request.path in ("/retrieve", "/health"):
            allowed = "POST" if request.path == "/retrieve" else "GET"
            return _reply(405, {"error": f"{request.method} {request.path} is not served; use {allowed}"})
        return _reply(404, {"error": f"no such endpoint {request.method} {request.path}; use POST /retrieve or "
                                     f"GET /health"})

    async def retrieve(self, request: web.Request) -> web.Response:
        limit = self.limits.max_message_bytes
        if (request.content_length or 0) > limit:
            return _reply(413, {"error": f"body of {request.content_length} bytes exceeds {limit}"})
        try:
            body = json.loads(await request.read() or b"null")
        except web.HTTPRequestEntityTooLarge:
            return _reply(413, {"error": f"body exceeds {limit} bytes"})
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _reply(400, {"error": f"body is not valid JSON: {e}"})
        if not isinstance(body, dict):
            return _reply(400, {"error": 'body must be a JSON object {"queries": [...], "topk": k}'})
        unknown = set(body) - {"queries", "topk", "return_scores"}
        if unknown:
            return _reply(400, {"error": f"unknown fields {sorted(unknown)}; expected queries, topk, return_scores"})
        queries = body.get("queries")
        top_k = body.get("topk") or self.default_top_k  # Search-R1: a missing/null topk means the server default
        problem = retrieve_request_problem(queries, top_k, self.limits)
        if problem:
            return _reply(400, {"error": problem.replace("top_k", "topk")})
        timeout = self.limits.request_timeout_s
        job = Job("retrieve", list(queries), top_k=top_k, deadline=time.monotonic() + timeout)
        try:
            future = self.batcher.submit(job)
        except Overloaded as e:
            return _reply(503, {"error": f"server overloaded: {e}"})
        try:
            hits = await asyncio.wait_for(asyncio.wrap_future(future), timeout)  # cancels the job on timeout
        except (asyncio.TimeoutError, DeadlineExceeded) as e:
            return _reply(504, {"error": f"no result within {timeout}s" + (f": {e}" if str(e) else "")})
        except Exception as e:
            return _reply(500, {"error": f"{type(e).__name__}: {e}"})
        return _reply(200, search_r1_response(hits, bool(body.get("return_scores", False))))


def listening_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A bound, listening TCP socket; port 0 picks a free one. OSError (naming the address) if it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart on the port of a just-stopped server
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot bind HTTP to {host}:{port}: {e.strerror}") from None
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class SearchR1HttpServer:
    """Serves POST /retrieve on a background event-loop thread. port 0 picks a free port (see `.port`)."""

    def __init__(self, batcher: MicroBatcher, limits: ServiceLimits, *, host: str, port: int,
                 default_top_k: int = 3, backlog: int = 1024):
        self._socket = listening_socket(host, port, backlog)
        self.port = self._socket.getsockname()[1]
        handlers = SearchR1Handlers(batcher, limits, default_top_k)
        self._app = web.Application(client_max_size=limits.max_message_bytes)
        self._app.add_routes([web.post("/retrieve", handlers.retrieve), web.get("/health", handlers.health),
                              web.route("*", "/{tail:.*}", handlers.not_found)])
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="http", daemon=True)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.SockSite(self._runner, self._socket).start())
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def start(self) -> None:
        self._thread.start()
        self._started.wait(timeout=30)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._socket.close()
