"""Remote rewards: our reward server, its client, and clients of the public reward-server protocol.

Run a reward in its own process (or environment, or machine) and score over HTTP:

    python -m common.reward_server --reward shapes=1.0 --port 18090       # host any registered reward
    python flow_grpo.py --reward remote:http://127.0.0.1:18090             # the trainer is the client

Protocol (JSON, never pickle). `GET /health` -> {"status": "ok", "reward": SPEC, "max_images": N,
"max_request_bytes": N, "token_required": bool}. `POST /score` with
{"images": [base64 PNG, ...], "prompts": [str, ...], "metadata": [object or null, ...]} ->
{"scores": {name: [float or null, ...], ..., "avg": [...]}, "num_images": N}; errors are
{"error": message} with 400 (malformed), 401 (token), 404, 411, 413 (too large / too many images /
too many pixels), 500 (the reward raised), 503 (overloaded). Images travel as 8-bit PNG, so the
server scores exactly what `to_uint8` makes of the trainer's images. Concurrent requests are
merged into one reward call (a single worker thread owns the reward model).

Security: binds 127.0.0.1 unless `--host` says otherwise (a non-loopback bind needs a token or
`--allow-no-token`); optional bearer token from $CLEANFLOW_REWARD_TOKEN or `--token-file`
(never on a command line, where `ps` shows it, nor in the reward spec, which trackers log);
request-size, image-count and pixel limits; JSON only.

Client settings, environment variables (the trainer only sees `--reward remote:URL`; the reward
spec is split at `,` and `=` and logged by trackers, so no settings or secrets go in the URL):
    CLEANFLOW_REWARD_TOKEN     bearer token sent to our server
    CLEANFLOW_REWARD_TIMEOUT   seconds per attempt (default 120, the public client's)
    CLEANFLOW_REWARD_RETRIES   retries after the first attempt (default 5), exponential backoff
    CLEANFLOW_REWARD_BACKOFF   first backoff in seconds (default 1; doubles, at most 30)
    CLEANFLOW_REWARD_ON_ERROR  `raise` (default): a failed request raises RewardServerError after
                               the last retry; `drop`: its images get NaN scores (a warning gives
                               the count) for the trainer to drop from their groups
    CLEANFLOW_REWARD_CHUNK     images per request (default 64, capped by the server's max_images)

The public protocol (yifan123/reward-server: GenEval on :18085, DeQA on :18086) POSTs a pickled
dict and unpickles the reply, which runs any code the server, or anyone on the path, chooses. Its
clients here refuse unless trusted: name it with the `pickle+http://` scheme and set
CLEANFLOW_TRUST_PICKLE_SERVER=1, or, better, keep the trainer on JSON and bridge in a separate
process: `python -m common.reward_server --reward geneval:pickle+http://127.0.0.1:18085
--trust-pickle-server --port 18090`, then `--reward geneval:http://127.0.0.1:18090`.
"""

import base64
import hmac
import http.client
import io
import ipaddress
import json
import math
import os
import pickle
import queue
import socket
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

import numpy as np
from PIL import Image

from common.rewards import to_uint8

DEFAULT_PORT = 18090
GENEVAL_URL = "pickle+http://127.0.0.1:18085"  # where the public GenEval server listens
DEQA_URL = "pickle+http://127.0.0.1:18086"
TOKEN_ENV = "CLEANFLOW_REWARD_TOKEN"
TRUST_PICKLE_ENV = "CLEANFLOW_TRUST_PICKLE_SERVER"
MAX_BACKOFF_S = 30.0


class RewardServerError(RuntimeError):
    """A remote reward could not be computed: the message names the URL, attempts and last error."""


def encode_png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)  # level 1: 5x faster, ~same size
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png(text, max_pixels):
    """base64 PNG -> (H, W, 3) uint8; the size is checked before the pixels are decoded."""
    image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)), formats=["PNG"])
    width, height = image.size
    if width * height > max_pixels:
        raise _TooLarge(f"an image of {width}x{height} exceeds the server's {max_pixels} pixels")
    return np.asarray(image.convert("RGB"))


def _finite_or_none(values):
    return [float(v) if math.isfinite(v) else None for v in np.asarray(values, dtype=np.float64).ravel()]


# ------------------------------------------------------------------------------------ server


class _BadRequest(ValueError):
    status = 400


class _TooLarge(ValueError):
    status = 413


@dataclass
class _Job:
    arrays: np.ndarray  # (n, H, W, 3) uint8
    prompts: list
    metadata: list
    done: threading.Event
    result: Optional[dict] = None
    error: Optional[str] = None


class RewardServer:
    """HTTP front (one thread per connection) and one worker thread that merges the queued
    requests of the same image size into a single reward call."""

    def __init__(self, reward_fn, *, host="127.0.0.1", port=DEFAULT_PORT, token=None, description="",
                 max_request_bytes=64 << 20, max_images=256, max_pixels=2048 * 2048, max_batch_images=256,
                 batch_wait_s=0.005, max_pending=64, verbose=False):
        self.reward_fn, self.token, self.description, self.verbose = reward_fn, token, description, verbose
        self.max_request_bytes, self.max_images, self.max_pixels = max_request_bytes, max_images, max_pixels
        self.max_batch_images, self.batch_wait_s = max_batch_images, batch_wait_s
        self.pending = threading.BoundedSemaphore(max_pending)
        self.jobs = queue.Queue()
        self.reward_calls = 0  # one per merged batch (tests check that concurrent requests merge)
        handler = type("Handler", (_Handler,), {"reward_server": self})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.worker = threading.Thread(target=self._work, name="reward-worker", daemon=True)
        self.worker.start()
        self._serving = None

    @property
    def url(self):
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self):
        """Serve in a background thread (tests, benchmarks); `close()` stops it."""
        self._serving = threading.Thread(target=self.httpd.serve_forever, name="reward-http", daemon=True)
        self._serving.start()
        return self

    def serve_forever(self):
        self.httpd.serve_forever()

    def close(self):
        if self._serving is not None:
            self.httpd.shutdown()
        self.httpd.server_close()
        self.jobs.put(None)

    def score(self, arrays, prompts, metadata):
        """Queue one request and wait for its slice of a merged reward call."""
        job = _Job(arrays, prompts, metadata, threading.Event())
        self.jobs.put(job)
        job.done.wait()
        return job

    def _work(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            batch, size = [job], len(job.arrays)
            deadline = time.monotonic() + self.batch_wait_s
            while size < self.max_batch_images:  # whatever arrives within batch_wait_s joins this call
                try:
                    extra = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if extra is None:
                    self.jobs.put(None)
                    break
                batch.append(extra)
                size += len(extra.arrays)
            by_shape = {}
            for item in batch:
                by_shape.setdefault(item.arrays.shape[1:], []).append(item)
            for group in by_shape.values():
                self._run(group)

    def _run(self, jobs):
        import torch

        try:
            arrays = np.concatenate([job.arrays for job in jobs])
            images = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255
            self.reward_calls += 1
            out = self.reward_fn(images, [p for job in jobs for p in job.prompts],
                                 [m for job in jobs for m in job.metadata])
            out = {name: np.asarray(values, dtype=np.float64).ravel() for name, values in out.items()}
            for name, values in out.items():
                if len(values) != len(arrays):
                    raise ValueError(f"the reward returned {len(values)} `{name}` scores for {len(arrays)} images")
        except Exception as error:  # noqa: BLE001 - reported to the client as a 500
            if len(jobs) > 1:  # one bad request must not fail the others merged with it
                for job in jobs:
                    self._run([job])
                return
            traceback.print_exc(file=sys.stderr)
            jobs[0].error = f"{type(error).__name__}: {error}"
            jobs[0].done.set()
            return
        start = 0
        for job in jobs:
            stop = start + len(job.arrays)
            job.result = {name: _finite_or_none(values[start:stop]) for name, values in out.items()}
            start = stop
            job.done.set()


class _Handler(BaseHTTPRequestHandler):
    server_version = "cleanflow-reward/1"
    timeout = 120  # seconds a client may stall mid-request before its connection is dropped
    reward_server: RewardServer

    def log_message(self, format, *args):
        if self.reward_server.verbose:
            super().log_message(format, *args)

    def _reply(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        self.end_headers()
        self.wfile.write(body)

    def _fail(self, status, message):
        if status >= 400 and status != 404:
            sys.stderr.write(f"reward server: {status} {message}\n")
        self.close_connection = True
        self._reply(status, {"error": message})

    def _authorized(self):
        """Every endpoint needs the token when one is set (the health reply names the hosted reward)."""
        token = self.reward_server.token
        if token is None or hmac.compare_digest(self.headers.get("Authorization", "").encode(),
                                                f"Bearer {token}".encode()):
            return True
        self._fail(401, "missing or wrong bearer token (the client reads $CLEANFLOW_REWARD_TOKEN)")
        return False

    def do_GET(self):
        server = self.reward_server
        if self.path != "/health":
            return self._fail(404, f"unknown path {self.path}; use GET /health or POST /score")
        if not self._authorized():
            return
        self._reply(200, {"status": "ok", "reward": server.description, "max_images": server.max_images,
                          "max_request_bytes": server.max_request_bytes, "token_required": server.token is not None})

    def do_POST(self):
        server = self.reward_server
        if self.path != "/score":
            return self._fail(404, f"unknown path {self.path}; use POST /score")
        if not self._authorized():
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            return self._fail(411, "a Content-Length header is required")
        if int(length) > server.max_request_bytes:
            # the body is not read: the connection closes (send fewer images per request)
            return self._fail(413, f"request of {int(length)} bytes exceeds the server's limit of "
                                   f"{server.max_request_bytes} bytes")
        if not server.pending.acquire(blocking=False):
            return self._fail(503, "too many requests in flight; retry later")
        try:
            try:
                arrays, prompts, metadata = self._parse(self.rfile.read(int(length)))
            except (_BadRequest, _TooLarge) as error:
                return self._fail(error.status, str(error))
            job = server.score(arrays, prompts, metadata)
        finally:
            server.pending.release()
        if job.error is not None:
            return self._fail(500, f"the reward failed: {job.error}")
        self._reply(200, {"scores": job.result, "num_images": len(arrays)})

    def _parse(self, body):
        server = self.reward_server
        try:
            request = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise _BadRequest(f"the request body is not JSON: {error}") from None
        if not isinstance(request, dict) or not isinstance(request.get("images"), list) or not request["images"]:
            raise _BadRequest('the request must be an object with a non-empty "images" list of base64 PNGs')
        count = len(request["images"])
        if count > server.max_images:
            raise _TooLarge(f"{count} images exceed the server's limit of {server.max_images} per request")
        prompts = request.get("prompts", [""] * count)
        metadata = request.get("metadata", [{}] * count)
        if not (isinstance(prompts, list) and len(prompts) == count and all(isinstance(p, str) for p in prompts)):
            raise _BadRequest(f'"prompts" must be a list of {count} strings, one per image')
        if not (isinstance(metadata, list) and len(metadata) == count
                and all(m is None or isinstance(m, dict) for m in metadata)):
            raise _BadRequest(f'"metadata" must be a list of {count} objects (or nulls), one per image')
        arrays = []
        for i, text in enumerate(request["images"]):
            try:
                arrays.append(decode_png(text, server.max_pixels))
            except _TooLarge:
                raise
            except Exception as error:  # noqa: BLE001 - anything PIL/base64 raise is the client's fault
                raise _BadRequest(f"image {i} is not a base64 PNG: {type(error).__name__}: {error}") from None
        if len({a.shape for a in arrays}) > 1:
            raise _BadRequest(f"images in one request must share a size, got {sorted({a.shape for a in arrays})}")
        return np.stack(arrays), prompts, [m if m is not None else {} for m in metadata]


# ------------------------------------------------------------------------------------ clients


def _env(name, default, cast):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return cast(value)
    except ValueError:
        raise ValueError(f"${name}={value!r} is not a valid {cast.__name__}") from None


def _describe(error):
    if isinstance(error, urllib.error.URLError) and not isinstance(error, urllib.error.HTTPError):
        error = error.reason if isinstance(error.reason, BaseException) else error
    if isinstance(error, (socket.timeout, TimeoutError)):
        return "timed out"
    return f"{type(error).__name__}: {error}"


def _error_detail(error):
    """The server's {"error": ...} message of an HTTP error reply, else its body or reason."""
    try:
        body = error.read()[:500].decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):
        return str(error.reason)
    try:
        return json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return body or str(error.reason)


class HttpReward:
    """Shared by the clients: chunking, bounded retries with exponential backoff, a timeout per
    attempt, and a clear error (or NaN scores with `on_error="drop"`) after the last retry.

    5xx, connection errors and timeouts are retried; 4xx replies and malformed answers are not
    (the same request would fail again)."""

    name = "remote"
    chunk_default = 64
    thread_safe = True  # concurrent calls are fine (our server merges them): a trainer may submit batches in parallel

    def __init__(self, url, *, timeout_s=None, retries=None, backoff_s=None, on_error=None, chunk=None):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s if timeout_s is not None else _env("CLEANFLOW_REWARD_TIMEOUT", 120.0, float)
        self.retries = retries if retries is not None else _env("CLEANFLOW_REWARD_RETRIES", 5, int)
        self.backoff_s = backoff_s if backoff_s is not None else _env("CLEANFLOW_REWARD_BACKOFF", 1.0, float)
        self.on_error = on_error or _env("CLEANFLOW_REWARD_ON_ERROR", "raise", str)
        self.chunk = chunk or _env("CLEANFLOW_REWARD_CHUNK", self.chunk_default, int)
        if self.on_error not in ("raise", "drop"):
            raise ValueError(f"on_error must be `raise` or `drop`, got {self.on_error!r}")
        if self.timeout_s <= 0 or self.retries < 0 or self.backoff_s < 0 or self.chunk < 1:
            raise ValueError("reward client: timeout and chunk must be > 0, retries and backoff >= 0")
        # no proxies: a reward server is local or on the cluster network, and a proxy would see the token
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.names = [self.name]  # every key returned so far; failed chunks get NaN under each
        self.dropped = 0

    def _headers(self):
        return {}

    def _http(self, url, body=None, content_type="application/json"):
        """Bytes of a 2xx reply, retrying what may be transient; RewardServerError otherwise."""
        start, last = time.monotonic(), None
        headers = {**self._headers(), **({"Content-Type": content_type} if body is not None else {})}
        for attempt in range(1, self.retries + 2):
            request = urllib.request.Request(url, data=body, headers=headers, method="GET" if body is None else "POST")
            try:
                with self.opener.open(request, timeout=self.timeout_s) as response:
                    return response.read()
            except urllib.error.HTTPError as error:
                detail = _error_detail(error)
                if error.code < 500:
                    raise RewardServerError(f"reward server {url} refused the request: HTTP {error.code}: {detail}") from None
                last = f"HTTP {error.code}: {detail}"
            except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
                last = _describe(error)
            if attempt <= self.retries:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S))
        raise RewardServerError(
            f"reward server {url} gave no answer after {self.retries + 1} attempt(s) in {time.monotonic() - start:.1f} s "
            f"(timeout {self.timeout_s:g} s each); last error: {last}. Is the server running (python -m "
            f"common.reward_server)? Tune $CLEANFLOW_REWARD_RETRIES/_TIMEOUT, or set $CLEANFLOW_REWARD_ON_ERROR=drop")

    def _score_chunk(self, arrays, prompts, metadata):
        """{name: scores} for one chunk; subclasses speak their protocol."""
        raise NotImplementedError

    def __call__(self, images, prompts, metadata):
        arrays = to_uint8(images)
        prompts, metadata = list(prompts), list(metadata) if metadata is not None else [{}] * len(arrays)
        if not len(prompts) == len(metadata) == len(arrays):
            raise ValueError(f"{len(arrays)} images, {len(prompts)} prompts and {len(metadata)} metadata entries")
        chunks = []
        # ceil(n / chunk) near-equal chunks, the first ones one larger (70 images: 35 + 35), as the
        # public clients' np.array_split
        count = -(-len(arrays) // self.chunk)
        stops = np.cumsum([len(arrays) // count + (i < len(arrays) % count) for i in range(count)])
        for start, stop in zip([0, *stops[:-1]], stops):
            try:
                scores = self._score_chunk(arrays[start:stop], prompts[start:stop], metadata[start:stop])
            except RewardServerError as error:
                if self.on_error == "raise":
                    raise
                self.dropped += stop - start
                warnings.warn(f"{self.name} reward: {stop - start} images get NaN scores (dropped; "
                              f"{self.dropped} so far): {error}")
                scores = None
            else:
                self.names += [k for k in scores if k not in self.names]
            chunks.append((stop - start, scores))
        return {name: np.concatenate([np.asarray(s[name], dtype=np.float32) if s is not None and name in s
                                      else np.full(n, np.nan, dtype=np.float32) for n, s in chunks])
                for name in self.names}


class RewardClient(HttpReward):
    """Client of our JSON server. Returns the server's weighted total under `name` (what the
    trainer's weight multiplies) and its components under their own names (logged)."""

    def __init__(self, url=f"http://127.0.0.1:{DEFAULT_PORT}", name="remote", *, token=None, check=True, **options):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{name} reward: {url!r} is not an http(s):// URL")
        self.name = name
        super().__init__(url, **options)
        self.token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.info = self.health() if check else {}  # fail at start-up, not after the first rollout
        if self.info.get("max_images"):
            self.chunk = min(self.chunk, int(self.info["max_images"]))

    def _headers(self):
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def health(self):
        reply = self._http(self.url + "/health")
        try:
            info = json.loads(reply)
            assert info["status"] == "ok"
        except (ValueError, KeyError, TypeError, AssertionError):
            raise RewardServerError(f"{self.url}/health: not a cleanflow reward server: {reply[:200]!r}") from None
        return info

    def _score_chunk(self, arrays, prompts, metadata):
        try:
            body = json.dumps({"images": [encode_png(a) for a in arrays], "prompts": prompts,
                               "metadata": metadata}).encode()
        except TypeError as error:
            raise ValueError(f"{self.name} reward: metadata must be JSON-serialisable: {error}") from None
        limit = self.info.get("max_request_bytes")
        if limit and len(body) > limit:  # the server would refuse it with 413 (and close before reading it)
            raise ValueError(f"{self.name} reward: a request of {len(arrays)} images is {len(body)} bytes, over "
                             f"the server's {limit}; lower $CLEANFLOW_REWARD_CHUNK or raise its --max-request-mb")
        reply = self._http(self.url + "/score", body)
        try:
            scores = json.loads(reply)["scores"]
            assert isinstance(scores, dict) and scores
            scores = {k: np.array([np.nan if v is None else v for v in values], dtype=np.float32)
                      for k, values in scores.items()}
        except (ValueError, KeyError, TypeError, AssertionError):
            raise RewardServerError(f"reward server {self.url}: malformed reply (expected JSON "
                                    f'{{"scores": {{name: [floats]}}}}): {reply[:200]!r}') from None
        for key, values in scores.items():
            if len(values) != len(arrays):
                raise RewardServerError(f"reward server {self.url}: {len(values)} `{key}` scores for "
                                        f"{len(arrays)} images")
        # the total: the server's weighted `avg`, else a component named like this reward, else the only one
        total = scores.pop("avg", None)
        if total is None:
            total = scores.get(self.name, next(iter(scores.values())) if len(scores) == 1 else None)
        if total is None:
            raise RewardServerError(f"reward server {self.url}: reply has no `avg` and no `{self.name}` among "
                                    f"{sorted(scores)}")
        return {self.name: total, **{k: v for k, v in scores.items() if k != self.name}}


class PickleRewardClient(HttpReward):
    """The public protocol (flow_grpo's geneval / deqa clients): POST a pickled dict to `/`,
    JPEG images (PIL's default quality, as published), unpickle the reply. Only when trusted."""

    def __init__(self, url, name, *, trust=None, **options):
        self.name = name
        if not url.startswith("pickle+http://"):
            raise ValueError(f"{name} reward: the public protocol needs a pickle+http:// URL, got {url!r}")
        trust = os.environ.get(TRUST_PICKLE_ENV) == "1" if trust is None else trust
        if not trust:
            raise RewardServerError(
                f"{name} reward: {url} speaks the public pickle protocol, and unpickling its replies runs any "
                f"code the server (or anyone between) chooses. Only for a server you control: set "
                f"{TRUST_PICKLE_ENV}=1, or bridge it in its own process with `python -m common.reward_server "
                f"--reward {name}:{url} --trust-pickle-server` and use --reward {name}:http://127.0.0.1:{DEFAULT_PORT}")
        warnings.warn(f"{name} reward: trusting the pickle server at {url} (it can run code in this process)")
        super().__init__(url[len("pickle+"):], **options)

    def _score_chunk(self, arrays, prompts, metadata):
        jpegs = []
        for array in arrays:
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="JPEG")
            jpegs.append(buffer.getvalue())
        payload = {"images": jpegs}
        if self.name == "geneval":
            payload.update(meta_datas=list(metadata), only_strict=True)  # the training call
        reply = self._http(self.url + "/", pickle.dumps(payload), content_type="application/octet-stream")
        try:
            data = pickle.loads(reply)  # trusted by the user's explicit opt-in (checked in __init__)
            if self.name == "geneval":
                out = {"geneval": data["scores"], "geneval_strict": data["strict_rewards"]}
            else:
                # the public DeQA server already divides its 1-5 score by 5 (reward_server/deqa.py)
                out = {self.name: data["outputs"]}
            out = {k: np.asarray(v, dtype=np.float32).ravel() for k, v in out.items()}
        except Exception as error:  # noqa: BLE001 - whatever unpickling produced, it is not a reply
            raise RewardServerError(f"{self.name} server {self.url}: malformed reply: {type(error).__name__}: {error}") from None
        for key, values in out.items():
            if len(values) != len(arrays):
                raise RewardServerError(f"{self.name} server {self.url}: {len(values)} `{key}` scores for {len(arrays)} images")
        return out


def _public_or_ours(name, url):
    if url.startswith("pickle+"):
        return PickleRewardClient(url, name)
    return RewardClient(url, name)


def remote_reward(url=None):
    """`remote:URL`: any reward hosted by our server (default http://127.0.0.1:18090)."""
    return RewardClient(url or f"http://127.0.0.1:{DEFAULT_PORT}", "remote")


def geneval_reward(url=None):
    """`geneval:URL`: GenEval partial credit (`geneval`) and strict correctness (`geneval_strict`).
    pickle+http://... is the public server (default pickle+http://127.0.0.1:18085, needs the
    trust opt-in); http://... is our server hosting it (or, on the toy world, `shapes`)."""
    return _public_or_ours("geneval", url or GENEVAL_URL)


def deqa_reward(url=None):
    """`deqa:URL`: DeQA-Score / 5 in (0, 1], as the server sends it; pickle+http://... the public
    server (default :18086), http://... ours."""
    return _public_or_ours("deqa", url or DEQA_URL)


# ------------------------------------------------------------------------------------ CLI


@dataclass
class ServerArgs:
    reward: str
    """reward spec to host, as the trainer's --reward, e.g. `ocr=1.0` or `shapes=1,jpeg_compressibility=0.5`"""
    host: str = "127.0.0.1"
    """address to bind; anything but loopback needs a token (or --allow-no-token)"""
    port: int = DEFAULT_PORT
    """port (0 = any free port; the URL is printed)"""
    token_file: Optional[str] = None
    """file holding the bearer token (default: $CLEANFLOW_REWARD_TOKEN; none = no token)"""
    allow_no_token: bool = False
    """allow a non-loopback bind without a token (anyone who can reach the port can use the reward)"""
    max_request_mb: float = 64.0
    """requests larger than this are refused with 413"""
    max_images: int = 256
    """images per request; more are refused with 413"""
    max_pixels: int = 2048 * 2048
    """pixels per image; larger images are refused with 413 before decoding"""
    max_batch_images: int = 256
    """concurrent requests are merged into one reward call of at most this many images"""
    batch_wait_ms: float = 5.0
    """how long the worker waits for more requests to merge with the first"""
    trust_pickle_server: bool = False
    """let hosted rewards talk to public pickle servers (pickle+http:// URLs): bridges them to JSON"""
    verbose: bool = False
    """log every request"""


def main(args: ServerArgs):
    token = open(args.token_file).read().strip() if args.token_file else os.environ.get(TOKEN_ENV) or None
    try:
        loopback = ipaddress.ip_address(socket.gethostbyname(args.host)).is_loopback
    except (OSError, ValueError):
        loopback = False
    if not loopback and token is None and not args.allow_no_token:
        raise SystemExit(f"error: binding {args.host} without a token lets anyone who reaches the port use this "
                         f"reward; set ${TOKEN_ENV} or --token-file, or pass --allow-no-token")
    if args.trust_pickle_server:
        os.environ[TRUST_PICKLE_ENV] = "1"  # what the hosted pickle clients check
    from common.rewards import MultiReward, parse_reward_spec

    reward_fn = MultiReward(parse_reward_spec(args.reward))
    import torch  # noqa: F401 - now, not inside the first request
    server = RewardServer(reward_fn, host=args.host, port=args.port, token=token, description=args.reward,
                          max_request_bytes=int(args.max_request_mb * (1 << 20)), max_images=args.max_images,
                          max_pixels=args.max_pixels, max_batch_images=args.max_batch_images,
                          batch_wait_s=args.batch_wait_ms / 1000, verbose=args.verbose)
    print(f"cleanflow reward server: {args.reward} on {server.url} (token {'required' if token else 'off'})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


if __name__ == "__main__":
    import tyro

    main(tyro.cli(ServerArgs, description="Host a registered reward (or a weighted mix) over HTTP for the trainer's "
                                          "`--reward remote:URL`. Protocol, security and client settings: the "
                                          "docstring of common/reward_server.py."))
