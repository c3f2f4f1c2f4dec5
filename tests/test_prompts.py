"""Prompt sources: shipped lists, .txt and .json files, and the HPDv2 benchmark from the Hugging Face
cache; every mistake is one line that names the fix. (The real hub download needs a network: untested.)"""

import json

import pytest

from rlfuse.errors import UserError
from rlfuse.prompts import HPDV2_STYLES, load_prompts, shipped_lists


def test_every_shipped_list_loads_with_its_documented_count():
    counts = {"dpok_single": 4, "dpok_rabbit": 1, "drawbench_dpok": 183, "d3po_imagereward": 1000, "d3po_unsafe": 14}
    for name, count in counts.items():
        assert len(load_prompts(name)) == count, name
    assert set(counts) <= set(shipped_lists())


def test_dpok_single_keeps_the_final_periods_of_dpoks_code():
    assert load_prompts("dpok_single")[:2] == ["A green colored rabbit.", "A cat and a dog."]


def test_a_json_list_of_strings_loads_in_order(tmp_path):
    path = tmp_path / "anime.json"
    path.write_text(json.dumps(["A cat in a hat.", " Two dogs. ", ""]))
    assert load_prompts(str(path)) == ["A cat in a hat.", "Two dogs."]


@pytest.mark.parametrize("content, expected", [
    ('["a cat", ', "is not valid JSON"),
    ('{"prompts": ["a cat"]}', "not a list of strings"),
    ('["a cat", 3]', "not a list of strings"),
    ("[]", "holds no prompts"),
])
def test_a_malformed_json_file_is_one_line_naming_the_fix(tmp_path, content, expected):
    path = tmp_path / "prompts.json"
    path.write_text(content)
    with pytest.raises(UserError) as error:
        load_prompts(str(path))
    assert expected in str(error.value) and len(str(error.value).splitlines()) == 1


def empty_offline_hub(monkeypatch, cache):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))


def test_hpdv2_offline_and_not_cached_is_one_line_naming_the_download_command(tmp_path, monkeypatch):
    empty_offline_hub(monkeypatch, tmp_path)
    with pytest.raises(UserError) as error:
        load_prompts("hpdv2")
    message = str(error.value)
    assert 'hf download zhwang/HPDv2 --repo-type dataset --include "benchmark/*.json"' in message
    assert "prompts=file prompts.train=" in message and len(message.splitlines()) == 1


def test_hpdv2_reads_the_benchmark_files_from_the_hub_cache_offline(tmp_path, monkeypatch):
    """A cache laid out as huggingface_hub writes it (refs/main -> snapshots/<commit>/benchmark/)."""
    empty_offline_hub(monkeypatch, tmp_path)
    repo, commit = tmp_path / "datasets--zhwang--HPDv2", "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit / "benchmark").mkdir(parents=True)
    for style in HPDV2_STYLES:
        (repo / "snapshots" / commit / "benchmark" / f"{style}.json").write_text(json.dumps([f"{style} 0", f"{style} 1"]))
    assert load_prompts("hpdv2:paintings") == ["paintings 0", "paintings 1"]
    assert load_prompts("hpdv2") == [f"{style} {i}" for style in HPDV2_STYLES for i in (0, 1)]


def test_an_unknown_hpdv2_style_is_one_line_listing_the_styles():
    with pytest.raises(UserError) as error:
        load_prompts("hpdv2:cartoon")
    message = str(error.value)
    assert all(f"hpdv2:{style}" in message for style in HPDV2_STYLES) and len(message.splitlines()) == 1


def test_a_missing_source_names_the_shipped_lists_and_the_file_forms():
    with pytest.raises(UserError) as error:
        load_prompts("/no/such/prompts.txt")
    assert "drawbench_dpok" in str(error.value) and ".json" in str(error.value)
