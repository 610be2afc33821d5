"""The control plane's HTTP server: Prometheus /metrics, /healthz, /readyz and the /cameras API.

One server a run (in the supervisor when there are worker processes), on `runtime.metrics_bind`,
off by default. It is aiohttp: one thread with an event loop serves every connection, and the
slow parts (a camera change, asking the workers) run on `CameraService`'s own thread or one
reader thread, so a scrape never waits behind a camera being removed. (The standard library's
http.server would mean a thread per connection and routing, bodies and errors written by hand.)

    GET    /healthz             200 "ok": the process answers (no token needed: liveness probes)
    GET    /readyz              200 when the model is loaded and every worker is up, else 503;
                                the cameras that are not running, with their state
    GET    /metrics             Prometheus text format (pipeline/exporter.py)
    GET    /cameras             every camera: state, frames, fps, drops, reconnects
    POST   /cameras             add a camera: a JSON object as in the config's cameras[] (201)
    DELETE /cameras/{id}        remove a camera; answers once its queued frames are published

Errors are JSON `{"error": "one line"}` with a 4xx status. With `runtime.api_token`, every path
but /healthz needs `Authorization: Bearer <token>` (401 otherwise); the token is compared in
constant time and never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest

from pipeline.exporter import render

from pipeline.cameras import CameraService, ChangeRefused
from pipeline.errors import PublishError

log = logging.getLogger("pipeline")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class HttpServer:
    def __init__(self, bind: str, service: CameraService, metrics, token: str | None = None):
        self.bind = bind
        self.service = service
        self.metrics = metrics  # () -> the /metrics body (bytes)
        self._token = token.encode() if token else None
        self._reads = ThreadPoolExecutor(1, thread_name_prefix="http-reads")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="http", daemon=True)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> "HttpServer":
        """Bind and serve; PublishError (exit 2, one line) when the address cannot be bound."""
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        except OSError as exc:
            self.stop()
            raise PublishError(f"runtime.metrics_bind: cannot bind {self.bind}: {exc.strerror or exc}") from None
        log.info("HTTP on http://%s:%d (/metrics, /healthz, /readyz, /cameras)%s", self.host_for_urls, self.port,
                 "" if self._token is None else ", bearer token required")
        return self

    @property
    def host_for_urls(self) -> str:
        host = self.bind.rsplit(":", 1)[0]
        return host

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._errors, self._auth], client_max_size=64 * 1024)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/cameras", self._cameras)
        app.router.add_post("/cameras", self._add)
        app.router.add_delete("/cameras/{camera}", self._remove)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        host, port = self.bind.rsplit(":", 1)
        site = web.TCPSite(self._runner, host.strip("[]"), int(port), reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def stop(self) -> None:
        if self._runner is not None and self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=5)
            except Exception:  # noqa: BLE001 - exiting anyway
                pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._reads.shutdown(wait=False, cancel_futures=True)

    # -- middlewares --------------------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except ChangeRefused as exc:
            return _error(exc.status, str(exc))
        except web.HTTPException as exc:  # aiohttp's own: unknown path, wrong method, body too large
            if exc.status == 404:
                return _error(404, f"no such endpoint: {request.method} {request.path} "
                              f"(/healthz, /readyz, /metrics, /cameras, /cameras/<id>)")
            if exc.status == 405:
                return _error(405, f"{request.method} is not allowed on {request.path}")
            return _error(exc.status, exc.reason)

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if self._token is not None and request.path != "/healthz":
            given = request.headers.get("Authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._token):
                response = _error(401, "missing or wrong bearer token (Authorization: Bearer <runtime.api_token>)")
                response.headers["WWW-Authenticate"] = 'Bearer realm="vapipe"'
                return response
        return await handler(request)

    # -- handlers -----------------------------------------------------------------------------
    async def _read(self, function, *args):
        return await asyncio.wrap_future(self._reads.submit(function, *args))

    async def _change(self, function, *args):
        return await asyncio.wrap_future(self.service.submit(function, *args))

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        state = await self._read(self.service.backend.ready)
        return web.json_response(state, status=200 if state["ready"] else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = await self._read(self.metrics)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _cameras(self, request: web.Request) -> web.Response:
        return web.json_response({"cameras": await self._read(self.service.backend.cameras)})

    async def _add(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.text())
        except ValueError as exc:
            return _error(400, f"POST /cameras: the body is not JSON ({exc})")
        entry = await self._change(self.service.add, body)
        return web.json_response(entry, status=201)

    async def _remove(self, request: web.Request) -> web.Response:
        entry = await self._change(self.service.remove, request.match_info["camera"])
        return web.json_response(entry, dumps=lambda value: json.dumps(value, default=str))


def start_control_plane(config, config_path: str, backend) -> tuple[CameraService, HttpServer | None]:
    """The camera service with SIGHUP on it, and the HTTP server when `runtime.metrics_bind` is set
    (the run's main process only: workers take orders from their supervisor). `/metrics` is the
    backend's families (pipeline/exporter.py) and prometheus-client's process metrics."""
    service = CameraService(backend, config_path)
    signal.signal(signal.SIGHUP, lambda _signum, _frame: service.request_reload())
    server = None
    if config.runtime.metrics_bind:
        registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=registry)  # process_cpu_seconds_total, resident memory, open fds

        def metrics() -> bytes:
            return render(backend.families()).encode() + generate_latest(registry)

        token = config.runtime.api_token.get_secret_value() if config.runtime.api_token else None
        server = HttpServer(config.runtime.metrics_bind, service, metrics, token).start()
    return service, server
