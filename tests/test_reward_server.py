"""Remote rewards over real loopback HTTP: our server and client (scores, batching, limits, token,
timeouts, retries, malformed replies), the public pickle protocol's clients, and the trainer
stopping cleanly when its reward server dies."""

import base64
import io
import json
import pickle
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common import reward_server
from common.reward_server import (RewardClient, RewardServer, RewardServerError, deqa_reward,
                                  geneval_reward)
from common.rewards import MultiReward, parse_reward_spec
from common.toy.world import render_prompt, split_prompts

ROOT = Path(__file__).resolve().parent.parent
FAST = {"retries": 0, "backoff_s": 0.01, "timeout_s": 10}


def toy_batch(count, seed=0):
    """Ground-truth renders (half of them noisy so the scores vary), already 8-bit: what PNG carries."""
    rng = np.random.default_rng(seed)
    metas = [split_prompts()[1][i % 131] for i in range(count)]
    images = torch.from_numpy(np.stack([render_prompt(m, rng) for m in metas]))
    noise = torch.from_numpy(rng.normal(0, 0.3, images.shape).astype(np.float32))
    images[::2] = (images[::2] + noise[::2]).clamp(0, 1)
    return (images * 255).round() / 255, [m["prompt"] for m in metas], metas


@pytest.fixture
def serve():
    servers = []

    def start(reward_fn, **options):
        servers.append(RewardServer(reward_fn, port=0, **options).start())
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def post(url, body, headers=None):
    """(status, decoded JSON) of a raw POST, whatever the status."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def png_body(count, size=8):
    image = io.BytesIO()
    Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(image, format="PNG")
    text = base64.b64encode(image.getvalue()).decode()
    return json.dumps({"images": [text] * count, "prompts": ["x"] * count, "metadata": [{}] * count}).encode()


def mean_pixel(images, prompts, metadata):
    return {"brightness": images.mean(dim=(1, 2, 3)).numpy()}


def test_scores_equal_the_in_process_reward(serve):
    images, prompts, metas = toy_batch(70)
    reward = MultiReward(parse_reward_spec("shapes=1.0,jpeg_compressibility=0.5"))
    server = serve(reward, description="shapes=1.0,jpeg_compressibility=0.5")
    client = RewardClient(server.url, chunk=16)  # 5 requests
    remote = client(images, prompts, metas)
    local = reward(images, prompts, metas)
    assert client.info["reward"] == "shapes=1.0,jpeg_compressibility=0.5"
    assert set(remote) == {"remote", "shapes", "shapes_strict", "jpeg_compressibility"}
    np.testing.assert_array_equal(remote["remote"], local["avg"])
    for name in ("shapes", "shapes_strict", "jpeg_compressibility"):
        np.testing.assert_array_equal(remote[name], local[name])
    assert 0 < local["shapes_strict"].mean() < 1  # the comparison is not trivially all-equal


def test_concurrent_requests_are_merged_into_one_reward_call(serve):
    entered = threading.Event()

    def slow_brightness(images, prompts, metadata):
        entered.set()
        time.sleep(0.3)
        return mean_pixel(images, prompts, metadata)

    server = serve(slow_brightness, batch_wait_s=0.0)
    client = RewardClient(server.url, **FAST)
    client(torch.zeros(1, 3, 8, 8), ["x"], [{}])  # the worker is now busy for 0.3 s ...
    batches = [torch.full((2, 3, 8, 8), v / 10) for v in range(6)]
    results = [None] * len(batches)

    def call(i):
        results[i] = client(batches[i], ["x", "y"], [{}, {}])

    entered.clear()
    first = threading.Thread(target=call, args=(0,))
    first.start()
    entered.wait(5)
    threads = [threading.Thread(target=call, args=(i,)) for i in range(1, len(batches))]
    for thread in threads:  # ... and these five queue up behind the running call
        thread.start()
    for thread in [first, *threads]:
        thread.join()
    assert server.reward_calls == 3  # warm-up, the first request, then the five merged into one
    for value, result in enumerate(results):
        np.testing.assert_allclose(result["remote"], [round(value / 10 * 255) / 255] * 2, atol=1e-7)


def test_default_bind_is_loopback_only(serve):
    server = serve(mean_pixel)
    assert server.httpd.server_address[0] == "127.0.0.1"
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outward interface
        outward = probe.getsockname()[0]
    except OSError:
        outward = None
    finally:
        probe.close()
    if outward and not outward.startswith("127."):
        with pytest.raises(OSError):
            socket.create_connection((outward, server.httpd.server_address[1]), timeout=2).close()
    result = subprocess.run([sys.executable, "-m", "common.reward_server", "--reward", "shapes", "--host", "0.0.0.0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "without a token" in result.stderr


def test_token(serve):
    server = serve(mean_pixel, token="s3cret")
    images = torch.rand(2, 3, 8, 8)
    assert RewardClient(server.url, token="s3cret", **FAST)(images, ["a", "b"], [{}, {}])["remote"].shape == (2,)
    start = time.monotonic()
    with pytest.raises(RewardServerError, match="HTTP 401"):
        RewardClient(server.url, token="wrong", retries=3, backoff_s=1.0)(images, ["a", "b"], [{}, {}])
    assert time.monotonic() - start < 1  # a refusal is not retried
    assert post(server.url + "/score", png_body(1))[0] == 401
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(server.url + "/health", timeout=10)
    assert post(server.url + "/score", png_body(1), {"Authorization": "Bearer s3cret"})[0] == 200


def test_oversized_requests_are_413(serve):
    server = serve(mean_pixel, max_request_bytes=2000, max_images=3, max_pixels=32 * 32)
    status, reply = post(server.url + "/score", png_body(1) + b" " * 3000)
    assert status == 413 and "exceeds the server's limit of 2000 bytes" in reply["error"]
    status, reply = post(server.url + "/score", png_body(4))
    assert status == 413 and "4 images exceed" in reply["error"]
    status, reply = post(server.url + "/score", png_body(1, size=33))
    assert status == 413 and "33x33" in reply["error"]
    client = RewardClient(server.url, **FAST)
    assert client.chunk == 3  # the client sends at most the server's max_images per request
    with pytest.raises(ValueError, match="over the server's 2000"):
        client(torch.rand(3, 3, 16, 16), ["a"] * 3, [{}] * 3)


def test_malformed_requests_are_400(serve):
    server = serve(mean_pixel)
    status, reply = post(server.url + "/score", b'{"images": [')
    assert status == 400 and "not JSON" in reply["error"]
    status, reply = post(server.url + "/score", json.dumps({"images": ["aGVsbG8="], "prompts": ["x"]}).encode())
    assert status == 400 and "image 0 is not a base64 PNG" in reply["error"]
    body = json.loads(png_body(2))
    body["prompts"] = ["only one"]
    status, reply = post(server.url + "/score", json.dumps(body).encode())
    assert status == 400 and "list of 2 strings" in reply["error"]
    assert post(server.url + "/nope", b"{}")[0] == 404


class Canned(BaseHTTPRequestHandler):
    """Replies 200 with whatever `reply` is: a stand-in for a broken or foreign server."""

    reply = b""

    def do_GET(self):
        self.do_POST()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.reply)))
        self.end_headers()
        self.wfile.write(self.reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def canned():
    servers = []

    def start(handler):
        servers.append(ThreadingHTTPServer(("127.0.0.1", 0), handler))
        threading.Thread(target=servers[-1].serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{servers[-1].server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("reply,message", [
    (b"<html>oops</html>", "malformed reply"),
    (json.dumps({"scores": {"avg": [0.5, 0.5, 0.5]}}).encode(), "3 `avg` scores for 2 images"),
    (json.dumps({"result": 1}).encode(), "malformed reply"),
])
def test_malformed_reply_or_wrong_count_is_a_clear_error(canned, reply, message):
    url = canned(type("Handler", (Canned,), {"reply": reply}))
    with pytest.raises(RewardServerError, match=message):
        RewardClient(url, check=False, **FAST)(torch.rand(2, 3, 8, 8), ["a", "b"], [{}, {}])
    with pytest.raises(RewardServerError, match="not a cleanflow reward server"):
        RewardClient(url, **FAST)


def test_slow_server_timeout_is_honoured(serve):
    def stuck(images, prompts, metadata):
        time.sleep(3)
        return mean_pixel(images, prompts, metadata)

    server = serve(stuck)
    client = RewardClient(server.url, timeout_s=0.3, retries=1, backoff_s=0.05)
    start = time.monotonic()
    with pytest.raises(RewardServerError, match=r"2 attempt\(s\).*timeout 0.3 s each.*timed out"):
        client(torch.rand(1, 3, 8, 8), ["a"], [{}])
    assert 0.6 <= time.monotonic() - start < 1.5


def test_dead_server_retries_with_backoff_then_a_clear_error():
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{free.getsockname()[1]}"  # nothing listens there once closed
    start = time.monotonic()
    with pytest.raises(RewardServerError, match=rf"{url}/health gave no answer after 3 attempt\(s\).*Connection"):
        RewardClient(url, retries=2, backoff_s=0.1, timeout_s=1)
    assert time.monotonic() - start >= 0.3  # backoff 0.1 then 0.2
    client = RewardClient(url, check=False, retries=1, backoff_s=0.01, on_error="drop")
    with pytest.warns(UserWarning, match="3 images get NaN scores"):
        out = client(torch.rand(3, 3, 8, 8), ["a"] * 3, [{}] * 3)
    assert np.isnan(out["remote"]).all() and out["remote"].shape == (3,)


def test_reward_errors_are_500_retried_and_reported(serve):
    failures = []

    def flaky(images, prompts, metadata):
        if len(failures) < 2:
            failures.append(1)
            raise RuntimeError("CUDA out of memory (simulated)")
        return mean_pixel(images, prompts, metadata)

    server = serve(flaky)
    images = torch.rand(2, 3, 8, 8)
    assert RewardClient(server.url, retries=2, backoff_s=0.01)(images, ["a", "b"], [{}, {}])["remote"].shape == (2,)
    shapes = serve(MultiReward(parse_reward_spec("shapes")))
    with pytest.raises(RewardServerError, match="HTTP 500: the reward failed: ValueError: the shapes reward needs"):
        RewardClient(shapes.url, **FAST)(images, ["a", "b"], [{}, {}])


GENEVAL_TAGS = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]


class PublicServer(BaseHTTPRequestHandler):
    """The public reward-server (yifan123/reward-server) as it answers, test side only: POST / with
    a pickled dict of JPEG bytes, 200 with a pickled dict, 500 with the traceback text on error.
    Its models are replaced by the image's brightness b (from the JPEG it received), but the reply
    is shaped and scaled exactly as `app_deqa.py` / `app_geneval.py` build theirs."""

    requests = replies = None

    def do_POST(self):
        try:
            request = pickle.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.requests.append(request)
            images = [Image.open(io.BytesIO(jpeg), formats=["jpeg"]) for jpeg in request["images"]]
            brightness = [float(np.asarray(image).mean() / 255) for image in images]
            if "meta_datas" in request:
                reply = self.geneval(brightness, request["meta_datas"], request["only_strict"])
            else:  # reward_server/deqa.py: score = model.score(images) / 5, a 1-5 score -> (0, 1]
                reply = {"outputs": [(1 + 4 * b) / 5 for b in brightness]}
            self.replies.append(reply)
            body, status = pickle.dumps(reply), 200
        except Exception:  # noqa: BLE001 - the public server answers any error with 500 and its traceback
            body, status = traceback.format_exc().encode(), 500
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    @staticmethod
    def geneval(brightness, metadatas, only_strict):
        """compute_geneval's return: partial credit `scores`, standard `rewards` (all 0 when
        only_strict), `strict_rewards`, and per-tag lists with -10.0 for the other tags."""
        scores, rewards, strict = [], [], []
        groups, strict_groups = {tag: [] for tag in GENEVAL_TAGS}, {tag: [] for tag in GENEVAL_TAGS}
        for b, meta in zip(brightness, metadatas):
            strict_correct = len(meta["include"]) == 1 and b > 0.2
            correct = False if only_strict else b > 0.25
            scores.append(b)
            rewards.append(1.0 if correct else 0.0)
            strict.append(1.0 if strict_correct else 0.0)
            for tag in GENEVAL_TAGS:
                groups[tag].append(rewards[-1] if tag == meta["tag"] else -10.0)
                strict_groups[tag].append(strict[-1] if tag == meta["tag"] else -10.0)
        return {"scores": scores, "rewards": rewards, "strict_rewards": strict, "group_rewards": groups,
                "group_strict_rewards": strict_groups}

    def log_message(self, *args):
        pass


def public_server(canned):
    handler = type("Handler", (PublicServer,), {"requests": [], "replies": []})
    return "pickle+" + canned(handler), handler


def test_public_pickle_protocol_only_by_opt_in(canned, monkeypatch, serve):
    url, handler = public_server(canned)
    monkeypatch.delenv("CLEANFLOW_TRUST_PICKLE_SERVER", raising=False)
    with pytest.raises(RewardServerError, match="CLEANFLOW_TRUST_PICKLE_SERVER=1"):
        geneval_reward(url)
    with pytest.raises(RewardServerError, match="pickle protocol"):
        deqa_reward(None)  # the default is the public server, so it needs the opt-in too
    monkeypatch.setenv("CLEANFLOW_TRUST_PICKLE_SERVER", "1")
    with pytest.warns(UserWarning, match="trusting the pickle server"):
        geneval = geneval_reward(url)
    images = torch.zeros(70, 3, 8, 8)
    images[:, 0] = torch.linspace(0, 1, 70)[:, None, None]
    metas = [{"tag": GENEVAL_TAGS[i % 6], "include": [{"class": "circle", "count": 1}] * (1 + i % 2)}
             for i in range(70)]
    out = geneval(images, ["p"] * 70, metas)
    # as the public client: np.array_split into ceil(70 / 64) = 2 equal chunks, the training call
    assert [len(r["images"]) for r in handler.requests] == [35, 35]
    assert all(r["only_strict"] is True for r in handler.requests)
    assert handler.requests[0]["meta_datas"][:2] == metas[:2]
    sent = [v for reply in handler.replies for v in reply["scores"]]
    np.testing.assert_array_equal(out["geneval"], np.float32(sent))  # partial credit, as the server sent it
    np.testing.assert_allclose(out["geneval"], images.mean(dim=(1, 2, 3)), atol=0.01)  # JPEG, as published
    strict = [r for reply in handler.replies for r in reply["strict_rewards"]]
    np.testing.assert_array_equal(out["geneval_strict"], strict)
    assert 0 < out["geneval_strict"].mean() < 1
    # the same reward hosted by our server (the bridge): the trainer side speaks JSON only
    server = serve(geneval)
    again = geneval_reward(server.url)(images, ["p"] * 70, metas)
    np.testing.assert_array_equal(again["geneval"], out["geneval"])
    np.testing.assert_array_equal(again["geneval_strict"], out["geneval_strict"])


def test_deqa_is_the_servers_score_not_divided_again(canned, monkeypatch):
    """The public DeQA server already sends score / 5 in (0, 1]; the client passes it on as it is."""
    url, handler = public_server(canned)
    monkeypatch.setenv("CLEANFLOW_TRUST_PICKLE_SERVER", "1")
    with pytest.warns(UserWarning, match="trusting the pickle server"):
        deqa = deqa_reward(url)
    images = torch.zeros(10, 3, 8, 8)
    images[:, 1] = torch.linspace(0, 1, 10)[:, None, None]
    out = deqa(images, ["p"] * 10, [{}] * 10)["deqa"]
    np.testing.assert_array_equal(out, np.float32(handler.replies[0]["outputs"]))
    np.testing.assert_allclose(out, (1 + 4 * images.mean(dim=(1, 2, 3))) / 5, atol=0.01)
    assert 0.2 - 0.01 < out.min() and out.max() < (1 + 4 / 3) / 5 + 0.01  # brightness 0 ... 1/3: DeQA 1 ... 2.33 of 5


def test_public_server_errors_are_retried_then_reported(canned, monkeypatch):
    url, handler = public_server(canned)
    monkeypatch.setenv("CLEANFLOW_TRUST_PICKLE_SERVER", "1")
    with pytest.warns(UserWarning, match="trusting the pickle server"):
        geneval = reward_server.PickleRewardClient(url, "geneval", retries=1, backoff_s=0.01)
    with pytest.raises(RewardServerError, match=r"2 attempt\(s\).*HTTP 500: Traceback"):
        geneval(torch.zeros(2, 3, 8, 8), ["p"] * 2, [{"tag": "counting"}] * 2)  # no `include`: the server fails
    assert len(handler.requests) == 2


def launch_server(spec, *extra):
    """`python -m common.reward_server` on a free loopback port (`server_url` waits for it)."""
    return subprocess.Popen([sys.executable, "-m", "common.reward_server", "--reward", spec, "--port", "0", *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def server_url(process):
    line = process.stdout.readline()
    if " on http://" not in line:
        process.kill()
        raise AssertionError(f"server did not start: {line}{process.stderr.read()}")
    return line.split(" on ")[1].split()[0]


def test_trainer_stops_with_a_clear_error_when_the_server_dies(tmp_path, monkeypatch):
    process = launch_server("shapes")
    import flow_grpo  # while the server starts
    from common.checkpoint import load_checkpoint, resolve_resume

    try:
        url = server_url(process)
        for name, value in (("RETRIES", "2"), ("BACKOFF", "0.1"), ("TIMEOUT", "5")):
            monkeypatch.setenv(f"CLEANFLOW_REWARD_{name}", value)
        out = tmp_path / "run"

        def kill_after_first_checkpoint():
            deadline = time.time() + 120
            while time.time() < deadline and not (out / "checkpoint-000001" / "COMPLETE").exists():
                time.sleep(0.02)
            process.kill()

        watcher = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
        watcher.start()
        args = flow_grpo.parse_args(["--num-epochs", "6", "--batch-size", "2", "--group-size", "2",
                                     "--batches-per-epoch", "1", "--updates-per-epoch", "1", "--eval-every", "0",
                                     "--track", "none", "--num-steps", "2", "--save-every", "1", "--guidance", "1.0",
                                     "--reward", f"remote:{url}", "--output-dir", str(out)])
        # every rank stops together with the client's error in the message
        with pytest.raises(SystemExit, match=rf"reward failed \(RewardServerError: .*{url}/score gave no answer "
                                             rf"after 3 attempt\(s\).*--resume latest") as stopped:
            flow_grpo.main(args)
        assert isinstance(stopped.value.__cause__, RewardServerError)
        watcher.join()
    finally:
        process.kill()
        process.wait()
    latest = resolve_resume("latest", out)
    assert latest is not None and (latest / "COMPLETE").exists()
    state = load_checkpoint(latest)
    assert state["epoch"] >= 1 and state["trainable"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["reward/mean"]) for r in records)  # no silent zero or NaN epoch was logged
    assert records[0]["reward/remote"] == records[0]["reward/mean"]


def test_cli_bridges_the_public_protocol_behind_a_flag(canned):
    url, _ = public_server(canned)
    process = launch_server(f"geneval:{url}", "--trust-pickle-server")
    try:
        ours = server_url(process)
        images = torch.full((3, 3, 8, 8), 0.8)
        out = geneval_reward(ours)(images, ["p"] * 3, [{"tag": "colors", "include": [{"class": "circle", "count": 1}]}] * 3)
        np.testing.assert_array_equal(out["geneval_strict"], [1, 1, 1])
    finally:
        process.kill()
        process.wait()
    process = subprocess.run([sys.executable, "-m", "common.reward_server", "--reward", f"geneval:{url}", "--port", "0"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert process.returncode != 0 and "CLEANFLOW_TRUST_PICKLE_SERVER=1" in process.stderr
