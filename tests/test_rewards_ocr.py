"""The ocr reward for real: rapidocr reads text rendered with PIL, scored with the published
Levenshtein rule (ALGORITHMS.md §12)."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from common.reward_models import levenshtein, ocr_score, ocr_target
from common.rewards import MultiReward, parse_reward_spec


def render(text, size=256):
    """Black text on white, as a (3, H, W) float [0, 1] tensor."""
    image = Image.new("RGB", (size, size), "white")
    font = ImageFont.load_default(size=size // 9)  # Pillow's bundled font: no system fonts needed
    ImageDraw.Draw(image).text((size // 16, size // 3), text, fill="black", font=font)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def test_levenshtein_and_published_rule():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    assert ocr_target('a sign that says "Hello World" and "other"') == "Hello World"
    with pytest.raises(ValueError, match="double quotes"):
        ocr_target("no quotes here")
    assert ocr_score(["xx HELLO", "world yy"], "Hello World") == 1.0  # substring of the joined lines, no spaces
    assert ocr_score(["hellp world"], "Hello World") == pytest.approx(1 - 1 / 10)
    assert ocr_score([], "abcd") == 0.0  # distance capped at the target length
    assert ocr_score(["abcdefghijklmnop"], "xyz") == 0.0


def test_ocr_reads_rendered_text_and_a_wrong_text_scores_lower():
    reward = MultiReward(parse_reward_spec("ocr"))
    images = torch.stack([render("CLEAN FLOW"), render("CLEAN FLOW"), render("GRPO 2025")])
    prompts = ['a poster with the words "clean flow"', 'a poster saying "clean flaw"',
               'a poster with the words "clean flow"']
    scores = reward(images, prompts, [{}] * 3)["ocr"]
    assert scores[0] == 1.0, scores
    assert 0.5 < scores[1] < 1.0, scores  # one letter off: 1 - 1/9
    assert scores[2] < 0.5, scores
    assert scores.dtype == np.float32


def test_detector_runs_with_paddleocrs_settings():
    """PaddleOCR 2.9's DB post-processing (box_thresh 0.6, unclip_ratio 1.5, no dilation) by default;
    `ocr:rapidocr` keeps rapidocr's own (0.5, 1.6, dilation on)."""
    from common.reward_models import ocr_reward

    published = ocr_reward().engine.text_det.postprocess_op  # built by the start-up call
    assert (published.thresh, published.box_thresh, published.unclip_ratio, published.score_mode) == (0.3, 0.6, 1.5,
                                                                                                        "fast")
    assert published.dilation_kernel is None
    own = ocr_reward("rapidocr").engine.text_det.postprocess_op
    assert (own.box_thresh, own.unclip_ratio) == (0.5, 1.6) and own.dilation_kernel is not None
    with pytest.raises(ValueError, match="ocr:rapidocr"):
        ocr_reward("tesseract")
