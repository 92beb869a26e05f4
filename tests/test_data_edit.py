"""Editing prompt sets (counting_edit-style jsonl): the source image path resolves against the jsonl
file's folder, every field is kept, and a missing image fails with one line naming file and line."""

import json

import pytest
from PIL import Image

from common.data import load_prompts


def write_set(folder, rows, split="train"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}_metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def edit_row(image, count=3):
    return {"tag": "counting", "include": [{"class": "cat", "count": count}], "exclude": [], "image": image,
            "t2i_prompt": "a photo of two cats", "prompt": f"Change the number of cat in the image to {count}."}


def test_relative_image_paths_resolve_against_the_jsonl_folder(tmp_path, monkeypatch):
    data = tmp_path / "counting_edit"
    (data / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(data / "images" / "0.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere.png")
    write_set(data, [edit_row("images/0.png"), edit_row(str(tmp_path / "elsewhere.png"), 4)])
    monkeypatch.chdir(tmp_path / "counting_edit" / "images")  # the working directory plays no part
    prompts = load_prompts(str(data), "train")
    assert [p.text for p in prompts] == ["Change the number of cat in the image to 3.",
                                         "Change the number of cat in the image to 4."]
    assert prompts[0].metadata["image"] == str((data / "images" / "0.png").resolve())
    assert prompts[1].metadata["image"] == str((tmp_path / "elsewhere.png").resolve())
    assert prompts[0].metadata["t2i_prompt"] == "a photo of two cats"
    assert prompts[0].metadata["include"] == [{"class": "cat", "count": 3}]  # GenEval fields kept for the reward


def test_missing_source_image_names_file_and_line(tmp_path):
    data = tmp_path / "counting_edit"
    (data / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(data / "images" / "0.png")
    write_set(data, [edit_row("images/0.png"), edit_row("images/missing.png")])
    with pytest.raises(FileNotFoundError) as error:
        load_prompts(str(data), "train")
    message = str(error.value)
    assert "\n" not in message
    assert f"{data / 'train_metadata.jsonl'}:2" in message and "images/missing.png" in message


def test_image_field_must_be_a_path(tmp_path):
    data = write_set(tmp_path / "bad", [edit_row(None)])
    with pytest.raises(ValueError, match=r"train_metadata.jsonl:1: 'image' must be a path"):
        load_prompts(str(data), "train")


def test_missing_image_fails_in_validate_before_any_model_loads(tmp_path):
    import flow_grpo

    data = write_set(tmp_path / "edit", [edit_row("nope.png")])
    write_set(data, [edit_row("nope.png")], split="test")
    args = flow_grpo.parse_args(["--preset", "toy", "--prompts", str(data), "--output-dir", str(tmp_path / "run")])
    with pytest.raises(FileNotFoundError, match=r"train_metadata.jsonl:1: source image 'nope.png' does not exist"):
        flow_grpo.validate(args)
