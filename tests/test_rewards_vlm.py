"""VLM judges: `unifiedreward` and `qwenvl` against a loopback OpenAI-compatible server (real
HTTP, http.server in a thread), and `qwenvl` locally on a tiny Qwen2.5-VL built from config: the
published rubric character for character, its 2048-token limit, and its preprocessing (golden)."""

import base64
import io
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from common import reward_models
from common.reward_models import QWENVL_TASK, qwenvl_score, unifiedreward_score
from common.rewards import MultiReward, parse_reward_spec


def test_published_parsing():
    assert unifiedreward_score("Alignment is fine.\nFinal Score: 4.5") == pytest.approx(0.9)
    assert unifiedreward_score("Final Score:3") == pytest.approx(0.6)
    assert unifiedreward_score("Final Score: 7") == 0.0 and unifiedreward_score("I'd say 4") == 0.0
    assert qwenvl_score("<Thought>ok</Thought>\n<Score>4</Score>") == pytest.approx(0.8)
    assert qwenvl_score("<Score>five</Score>") == 0.0 and qwenvl_score("Score: 4") == 0.0


class FakeVLM(BaseHTTPRequestHandler):
    """OpenAI-compatible chat completions: answers from the caption / rubric it is sent, records
    what it received, and fails the first `fail_next` requests with HTTP 500."""

    requests, fail_next, api_key = [], 0, None

    def log_message(self, *args):
        pass

    def _send(self, code, body):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": "judge-7b", "object": "model"}]})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        cls.requests.append({"body": body, "auth": self.headers.get("Authorization")})
        if cls.fail_next > 0:
            cls.fail_next -= 1
            return self._send(500, {"error": "busy"})
        if cls.api_key and self.headers.get("Authorization") != f"Bearer {cls.api_key}":
            return self._send(401, {"error": "bad key"})
        text = next(p["text"] for p in body["messages"][0]["content"] if p["type"] == "text")
        if "garbage" in text:
            return self._send(200, b"<html>not json</html>")
        if "Final Score" in text:  # UnifiedReward
            caption = text.rsplit("Text Caption: [", 1)[1].rstrip("]")
            reply = {"good": "Looks right.\nFinal Score: 4.5", "ok": "Final Score: 3"}.get(caption, "cannot judge")
        else:  # the Qwen aesthetic rubric
            reply = "<Thought>sharp</Thought>\n<Score>3</Score>"
        self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]})


@pytest.fixture()
def server():
    FakeVLM.requests, FakeVLM.fail_next, FakeVLM.api_key = [], 0, None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeVLM)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def images(n=3):
    return torch.rand(n, 3, 40, 48, generator=torch.Generator().manual_seed(0))


def test_unifiedreward_over_http(server, monkeypatch):
    monkeypatch.setenv("CLEANFLOW_VLM_API_KEY", "secret")
    FakeVLM.api_key = "secret"
    reward = MultiReward(parse_reward_spec(f"unifiedreward:{server}=1"))
    out = reward(images(), ["good", "ok", "weird"], [{}] * 3)
    np.testing.assert_allclose(out["unifiedreward"], [0.9, 0.6, 0.0])  # 1-5 / 5; no score -> 0
    sent = FakeVLM.requests
    assert len(sent) == 3 and all(r["auth"] == "Bearer secret" for r in sent)
    body = sent[0]["body"]
    assert body["model"] == "judge-7b" and body["temperature"] == 0  # first listed model, greedy
    image_part, text_part = body["messages"][0]["content"]
    assert text_part["text"].startswith("<image>\nYou are given a text caption")
    header, data = image_part["image_url"]["url"].split(",", 1)
    assert header == "data:image/png;base64"
    assert Image.open(io.BytesIO(base64.b64decode(data))).size == (512, 512)  # published: resized to 512x512
    assert "max_tokens" not in body  # published: the server's default


# flow_grpo/qwenvl.py's `self.task`, line by line: the lines wrap where the published file wraps them,
# and the text opens and closes with a newline
PUBLISHED_RUBRIC = "\n".join([
    "",
    "Your role is to evaluate the aesthetic quality score of given images.",
    "1. Bad: Extremely blurry, underexposed with significant noise, indiscernible",
    "subjects, and chaotic composition.",
    "2. Poor: Noticeable blur, poor lighting, washed-out colors, and awkward",
    "composition with cut-off subjects.",
    "3. Fair: In focus with adequate lighting, dull colors, decent composition but",
    "lacks creativity.",
    "4. Good: Sharp, good exposure, vibrant colors, thoughtful composition with",
    "a clear focal point.",
    "5. Excellent: Exceptional clarity, perfect exposure, rich colors, masterful",
    "composition with emotional impact.",
    "",
    "Please first provide a detailed analysis of the evaluation process, including the criteria for judging "
    "aesthetic quality, within the <Thought> tag. Then, give a final score from 1 to 5 within the <Score> tag.",
    "<Thought>",
    "[Analyze the evaluation process in detail here]",
    "</Thought>",
    "<Score>X</Score>",
    "",
])


def test_qwenvl_rubric_is_the_published_text():
    assert QWENVL_TASK == PUBLISHED_RUBRIC


def test_qwenvl_over_http_sends_the_published_request(server):
    out = MultiReward(parse_reward_spec(f"qwenvl:{server}"))(images(2), ["x", "y"], [{}] * 2)
    np.testing.assert_allclose(out["qwenvl"], [0.6, 0.6])
    body = FakeVLM.requests[0]["body"]
    image_part, text_part = body["messages"][0]["content"]
    assert text_part["text"] == PUBLISHED_RUBRIC
    assert body["max_tokens"] == 2048 and body["temperature"] == 0  # published generation limit
    # qwen_vl_utils' resize, done before sending: 40x48 -> 56x84 (sides to multiples of 28, at
    # least 4·28² pixels), so the server's own resize to Qwen's grid keeps the size
    data = image_part["image_url"]["url"].split(",", 1)[1]
    assert Image.open(io.BytesIO(base64.b64decode(data))).size == (84, 56)


def test_server_errors_are_errors_not_zero_rewards(server, monkeypatch):
    FakeVLM.fail_next = 1  # one HTTP 500, then the retry succeeds
    monkeypatch.setattr(reward_models.ChatClient, "backoff", lambda self, attempt: 0.05)
    fn = reward_models.unifiedreward_reward(server)
    assert fn(images(1), ["good"], [{}])["unifiedreward"][0] == pytest.approx(0.9)
    FakeVLM.fail_next = 10  # more failures than retries
    with pytest.raises(RuntimeError, match="failed after 3 tries"):
        fn(images(1), ["good"], [{}])
    FakeVLM.fail_next = 0
    with pytest.raises(RuntimeError, match="not JSON"):
        fn(images(1), ["garbage"], [{}])
    with pytest.raises(RuntimeError, match="HTTP 404"):
        reward_models.ChatClient(server.replace("/v1", "/nothing"))


def test_a_server_that_is_down_fails_at_start_up(monkeypatch):
    monkeypatch.setattr(reward_models.ChatClient, "backoff", lambda self, attempt: 0.01)
    with pytest.raises(RuntimeError, match="127.0.0.1:9/v1/models failed"):
        MultiReward(parse_reward_spec("unifiedreward:http://127.0.0.1:9/v1"))  # port 9 (discard): nothing listens


def tiny_qwen_vl(directory, reply, filler=None, min_pixels=28 * 28, max_pixels=56 * 56):
    """A tiny Qwen2.5-VL whose generation config suppresses every token but one added token,
    `reply`, also its end-of-sequence token, so greedy decoding writes it whatever the image and
    stops: the real generate/decode path. With `filler`, a long analysis first: `filler` 600 times,
    then `reply`, held back until then by min_new_tokens; the final norm is zeroed so every logit
    is 0 and the tie goes to the lower id, `reply`'s, once it is allowed."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from tests.tiny_pipelines import _bytes_to_unicode

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
               "<|video_pad|>"]
    tokenizer = Qwen2Tokenizer(vocab={c: i for i, c in enumerate(_bytes_to_unicode())}, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": special[1:]})
    written = [reply] + ([filler] if filler else [])
    tokenizer.add_tokens(written)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in special + written}
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                           window_size=56, fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.suppress_tokens = [i for i in range(len(tokenizer)) if i not in {ids[t] for t in written}]
    model.generation_config.eos_token_id = ids[reply]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    if filler:
        model.generation_config.min_new_tokens = 601
        with torch.no_grad():
            model.model.language_model.norm.weight.zero_()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels).save_pretrained(directory)
    return directory


def test_qwenvl_local_on_a_tiny_qwen25_vl(tmp_path):
    scored = tiny_qwen_vl(tmp_path / "scored", "<Score>4</Score>")
    out = MultiReward(parse_reward_spec(f"qwenvl:{scored}"))(images(), ["a", "b", "c"], [{}] * 3)
    np.testing.assert_allclose(out["qwenvl"], [0.8] * 3)
    unscored = tiny_qwen_vl(tmp_path / "unscored", "nice picture")
    out = MultiReward(parse_reward_spec(f"qwenvl:{unscored}"))(images(2), ["a", "b"], [{}] * 2)
    np.testing.assert_array_equal(out["qwenvl"], [0.0, 0.0])  # no <Score> tag -> 0, as published


def test_qwenvl_reads_a_score_after_a_long_analysis(tmp_path):
    """600 tokens of analysis before the tag: within the published 2048-token limit (the old 512
    cut it off and scored 0)."""
    long = tiny_qwen_vl(tmp_path / "long", "<Score>4</Score>", filler=" analysis")
    out = MultiReward(parse_reward_spec(f"qwenvl:{long}"))(images(2), ["a", "b"], [{}] * 2)
    np.testing.assert_allclose(out["qwenvl"], [0.8, 0.8])


def published_qwen_pixels(image_batch, patch=14, merge=2, temporal=2):
    """flow_grpo's QwenVLScorer: qwen_vl_utils resizes each PIL image (smart_resize with its
    defaults, PIL's default bicubic), then the Qwen2-VL processor (min/max pixels of the checkpoint,
    here qwen_vl_utils' own, so the size stays), rescales and normalises ((x - 255·mean) /
    (255·std) as its fast path fuses them) and cuts the frame, repeated `temporal` times, into
    merge-ordered patches."""
    from tests.test_rewards_clip import OPENAI_MEAN, OPENAI_STD, normalise, uint8_pil

    def smart_resize(height, width, factor=28, min_pixels=4 * 28 * 28, max_pixels=16384 * 28 * 28):
        h_bar, w_bar = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
        if h_bar * w_bar > max_pixels:
            beta = math.sqrt(height * width / max_pixels)
            h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
        elif h_bar * w_bar < min_pixels:
            beta = math.sqrt(min_pixels / (height * width))
            h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
        return h_bar, w_bar

    rows, grids = [], []
    for image in uint8_pil(image_batch):
        height, width = smart_resize(image.height, image.width)
        image = image.resize((width, height))
        assert smart_resize(height, width) == (height, width)  # the processor's resize keeps the size
        array = np.asarray(image, dtype=np.float64).transpose(2, 0, 1)
        array = normalise(array, [255 * m for m in OPENAI_MEAN], [255 * s for s in OPENAI_STD])
        frames = np.tile(array[None], (temporal, 1, 1, 1))
        grid_h, grid_w = height // patch, width // patch
        patches = frames.reshape(1, temporal, 3, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
        patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        rows.append(patches.reshape(grid_h * grid_w, 3 * temporal * patch * patch))
        grids.append([1, grid_h, grid_w])
    return np.concatenate(rows), np.array(grids)


def test_qwenvl_pixels_are_the_published_ones(tmp_path):
    from tests.test_rewards_clip import image_set

    directory = tiny_qwen_vl(tmp_path / "judge", "<Score>3</Score>", min_pixels=4 * 28 * 28,
                             max_pixels=16384 * 28 * 28)  # Qwen2.5-VL-7B-Instruct's preprocessor_config.json
    fn = reward_models.qwenvl_reward(directory)
    for batch in image_set():
        pixel_values, grids = fn.pixels(batch)
        expected, expected_grids = published_qwen_pixels(batch)
        np.testing.assert_array_equal(grids.numpy(), expected_grids)
        np.testing.assert_allclose(pixel_values.numpy(), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(fn(batch, ["a", "b"], [{}] * 2)["qwenvl"], [0.6, 0.6])
