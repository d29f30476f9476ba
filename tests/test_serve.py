"""``ptjax serve`` (``ptjax.serving``): an HTTP/JSON server of trained runs on one frozen
model, requests of every run batched together. Tested with a real HTTP client
(``http.client``, threads) against the server listening on localhost: each answer is the
run's own (``ptjax.load_run`` + ``ptjax eval``'s ``evaluation.predict``), nothing
compiles after warm-up, bad requests and overload are answered 4xx / 429 / 503 / 504 with
one-line JSON, a failing batch does not stop the server."""
import asyncio
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import numpy as np
import pytest

import ptjax
from ptjax import cli
from ptjax.data.pipeline import bucketed_batches
from ptjax.evaluation import predict
from ptjax.serving import (Background, Batcher, Overloaded, RequestError, Server,
                           parse_request)
from ptjax.taskdata import run_dev_set
from test_multirun import train as multirun_train

pytest.importorskip("aiohttp")

VERBALIZER = "{negative: [bad, awful], positive: [good, great]}"
PAGE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "serving.md")


def page_examples():
    """docs/serving.md's curl bodies (-d '...') and its example answers (```json)."""
    text = open(PAGE).read()
    bodies = [json.loads(b) for b in re.findall(r"-d '(\{.*?\})'", text)]
    block = re.search(r"```json\n(.*?)```", text, re.S).group(1)
    answers = [json.loads(a) for a in re.findall(r"^\{.*?\}$", block, re.S | re.M)]
    return bodies, answers


# ---------------------------------------------------------------- without a model

@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not JSON"),
    (b"[1, 2]", 400, "must be a JSON object, not list"),
    (b'{"run": "a"}', 422, "missing field 'inputs'"),
    (b'{"run": "a", "inputs": "x", "input": "y"}', 422, "unknown field 'input'"),
    (b'{"run": "a", "inputs": 3}', 422, "field 'inputs' must be a string"),
    (b'{"run": true, "inputs": "x"}', 422, "field 'run' must be"),
    (b'{"run": "a", "inputs": "x", "k": 1.5}', 422, "field 'k' must be an integer"),
    (b'{"run": "a", "inputs": "x", "fields": {"a": 1}}', 422, "an object of strings"),
    (b'{"run": "a", "inputs": "x", "candidates": []}', 422, "a non-empty list of strings"),
])
def test_parse_request(body, status, words):
    with pytest.raises(RequestError) as e:
        parse_request(body)
    assert e.value.status == status and words in str(e.value) and "\n" not in str(e.value)
    assert parse_request(b'{"run": 0, "inputs": "x", "k": 1}') == {"run": 0, "inputs": "x",
                                                                   "k": 1}


def test_bucketed_batches():
    """Batches take only the bucket sizes: chunks of the largest, the rest padded to the
    smallest that holds it (with row 0), in order."""
    arrays = {"x": np.arange(11)}
    got = [(b["x"].tolist(), n) for b, n in bucketed_batches(arrays, (4, 1, 2))]
    assert got == [([0, 1, 2, 3], 4), ([4, 5, 6, 7], 4), ([8, 9, 10, 0], 3)]
    got = [(b["x"].tolist(), n) for b, n in bucketed_batches({"x": np.arange(5)}, (8, 2))]
    assert got == [([0, 1, 2, 3, 4, 0, 0, 0], 5)]
    assert [len(b["x"]) for b, _ in bucketed_batches({"x": np.arange(1)}, (8, 2))] == [2]


def test_batcher():
    """Dynamic batching of concurrent submissions: batches of at most max_rows rows (an
    item that does not fit waits for the next), the queue bounded (Overloaded), a batch
    that raises fails its own items only."""
    seen = []

    def fn(items):
        seen.append(list(items))
        if "boom" in items:
            raise RuntimeError("boom")
        return [x.upper() for x in items]

    async def main():
        with ThreadPoolExecutor(1) as pool:
            b = Batcher(fn, max_rows=4, window_s=0.02, queue_size=5, executor=pool)
            task = asyncio.get_running_loop().create_task(b.run())
            futs = [b.submit(x, r) for x, r in [("a", 1), ("b", 2), ("c", 2), ("d", 1),
                                                 ("e", 1)]]
            with pytest.raises(Overloaded, match="the queue is full"):
                b.submit("f", 1)
            assert await asyncio.gather(*futs) == ["A", "B", "C", "D", "E"]
            bad = b.submit("boom", 1)
            with pytest.raises(RuntimeError, match="boom"):
                await bad
            assert await b.submit("g", 1) == "G"  # still serving
            task.cancel()
    asyncio.run(main())
    # a, b fit in 4 rows; c (2 rows) does not fit after them... then c, d, e
    assert seen[:2] == [["a", "b"], ["c", "d", "e"]]
    assert seen[2:] == [["boom"], ["g"]]


def test_page_examples_are_requests():
    """The page's curl bodies are valid requests (the slow CLI test posts them)."""
    bodies, answers = page_examples()
    assert len(bodies) == 2 and len(answers) == 2
    for body in bodies:
        assert parse_request(json.dumps(body).encode()) == body


def test_cli_refuses(tmp_path, capsys):
    assert cli.main(["serve", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a run directory" in err
    assert cli.main(["serve", str(tmp_path), "--batch-sizes", "0,4"]) == 2
    assert "--batch-sizes=0,4: give positive integers" in capsys.readouterr().err


# ---------------------------------------------------------------- trained runs

# test_multirun's runs, shorter: 2 steps, 10 dev examples
QUICK = {"task.dev_size": 10, "train.steps": 2, "train.eval_every": 2,
         "train.checkpoint_every": 2, "train.log_every": 2}


def train(tmp_path_factory, tiny_dir, name, **kw):
    return multirun_train(tmp_path_factory, tiny_dir, name, **{**QUICK, **kw})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs of different tasks and methods on the tiny T5: prompt tuning (K = 2)
    on sentiment by rank; P-tuning with a verbalizer and a template that puts its
    vectors inside the input, on the shifted sentiment task; prefix tuning on QA decoded
    greedily (a longer input and answer)."""
    tiny = str(tmp_path_factory.mktemp("tiny-models"))
    return [
        train(tmp_path_factory, tiny, "prompt", **{"prompt.seeds": "[0,1]"}),
        train(tmp_path_factory, tiny, "ptuning", **{
            "method.name": "ptuning", "method.ptuning.hidden": 8, "prompt.length": 3,
            "task.name": "synthetic_sentiment_shifted",
            "task.template": "'{inputs} {soft:3} so it was {mask}'",
            "task.verbalizer": VERBALIZER}),
        train(tmp_path_factory, tiny, "prefix", **{
            "method.name": "prefix", "method.prefix.hidden": 8, "prompt.length": 5,
            "task.name": "synthetic_qa", "task.max_input_length": 32,
            "task.max_target_length": 5}),
    ]


class Client:
    """http.client on one keep-alive connection."""

    def __init__(self, url):
        u = urlparse(url)
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)

    def call(self, method, path, body=None):
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        self.conn.request(method, path, data, {"Content-Type": "application/json"})
        r = self.conn.getresponse()
        raw = r.read()
        return r.status, json.loads(raw), dict(r.getheaders())


def own_answers(run_dir):
    """A run's own answers to its dev examples: ``ptjax.load_run`` and ``ptjax eval``'s
    predict, member by member -> (examples, [K] Predictions scores / texts, candidates)."""
    run = ptjax.load_run(run_dir)
    dev = run_dev_set(run.model, run.method, run.config)
    preds = predict(run.model, run.method, run.trainables, run.model.params, dev, 8,
                    run.config.task.max_target_length)
    return run, dev, preds


def check(answer, req, refs):
    run, dev, preds = refs[req["run"]]
    j, k = req["_j"], req.get("k", run.best_member)
    assert answer["run"] == run.run_dir and answer["k"] == k
    if dev.mode == "generate":
        assert answer["text"] == preds.texts[k][j]
        return
    C = len(dev.candidates[j])
    np.testing.assert_allclose(answer["scores"], preds.scores[k][j * C:(j + 1) * C],
                               rtol=1e-5, atol=1e-5)
    assert answer["classes"] == dev.candidates[j]
    assert answer["prediction"] == preds.texts[k][j]
    p = np.exp(np.asarray(answer["scores"]) - max(answer["scores"]))
    np.testing.assert_allclose(answer["probabilities"], p / p.sum(), rtol=1e-6)


def dev_requests(run_dirs, refs) -> list:
    """A request for every dev example of every run (each member of a run of several),
    shuffled; "_j": the example's index."""
    requests = []
    for d in run_dirs:
        run, dev, _ = refs[d]
        for j, ex in enumerate(dev.examples):
            for k in ([0, 1] if run.K > 1 else [None]):
                req = {"run": d, "inputs": ex["inputs"], "_j": j}
                if ex.get("fields"):
                    req["fields"] = ex["fields"]
                if k is not None:
                    req["k"] = k
                requests.append(req)
    random.Random(0).shuffle(requests)
    return requests


def concurrent_clients(url, requests, refs, clients: int = 6):
    """The requests from ``clients`` threads at once, each answer checked (``check``)."""
    results = [None] * len(requests)

    def worker(w):
        c = Client(url)
        for n in range(w, len(requests), clients):
            body = {k: v for k, v in requests[n].items() if not k.startswith("_")}
            results[n] = c.call("POST", "/v1/predict", body)
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for req, (status, answer, _) in zip(requests, results):
        assert status == 200, answer
        check(answer, {**req, "run": req.get("_as", req["run"])}, refs)


@pytest.mark.slow
def test_serve_mixed_runs(runs):
    """Concurrent clients of three runs (and each member of the K = 2 run, and a run
    named by its task): every answer the run's own, batches mixing runs, no compile
    after warm-up; then bad requests, a timeout, a failing batch, overload."""
    refs = {d: own_answers(d) for d in runs}
    multi = ptjax.load_runs(runs)
    server = Server(multi, sizes=(2, 8, 16), window_ms=20, queue_size=256)
    warm = server.warm_up()
    assert warm["compiles"] > 0
    bg = Background(server)
    try:
        client = Client(bg.url)
        status, health, _ = client.call("GET", "/health")
        assert status == 200 and health == {"status": "ready", "runs": 3}
        status, listing, _ = client.call("GET", "/v1/runs")
        assert [r["kind"] for r in listing["runs"]] == ["rank", "rank", "generate"]
        assert [r["method"] for r in listing["runs"]] == ["prompt", "ptuning", "prefix"]

        requests = dev_requests(runs, refs)
        requests.append({"run": "synthetic_qa", "inputs": refs[runs[2]][1].examples[0][
            "inputs"], "_j": 0, "_as": runs[2]})
        concurrent_clients(bg.url, requests, refs)

        status, m, _ = client.call("GET", "/metrics")
        assert m["compiles_after_warm_up"] == 0  # counted: no shape outside the buckets
        assert m["by_status"] == {"200": len(requests)}
        assert m["batches"] < len(requests)  # requests were batched together
        assert max(int(n) for n in m["batch_requests"]) > 1
        assert m["latency_ms"]["p50"] > 0 and m["state"] == "ready"
        assert sum(m["by_kind"].values()) == len(requests)

        # bad requests: 4xx with one line of JSON, and the server goes on
        ex = refs[runs[0]][1].examples[0]
        bad = [
            (b"{oops", 400, "not JSON"),
            ({"run": "runs/nowhere", "inputs": "x"}, 404, "is not one of these runs"),
            ({"run": runs[0]}, 422, "missing field 'inputs'"),
            ({"run": runs[0], "inputs": ["x"]}, 422, "must be a string"),
            ({"run": runs[0], "inputs": "x", "k": 5}, 422, "k=5 is not a member"),
            ({"run": runs[0], "inputs": "x", "candidates": [str(i) for i in range(20)]},
             422, "the largest batch is 16"),
        ]
        for body, want, words in bad:
            status, answer, _ = client.call("POST", "/v1/predict", body)
            assert status == want and words in answer["error"], answer
            assert list(answer) == ["error"] and "\n" not in answer["error"]
        for method, path, want in (("GET", "/v1/nope", 404), ("GET", "/v1/predict", 405)):
            status, answer, _ = client.call(method, path)
            assert status == want and list(answer) == ["error"]
        status, answer, _ = Client(bg.url).call("POST", "/v1/predict", b"x" * (2 << 20))
        assert status == 413 and "error" in answer

        good = {"run": runs[0], "inputs": ex["inputs"]}
        # a request not answered in time: 504
        server.timeout_s = 1e-4
        status, answer, _ = client.call("POST", "/v1/predict", good)
        assert status == 504 and "no answer within" in answer["error"]
        server.timeout_s = 30.0
        # a batch that fails answers its requests 500; the next one is served
        real = multi.answer

        def failing(*a, **kw):
            multi.answer = real
            raise RuntimeError("injected\nfailure")
        multi.answer = failing
        status, answer, _ = client.call("POST", "/v1/predict", good)
        assert status == 500 and answer == {"error": "RuntimeError: injected failure"}
        status, answer, _ = client.call("POST", "/v1/predict", good)
        assert status == 200
        check(answer, {**good, "_j": 0}, refs)
        status, m, _ = client.call("GET", "/metrics")
        assert m["compiles_after_warm_up"] == 0 and m["failed_batches"] == 1
        assert m["by_status"]["500"] == 1 and m["by_status"]["504"] == 1
    finally:
        bg.stop()

    # the same from Python: MultiRun.generate (score's counterpart), refusing rank runs
    run, dev, preds = refs[runs[2]]
    texts = multi.generate([{"run": runs[2], "inputs": ex["inputs"]}
                            for ex in dev.examples[:4]])
    assert [t["text"] for t in texts] == preds.texts[0][:4]
    with pytest.raises(ptjax.PtjaxError, match="generate takes runs decoded greedily"):
        multi.generate([{"run": runs[0], "inputs": "x"}])

    # overload: a queue of 2 and a long window, 16 clients at once -> some 429s
    small = Server(multi, sizes=(16,), window_ms=200, queue_size=2)
    small.warm_up()
    bg = Background(small)
    try:
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda _: Client(bg.url).call("POST", "/v1/predict", good),
                                range(16)))
        codes = sorted(s for s, _, _ in got)
        assert codes.count(429) >= 8 and set(codes) == {200, 429}, codes
        for status, answer, headers in got:
            if status == 429:
                assert "the queue is full (2 requests waiting)" in answer["error"]
                assert headers["Retry-After"] == "1"
            else:
                check(answer, {**good, "_j": 0}, refs)
    finally:
        bg.stop()


@pytest.mark.slow
def test_serve_gpt2(tmp_path_factory):
    """GPT-2: prompt tuning (P = 4) by rank and prefix tuning (P = 2) decoded greedily
    from left-padded inputs of another width, concurrent clients, each answer the run's
    own, nothing compiled after warm-up."""
    tiny = str(tmp_path_factory.mktemp("tiny-gpt2"))
    gpt2 = {"model.path": "tiny-gpt2"}
    run_dirs = [
        train(tmp_path_factory, tiny, "gpt2-prompt", **gpt2),
        train(tmp_path_factory, tiny, "gpt2-prefix", **gpt2, **{
            "method.name": "prefix", "method.prefix.hidden": 8, "prompt.length": 2,
            "task.name": "synthetic_qa", "task.max_input_length": 32,
            "task.max_target_length": 5}),
    ]
    refs = {d: own_answers(d) for d in run_dirs}
    server = Server(ptjax.load_runs(run_dirs), sizes=(4, 16), window_ms=20)
    server.warm_up()
    bg = Background(server)
    try:
        assert [r["kind"] for r in server.runs()] == ["rank", "generate"]
        concurrent_clients(bg.url, dev_requests(run_dirs, refs), refs)
        _, m, _ = Client(bg.url).call("GET", "/metrics")
        assert m["compiles_after_warm_up"] == 0 and m["batches"] < m["requests"]
    finally:
        bg.stop()


@pytest.mark.slow
def test_cli_serve_sigterm(runs):
    """``ptjax serve`` as a user starts it: listening after warm-up, the page's curl
    requests answered; on SIGTERM new requests get 503 while the one in flight is
    answered, then it exits 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    proc = subprocess.Popen([sys.executable, "-m", "ptjax.cli", "serve", *runs,
                             "--port", str(port), "--batch-sizes", "4,8",
                             "--window-ms", "1000"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "listening on" in line:
                break
        assert f"listening on http://127.0.0.1:{port}" in lines[-1], "".join(lines)
        url = f"http://127.0.0.1:{port}"
        bodies, answers = page_examples()  # docs/serving.md's curl requests
        for body, shown in zip(bodies, answers):
            status, answer, _ = Client(url).call("POST", "/v1/predict", body)
            assert status == 200 and set(answer) == set(shown), answer
        assert answer["run"] == runs[2]  # named by its task
        open_conn = Client(url)  # a keep-alive connection made before the signal
        assert open_conn.call("GET", "/health")[0] == 200
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(lambda: Client(url).call("POST", "/v1/predict",
                                                           bodies[0]))
            time.sleep(0.2)  # in the 1 s window
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            # stopping: still listening, new requests refused, the one in flight answered
            status, answer, _ = open_conn.call("POST", "/v1/predict", bodies[0])
            assert status == 503 and answer == {"error": "the server is shutting down"}
            assert open_conn.call("GET", "/health")[:2] == (503, {"status": "stopping",
                                                                  "runs": 3})
            status, answer, _ = pending.result()
        assert status == 200 and answer["classes"] == ["negative", "positive"]
        assert proc.wait(60) == 0
        assert "ptjax serve: stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_benchmark_runs(tmp_path):
    """benchmarks/serve.py end to end at its smallest (the prompt group on the tiny T5):
    both ways answer every request, the JSON has the ratio docs/serving.md reads."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)),
                                    "benchmarks"))
    import serve as bench  # noqa: PLC0415 (a script, not a module of the package)
    out = str(tmp_path / "serve.json")
    bench.main(["--model", "tiny-t5", "--requests", "4", "--sizes", "8", "--groups",
                "prompt", "--rounds", "1", "--out", out])
    result = json.load(open(out))["groups"]["prompt"]
    assert result["mixed"]["requests"] == result["per_run"]["requests"] == 12
    assert result["mixed"]["rows"] == result["per_run"]["rows"]
    assert 0 < result["mixed_over_per_run_time"] < 10
