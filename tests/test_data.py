"""Prompt files: formats and the errors a user sees."""

import pytest

from common.data import load_prompts


def test_txt_and_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert [p.text for p in load_prompts(str(tmp_path / "p.txt"))] == ["a cat", "a dog"]
    (tmp_path / "train_metadata.jsonl").write_text('{"prompt": "a cat", "tag": "single_object"}\n')
    (tmp_path / "test.txt").write_text("a dog\n")
    assert load_prompts(str(tmp_path), "train")[0].metadata["tag"] == "single_object"
    assert load_prompts(str(tmp_path), "test")[0].text == "a dog"


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a dataset"):
        load_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="contains no prompts"):
        load_prompts(str(tmp_path / "empty.txt"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_prompts(str(tmp_path / "bad.jsonl"))
    (tmp_path / "noprompt.jsonl").write_text('{"text": "a cat"}\n')
    with pytest.raises(ValueError, match="string 'prompt'"):
        load_prompts(str(tmp_path / "noprompt.jsonl"))
    (tmp_path / "p.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=".txt"):
        load_prompts(str(tmp_path / "p.csv"))
