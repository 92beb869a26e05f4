"""Rewards on videos (B, F, 3, H, W): image rewards score every 4th frame and average; the
published `video_ocr` rule (ALGORITHMS.md §12) on hand-built OCR results; frame strips."""

import importlib.util

import numpy as np
import pytest
import torch

from common import reward_models, rewards
from common.outputs import frame_indices, save_frame_strips
from common.rewards import MultiReward, parse_reward_spec, video_ocr_score

HAVE_OCR = importlib.util.find_spec("rapidocr") is not None and importlib.util.find_spec("onnxruntime") is not None


def test_image_reward_on_a_video_is_the_mean_over_frames_0_4_8():
    generator = torch.Generator().manual_seed(0)
    videos = torch.rand(2, 9, 3, 16, 16, generator=generator)
    videos[1, 4] = 0.5  # a flat frame compresses far better: it must move video 1's score
    reward = MultiReward(parse_reward_spec("jpeg_compressibility"))
    out = reward(videos, ["a", "b"], [{}, {}])
    per_frame = reward(videos.reshape(18, 3, 16, 16), ["x"] * 18, [{}] * 18)["jpeg_compressibility"].reshape(2, 9)
    expected = per_frame[:, [0, 4, 8]].astype(np.float64).mean(axis=1)
    assert np.allclose(out["jpeg_compressibility"], expected, rtol=0, atol=1e-7)
    assert np.allclose(out["avg"], expected, atol=1e-7) and out["avg"].shape == (2,)
    assert not np.allclose(expected, per_frame.mean(axis=1))  # not every frame: the sampled ones


def test_frames_carry_their_videos_prompt_and_metadata_and_a_nan_frame_unscores_the_video(monkeypatch):
    seen = {}

    def fake_reward():
        def fn(images, prompts, metadata):
            seen.update(shape=tuple(images.shape), prompts=list(prompts), metadata=list(metadata))
            scores = images.mean(dim=(1, 2, 3)).numpy().astype(np.float64)
            scores[1] = np.nan  # video 0's second sampled frame could not be scored
            return {"fake": scores}
        return fn

    monkeypatch.setitem(rewards.REWARDS, "fake", fake_reward)
    videos = torch.stack([torch.full((5, 3, 4, 4), 0.2), torch.full((5, 3, 4, 4), 0.6)])
    out = MultiReward({"fake": 1.0})(videos, ["p0", "p1"], [{"k": 0}, {"k": 1}])
    assert seen["shape"] == (4, 3, 4, 4)  # frames 0 and 4 of each 5-frame video
    assert seen["prompts"] == ["p0", "p0", "p1", "p1"] and seen["metadata"] == [{"k": 0}, {"k": 0}, {"k": 1}, {"k": 1}]
    assert np.isnan(out["fake"][0]) and out["fake"][1] == pytest.approx(0.6)


def test_a_video_aware_reward_gets_the_whole_video(monkeypatch):
    def fake_reward():
        def fn(images, prompts, metadata):
            return {"whole": np.full(len(images), float(images.ndim))}
        fn.scores_videos = True
        return fn

    monkeypatch.setitem(rewards.REWARDS, "whole", fake_reward)
    out = MultiReward({"whole": 2.0})(torch.zeros(3, 9, 3, 4, 4), ["a"] * 3, [{}] * 3)
    assert out["whole"].tolist() == [5.0] * 3 and out["avg"].tolist() == [10.0] * 3


def test_video_ocr_rule():
    # no substring shortcut: "xxhello" is 2 edits from "hello" (the image `ocr` would give 1.0)
    assert video_ocr_score([["xx HELLO"]], "Hello") == pytest.approx(1 - 2 / 5)
    # frames scoring 0 (nothing read, or a failed OCR: None) are left out of the mean
    assert video_ocr_score([["hello"], [], None, ["hellp"]], "hello") == pytest.approx((1.0 + 0.8) / 2)
    assert video_ocr_score([[], ["zzzzzzzz"]], "hello") == 0.0  # no frame above 0
    assert video_ocr_score([["Hello", "World"]], "hello world") == 1.0  # lines joined, spaces and case ignored
    assert video_ocr_score([["a"]], "  ") == 0.0


def test_video_ocr_reads_every_4th_frame(monkeypatch):
    """The reward with a stand-in OCR engine that reads a frame's brightness as its frame index."""
    read = []
    texts = {0: ["clean flow"], 4: ["clean flaw"], 8: [], 12: ["zzzzzzzzzzzz"]}

    class Engine:
        def __call__(self, image):
            index = round(image.getpixel((0, 0))[0] / 10)
            read.append(index)
            return type("Result", (), {"txts": tuple(texts.get(index, ["?"]))})()

    monkeypatch.setattr(reward_models, "ocr_reward", lambda arg=None: type("Fn", (), {"engine": Engine()})())
    fn = rewards.video_ocr_reward()
    assert fn.scores_videos
    video = torch.stack([torch.full((3, 8, 8), 10 * k / 255) for k in range(13)])[None]  # 13 frames
    scores = fn(video, ['a sign saying "clean flow"'], [{}])["video_ocr"]
    assert read == [0, 4, 8, 12]
    assert scores.dtype == np.float32 and scores[0] == pytest.approx((1.0 + (1 - 1 / 9)) / 2)
    # an image batch counts as one-frame videos
    read.clear()
    assert fn(video[:, 4], ['"clean flow"'], [{}])["video_ocr"][0] == pytest.approx(1 - 1 / 9) and read == [4]


@pytest.mark.skipif(HAVE_OCR, reason="checks the message shown when the ocr extra is missing")
def test_video_ocr_without_the_ocr_extra_fails_at_parse_time_with_the_install_line():
    with pytest.raises(ImportError, match=r"cleanflow\[ocr\]"):
        parse_reward_spec("video_ocr")


@pytest.mark.skipif(not HAVE_OCR, reason="needs the ocr extra (rapidocr, onnxruntime)")
def test_video_ocr_reads_rendered_text_for_real():
    from tests.test_rewards_ocr import render

    frame = render("CLEAN FLOW")
    blank = torch.ones_like(frame)
    # read: frames 0, 4, 8; frame 4 is blank, scores 0 and is left out of the mean
    video = torch.stack([frame if k % 2 == 0 and k != 4 else blank for k in range(9)])[None]
    scores = MultiReward(parse_reward_spec("video_ocr"))(video, ['a poster with the words "clean flow"'], [{}])
    assert scores["video_ocr"][0] == 1.0
    ocr = MultiReward(parse_reward_spec("ocr"))(video, ['a poster with the words "clean flow"'], [{}])
    assert ocr["ocr"][0] == pytest.approx(2 / 3)  # the image reward on the same frames: a plain mean


def test_frame_strips(tmp_path):
    from PIL import Image

    assert frame_indices(33, 4) == [0, 11, 21, 32] and frame_indices(3, 4) == [0, 1, 2]
    videos = torch.zeros(2, 33, 3, 8, 12)
    videos[1] = 0.5
    videos[1, 32] = 1.0  # the last frame of video 1 is white: it must be the right-most picture of row 1
    path = tmp_path / "strip.png"
    save_frame_strips(path, videos, ["first", "second"], frames=4, scale=2)
    image = np.asarray(Image.open(path).convert("L"))
    row = 8 * 2 + 30
    assert image.shape[0] == 2 * row
    last = 3 * (12 * 2 + 4)
    assert image[row + 5, last + 5] == 255 and image[row + 5, 5] == 128 and image[5, last + 5] == 0
