"""``ptjax serve``: trained runs on one frozen model behind an HTTP/JSON server (aiohttp,
the ``serve`` extra; docs/serving.md says why), requests of every run batched together.

    POST /v1/predict  {"run": RUN_DIR | task name | index, "inputs": text,
                       "fields": {name: text}, "candidates": [...], "k": member}
      a rank-classification run -> {"run", "k", "classes", "scores", "probabilities",
                                    "prediction"}  (``MultiRun.score``'s answer)
      a run decoded greedily     -> {"run", "k", "text"}  (``MultiRun.generate``'s)
    GET /v1/runs     each run's task, method, kind, members
    GET /health      200 {"status": "ready"} (503 while stopping)
    GET /metrics     requests by status, batch sizes, latency percentiles, compiles

Requests wait in one bounded queue (full: 429); a collector takes them for a short
window (or until a batch's rows are full) and one model thread runs them through
``MultiRun.answer`` in shared batches of fixed shapes (``MultiRun.buckets``: every
kind's columns as wide as its widest run, batch sizes from a few buckets), all compiled
by ``warm_up`` before the server listens: after it, no request compiles anything, which
/metrics counts (``compiles_after_warm_up``: lowerings of jitted functions in the
server's threads, from ``jax.monitoring``). A request is checked and encoded before it
queues (``parse_request``, ``MultiRun.prepare``), so a bad one is a 4xx with a one-line
JSON error and never reaches a batch; a batch that fails answers its requests 500 and the
server goes on. A request not answered within the timeout gets 504; on SIGTERM or SIGINT
the server answers new requests 503 and finishes those in flight.
"""
from __future__ import annotations

import asyncio
import collections
import importlib.util
import itertools
import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

from ptjax.errors import PtjaxError
from ptjax.multirun import MultiRun

SIZES = (1, 2, 4, 8, 16, 32)  # batch-size buckets (rows), the default
FIELDS = ("run", "inputs", "fields", "candidates", "k")
# jax.monitoring's event for a jitted function lowered to MLIR: once per jit-cache miss
# (a new function or new shapes), whether or not the persistent cache then has the binary
LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_COMPILES = collections.Counter()  # thread name -> lowerings in it
_LISTENING = threading.Lock()
_LISTENERS = []  # [_on_event] once registered
_IDS = itertools.count()


def require_aiohttp():
    """A one-line error when the serve extra is not installed."""
    if importlib.util.find_spec("aiohttp") is None:
        raise PtjaxError("ptjax serve needs aiohttp: pip install 'ptjax[serve]' (or pip "
                         "install aiohttp)")


def _on_event(event: str, duration: float, **kwargs):
    if event == LOWERING_EVENT:
        _COMPILES[threading.current_thread().name] += 1


def _listen():
    """Counts lowerings per thread (registered once per process)."""
    with _LISTENING:
        if not _LISTENERS:
            jax.monitoring.register_event_duration_secs_listener(_on_event)
            _LISTENERS.append(_on_event)


def compiles(prefix: str) -> int:
    """Lowerings so far in threads whose name starts with ``prefix``."""
    return sum(n for name, n in list(_COMPILES.items()) if name.startswith(prefix))


class RequestError(Exception):
    """A request refused: HTTP status and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Overloaded(Exception):
    """The queue is full (429)."""


class Stopping(Exception):
    """The server is shutting down (503)."""


def parse_request(body: bytes) -> dict:
    """A POST body -> the request dict, or RequestError: 400 for what is not a JSON
    object, 422 for a missing field, an unknown one or a wrong type."""
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not JSON ({e})") from None
    if not isinstance(req, dict):
        raise RequestError(400, f"the body must be a JSON object, not {type(req).__name__}; "
                                f"fields: {', '.join(FIELDS)}")
    unknown = sorted(set(req) - set(FIELDS))
    if unknown:
        raise RequestError(422, f"unknown field {unknown[0]!r}; valid: {', '.join(FIELDS)}")
    missing = [f for f in ("run", "inputs") if f not in req]
    if missing:
        raise RequestError(422, f"missing field {missing[0]!r}; a request needs 'run' "
                                "(run directory, task name or index) and 'inputs' (text)")

    def wrong(name, want):
        return RequestError(422, f"field {name!r} must be {want}, not "
                                 f"{json.dumps(req[name])[:60]}")
    if isinstance(req["run"], bool) or not isinstance(req["run"], (str, int)):
        raise wrong("run", "a run directory, a task name or an index")
    if not isinstance(req["inputs"], str):
        raise wrong("inputs", "a string")
    fields = req.get("fields")
    if fields is not None and not (isinstance(fields, dict)
                                   and all(isinstance(v, str) for v in fields.values())):
        raise wrong("fields", "an object of strings")
    cands = req.get("candidates")
    if cands is not None and not (isinstance(cands, list) and cands
                                  and all(isinstance(c, str) for c in cands)):
        raise wrong("candidates", "a non-empty list of strings")
    k = req.get("k")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int)):
        raise wrong("k", "an integer (a member of the run)")
    return req


def percentiles(values, qs=(50, 90, 99)) -> dict:
    """{"p50": ..., ...} of ``values`` (None when there are none)."""
    if not len(values):
        return {f"p{q}": None for q in qs}
    return {f"p{q}": float(np.percentile(values, q)) for q in qs}


class Metrics:
    """Counts kept by the event loop: requests by status, batches by requests and rows,
    latencies (seconds, the last ``keep``)."""

    def __init__(self, keep: int = 10000):
        self.started = time.time()
        self.status = collections.Counter()
        self.kinds = collections.Counter()
        self.batch_requests = collections.Counter()
        self.batch_rows = collections.Counter()
        self.padded_rows = 0
        self.rows = 0
        self.failed_batches = 0
        self.latency = collections.deque(maxlen=keep)

    def request(self, status: int, seconds: float):
        self.status[status] += 1
        self.latency.append(seconds)

    def batch(self, prepared, sizes, failed: bool = False):
        """A batch of prepared requests, its rows per kind padded to ``sizes``'
        buckets (``pipeline.bucketed_batches``)."""
        self.failed_batches += failed
        rows = collections.Counter()
        for p in prepared:
            rows[p.kind] += _rows(p)
            self.kinds[p.kind] += 1
        self.batch_requests[len(prepared)] += 1
        self.batch_rows[sum(rows.values())] += 1
        self.rows += sum(rows.values())
        for n in rows.values():
            full, rest = divmod(n, sizes[-1])
            self.padded_rows += full * sizes[-1] + (
                next(s for s in sizes if s >= rest) if rest else 0)

    def snapshot(self) -> dict:
        ms = [x * 1e3 for x in self.latency]
        batches = sum(self.batch_requests.values())
        return {
            "uptime_s": time.time() - self.started,
            "requests": sum(self.status.values()),
            "by_status": {str(k): v for k, v in sorted(self.status.items())},
            "by_kind": dict(self.kinds),
            "latency_ms": percentiles(ms),
            "batches": batches,
            "failed_batches": self.failed_batches,
            "batch_requests": {str(k): v for k, v in sorted(self.batch_requests.items())},
            "batch_rows": {str(k): v for k, v in sorted(self.batch_rows.items())},
            "mean_batch_requests": (sum(k * v for k, v in self.batch_requests.items())
                                    / batches if batches else None),
            "padding": (1 - self.rows / self.padded_rows) if self.padded_rows else None,
        }


def _rows(prepared) -> int:
    return len(next(iter(prepared.arrays.values())))


class Batcher:
    """Dynamic batching: ``submit`` queues an item (QueueFull -> Overloaded); ``run``
    takes the first waiting item, waits ``window_s`` for more (unless ``max_rows`` are
    there), and calls ``fn(items) -> results`` on ``executor``; each item's future gets
    its result, or the batch's exception; then ``on_batch(items, failed)``. Items whose
    caller gave up are dropped."""

    def __init__(self, fn, *, max_rows: int, window_s: float, queue_size: int, executor,
                 on_batch=None):
        self.fn, self.max_rows, self.window_s = fn, max_rows, window_s
        self.queue = asyncio.Queue(queue_size)
        self.executor, self.on_batch = executor, on_batch
        self.in_flight = 0
        self._carry = None  # an item taken from the queue that the last batch had no room for

    def submit(self, item, rows: int) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((item, rows, fut))
        except asyncio.QueueFull:
            raise Overloaded(f"the queue is full ({self.queue.maxsize} requests waiting); "
                             "retry later") from None
        return fut

    def _take(self, batch: list, rows: int) -> int:
        """Waiting items appended to ``batch`` while they fit in max_rows (one that does
        not is kept for the next batch)."""
        while rows < self.max_rows and (self._carry or not self.queue.empty()):
            item = self._carry or self.queue.get_nowait()
            self._carry = None
            if rows + item[1] > self.max_rows:
                self._carry = item
                break
            batch.append(item)
            rows += item[1]
        return rows

    async def run(self):
        loop = asyncio.get_running_loop()
        while True:
            first, self._carry = self._carry or await self.queue.get(), None
            batch = [first]
            rows = self._take(batch, first[1])
            if rows < self.max_rows and self.window_s > 0:
                await asyncio.sleep(self.window_s)
                self._take(batch, rows)
            batch = [b for b in batch if not b[2].done()]  # timed out while waiting
            if not batch:
                continue
            items = [b[0] for b in batch]
            self.in_flight = len(batch)
            failed = False
            try:
                results = await loop.run_in_executor(self.executor, self.fn, items)
            except Exception as e:  # the batch's requests answer 500; the loop goes on
                failed = True
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
            else:
                for (_, _, fut), r in zip(batch, results):
                    if not fut.done():
                        fut.set_result(r)
            finally:
                self.in_flight = 0
            if self.on_batch is not None:
                self.on_batch(items, failed)


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class Server:
    """Runs of one ``MultiRun`` served over HTTP. sizes: batch-size buckets (rows);
    window_ms: how long the first request of a batch waits for others; queue_size:
    requests waiting at most (then 429); timeout_s: a request's answer at the latest
    (then 504); max_body: bytes of a request body at most (then 413)."""

    def __init__(self, multi: MultiRun, sizes=SIZES, window_ms: float = 2.0,
                 queue_size: int = 256, timeout_s: float = 30.0, max_body: int = 1 << 20):
        self.multi = multi
        self.window_s, self.queue_size = window_ms / 1e3, queue_size
        self.timeout_s, self.max_body = timeout_s, max_body
        self.sizes = tuple(sizes)
        self.threads = f"ptjax-serve{next(_IDS)}-"
        self.model = ThreadPoolExecutor(1, thread_name_prefix=self.threads + "model")
        self.encoder = ThreadPoolExecutor(1, thread_name_prefix=self.threads + "encode")
        self.metrics = Metrics()
        self.state = "new"
        self.buckets = None
        self.warm = {}
        self.batcher = None
        self.pending = 0  # predict requests being answered (the event loop's count)
        _listen()

    # ------------------------------------------------------------------ the model side

    def warm_up(self) -> dict:
        """Every run's sample request encoded, the buckets fixed and compiled (in the
        model thread, as serving runs them). -> {"seconds", "compiles"}."""
        t0 = time.perf_counter()

        def work():
            samples = [self.multi.sample(i) for i in range(len(self.multi.runs))]
            self.buckets = self.multi.buckets(self.sizes, samples)
            self.multi.warm_up(self.buckets, samples)
            self.multi.answer(samples, buckets=self.buckets)  # the answers' own path
            return samples
        self.samples = self.model.submit(work).result()
        self.warm = {"seconds": time.perf_counter() - t0, "compiles": compiles(self.threads)}
        self.state = "ready"
        return self.warm

    def _answer(self, prepared: list) -> list:
        """A batch of prepared requests (one example each) -> their answers."""
        return [a[0] for a in self.multi.answer(prepared, buckets=self.buckets)]

    def _prepare(self, req: dict):
        """A parsed request checked against the runs and encoded (RequestError: 404 for
        a run not served, 422 for the rest)."""
        try:
            self.multi.index(req["run"])
        except PtjaxError as e:
            raise RequestError(404, one_line(e)) from None
        try:
            prepared = self.multi.prepare([req])[0]
        except PtjaxError as e:
            raise RequestError(422, one_line(e)) from None
        rows = _rows(prepared)
        if rows > self.buckets.sizes[-1]:
            raise RequestError(422, f"the request makes {rows} rows (candidates x label "
                                    f"words); the largest batch is {self.buckets.sizes[-1]}")
        return prepared

    def runs(self) -> list:
        out = []
        for run, sample in zip(self.multi.runs, self.samples):
            out.append({"run": run.run_dir, "task": run.config.task.name,
                        "method": run.method.name, "kind": sample.kind, "members": run.K,
                        "best_member": run.best_member,
                        **({"classes": list(sample.dev.candidates[0])}
                           if sample.kind != "generate" else {})})
        return out

    def snapshot(self) -> dict:
        now = compiles(self.threads)
        return {**self.metrics.snapshot(), "state": self.state,
                "queue": self.batcher.queue.qsize() if self.batcher else 0,
                "queue_size": self.queue_size,
                "in_flight": self.batcher.in_flight if self.batcher else 0,
                "batch_sizes": list(self.buckets.sizes) if self.buckets else [],
                "warm_up_s": self.warm.get("seconds"),
                "compiles_warm_up": self.warm.get("compiles"),
                "compiles_after_warm_up": now - self.warm.get("compiles", now)}

    # ------------------------------------------------------------------ HTTP

    def app(self):
        """The aiohttp application (warm_up first)."""
        from aiohttp import web  # noqa: PLC0415 (optional: the serve extra)

        if self.state != "ready":
            raise PtjaxError("Server.app: call warm_up() first")

        def error(status: int, message: str, **headers):
            return web.json_response({"error": message}, status=status, headers=headers)

        @web.middleware
        async def json_errors(request, handler):
            try:
                return await handler(request)
            except web.HTTPException as e:  # no route, wrong method, a body too large
                if e.status < 400:
                    raise
                return error(e.status, f"{e.reason}: {request.method} {request.path}")

        async def predict(request):
            t0 = time.perf_counter()
            status, body, headers = 200, None, {}
            self.pending += 1
            try:
                if self.state != "ready":
                    raise Stopping("the server is shutting down")
                req = parse_request(await request.read())
                loop = asyncio.get_running_loop()
                prepared = await loop.run_in_executor(self.encoder, self._prepare, req)
                fut = self.batcher.submit(prepared, _rows(prepared))
                body = await asyncio.wait_for(fut, self.timeout_s)
            except RequestError as e:
                status, body = e.status, {"error": str(e)}
            except Overloaded as e:
                status, body, headers = 429, {"error": str(e)}, {"Retry-After": "1"}
            except Stopping as e:
                status, body = 503, {"error": str(e)}
            except asyncio.TimeoutError:
                status, body = 504, {"error": f"no answer within {self.timeout_s:g} s"}
            except web.HTTPException as e:  # a body over max_body
                status, body = e.status, {"error": f"{e.reason} (at most {self.max_body} "
                                                   "bytes)"}
            except Exception as e:  # a failed batch: its requests only
                status, body = 500, {"error": f"{type(e).__name__}: {one_line(e)}"}
            finally:
                self.pending -= 1
            self.metrics.request(status, time.perf_counter() - t0)
            return web.json_response(body, status=status, headers=headers)

        async def health(request):
            ok = self.state == "ready"
            return web.json_response({"status": self.state, "runs": len(self.multi.runs)},
                                     status=200 if ok else 503)

        async def metrics(request):
            return web.json_response(self.snapshot())

        async def runs(request):
            return web.json_response({"runs": self.runs()})

        async def start(app):
            self.batcher = Batcher(self._answer, max_rows=self.buckets.sizes[-1],
                                   window_s=self.window_s, queue_size=self.queue_size,
                                   executor=self.model,
                                   on_batch=lambda items, failed: self.metrics.batch(
                                       items, self.buckets.sizes, failed))
            self._task = asyncio.get_running_loop().create_task(self.batcher.run())

        async def cleanup(app):
            self._task.cancel()
            self.encoder.shutdown(wait=False)

        app = web.Application(client_max_size=self.max_body, middlewares=[json_errors])
        app.router.add_post("/v1/predict", predict)
        app.router.add_get("/v1/runs", runs)
        app.router.add_get("/health", health)
        app.router.add_get("/metrics", metrics)
        app.on_startup.append(start)
        app.on_cleanup.append(cleanup)
        return app

    async def run(self, bind, listening=None, signals=()):
        """Serves until ``stop()`` or one of ``signals``, then shuts down gracefully
        (new requests 503, those queued and in flight answered). bind: aiohttp runner ->
        its site; listening: called once the site accepts connections."""
        from aiohttp import web  # noqa: PLC0415 (optional: the serve extra)

        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=self.timeout_s)
        await runner.setup()
        try:
            await bind(runner).start()
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            for sig in signals:
                self._loop.add_signal_handler(sig, self._stop.set)
            if listening is not None:
                listening()
            await self._stop.wait()
            # still listening: new requests 503 while those already in answer
            self.state = "stopping"
            end = time.monotonic() + self.timeout_s
            while self.pending and time.monotonic() < end:
                await asyncio.sleep(0.01)
        finally:
            await runner.cleanup()

    def stop(self):
        """Ends ``run`` (from any thread)."""
        self._loop.call_soon_threadsafe(self._stop.set)

    def serve(self, host: str = "127.0.0.1", port: int = 8000, ready=None):
        """Listens on host:port until SIGTERM or SIGINT (then finishes what is in
        flight). ready: called with the URL once listening."""
        from aiohttp import web  # noqa: PLC0415 (optional: the serve extra)

        def bind(runner):
            return web.TCPSite(runner, host, port)
        url = f"http://{host}:{port}"
        try:
            asyncio.run(self.run(bind, ready and (lambda: ready(url)),
                                 (signal.SIGTERM, signal.SIGINT)))
        except OSError as e:  # the port taken, the host not this machine's
            raise PtjaxError(f"--host {host} --port {port}: cannot listen there "
                             f"({e.strerror or e}); choose another --port") from None


class Background:
    """A Server listening on localhost in a thread of this process (tests, benchmarks):
    ``url``, and ``stop()`` for a graceful shutdown."""

    def __init__(self, server: Server, host: str = "127.0.0.1"):
        from aiohttp import web  # noqa: PLC0415 (optional: the serve extra)
        self.server = server
        sock = socket.socket()
        sock.bind((host, 0))
        self.url = f"http://{host}:{sock.getsockname()[1]}"
        started, failure = threading.Event(), []

        def thread():
            try:
                asyncio.run(server.run(lambda runner: web.SockSite(runner, sock),
                                       started.set))
            except BaseException as e:  # reported by the constructor
                failure.append(e)
                started.set()
        self.thread = threading.Thread(target=thread, name=server.threads + "http",
                                       daemon=True)
        self.thread.start()
        started.wait()
        if failure:
            raise failure[0]

    def stop(self):
        self.server.stop()
        self.thread.join()
