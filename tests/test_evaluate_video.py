"""`python -m common.evaluate --model wan`: videos are saved as frame-stacked PNGs (lossless), read
back into (N, F, 3, H, W) for scoring, and the scores come from those files."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from common import evaluate as ev
from common.models.wan import WanAdapter
from common.rewards import MultiReward, parse_reward_spec, to_uint8

# the sizes of tests/test_wan_adapter.py: non-square, to catch a height/width swap
HEIGHT, WIDTH, FRAMES, TOKENS = 32, 48, 5, 16
PROMPTS = ["a red dog", "two blue cat on the left"]  # words of tests/tiny_pipelines.py WORDS


@pytest.fixture
def small_wan(monkeypatch):
    """The CLI takes frames and size from the adapter class (`num_frames`, `default_resolution`)."""
    monkeypatch.setattr(WanAdapter, "num_frames", FRAMES)
    monkeypatch.setattr(WanAdapter, "max_sequence_length", TOKENS)
    monkeypatch.setattr(WanAdapter, "default_resolution", (HEIGHT, WIDTH))


def test_png_round_trip_of_a_video(tmp_path):
    video = torch.rand(FRAMES, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0))
    ev.save_png(video, tmp_path / "v.png")
    stacked = np.asarray(Image.open(tmp_path / "v.png"))
    assert stacked.shape == (FRAMES * HEIGHT, WIDTH, 3)
    assert np.array_equal(stacked[HEIGHT:2 * HEIGHT], to_uint8(video[1:2])[0])  # frame 1 is the second band
    loaded = ev.load_pngs([tmp_path / "v.png"], frames=FRAMES)
    assert loaded.shape == (1, FRAMES, 3, HEIGHT, WIDTH)
    assert (loaded[0] - video).abs().max() <= 0.5 / 255 + 1e-6  # uint8 precision
    with pytest.raises(ValueError, match="3 frames"):
        ev.load_pngs([tmp_path / "v.png"], frames=3)
    image = video[0]  # images keep their old layout
    ev.save_png(image, tmp_path / "i.png")
    assert ev.load_pngs([tmp_path / "i.png"]).shape == (1, 3, HEIGHT, WIDTH)


def test_evaluate_cli_on_the_tiny_wan_pipeline(tmp_path, tiny_model_dir, small_wan, monkeypatch):
    wan_dir = str(tiny_model_dir("wan"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "eval"
    argv = ["--model", "wan", "--pretrained", wan_dir, "--prompts", prompts, "--images-per-prompt", "2",
            "--steps", "2", "--guidance", "4.5", "--batch-size", "4", "--reward", "jpeg_compressibility",
            "--output-dir", out]
    summary = ev.main(ev.parse_args([str(a) for a in argv]))

    records = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == [f"all/samples/{p}_{k:05d}.png" for p in PROMPTS for k in range(2)]
    for record in records:
        assert Image.open(out / record["file"]).size == (WIDTH, FRAMES * HEIGHT)  # (width, height)
    assert summary["settings"]["num_frames"] == FRAMES and summary["num_images"] == 4

    # the same batch generated again in this process: the files hold exactly its uint8 pixels
    adapter = ev.load_model(ev.Args(model="wan", pretrained=wan_dir), "cpu")
    jobs = ev.build_jobs(ev.load_eval_prompts(str(prompts)), ev.Args(images_per_prompt=2))
    videos = ev.generate_seeded(adapter, [job.prompt for job in jobs], [job.seed for job in jobs], num_steps=2,
                                guidance=4.5)
    assert videos.shape == (4, FRAMES, 3, HEIGHT, WIDTH)
    loaded = ev.load_pngs([out / job.file for job in jobs], frames=FRAMES)
    expected = torch.from_numpy(np.stack([to_uint8(video) for video in videos])).permute(0, 1, 4, 2, 3).float() / 255
    assert torch.equal(loaded, expected)
    assert (loaded - videos).abs().max() <= 0.5 / 255 + 1e-6

    # scores: finite, and those of the saved videos
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert all(math.isfinite(s["jpeg_compressibility"]) for s in scores)
    direct = MultiReward(parse_reward_spec("jpeg_compressibility"))(loaded, [j.prompt.text for j in jobs],
                                                                   [j.prompt.metadata for j in jobs])
    assert [s["jpeg_compressibility"] for s in scores] == pytest.approx(direct["jpeg_compressibility"].tolist())
    assert math.isfinite(summary["overall"]["jpeg_compressibility"]) and summary["overall"]["images"] == 4

    # a resumed run with another frame count is refused (every file's layout depends on it)
    monkeypatch.setattr(WanAdapter, "num_frames", 9)
    with pytest.raises(SystemExit, match="num_frames"):
        ev.main(ev.parse_args([str(a) for a in argv]))
