"""The HPDv2 reader (data/hpdv2.py) against folders written by data/synthetic.py.

Expected values come from the written train.json / test.json, read back directly.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest

from data import hpdv2
from data.synthetic import write_hpdv2
from data.types import ImageRef


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hpd") / "HPDv2"
    write_hpdv2(out, prompts=40, seed=1)  # 80 train pairs, 10 test prompts of 9 images
    return out


def _copy(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst


def _rows(root: Path, name: str) -> list[dict]:
    return json.loads((root / name).read_text())


def _paths(row: dict) -> list[str]:
    return row.get("file_path", row.get("image_path"))


def test_full_train_set_is_the_json_with_pairs_maybe_swapped(root):
    rows = _rows(root, "train.json")
    assert {"file_path", "image_path"} <= {k for r in rows for k in r}  # both path keys occur
    ts = hpdv2.read_train(root, fraction=1.0)
    assert ts.rating_values is None and ts.skipped == Counter()
    assert [s.sample_id for s in ts.samples] == [f"hpdv2-train-{i}" for i in range(len(rows))]
    for s, row in zip(ts.samples, rows):
        refs = tuple(ImageRef(str(root / "train" / p)) for p in _paths(row))
        assert s.task == "pair" and s.prompt == row["prompt"]
        assert s.images in (refs, refs[::-1])
        preferred = refs[row["human_preference"].index(1)]
        assert s.images[s.target] == preferred  # target 1 <=> the second image shown is preferred


def test_subset_is_deterministic_exact_in_size_and_seeded(root):
    n = len(_rows(root, "train.json"))
    a, b = hpdv2.read_train(root), hpdv2.read_train(root)
    assert [s.sample_id for s in a.samples] == [s.sample_id for s in b.samples]
    assert [(s.images, s.target) for s in a.samples] == [(s.images, s.target) for s in b.samples]
    assert len(a.samples) == round(0.25 * n)
    other = hpdv2.read_train(root, seed=1)
    assert {s.sample_id for s in other.samples} != {s.sample_id for s in a.samples}
    # hash-keyed, so the same on every machine and numpy version: pinned literally for 80 rows, seed 0
    assert [int(s.sample_id.rsplit("-", 1)[1]) for s in a.samples] == [
        0, 3, 9, 13, 19, 20, 23, 34, 36, 37, 41, 49, 51, 54, 56, 59, 71, 73, 74, 76
    ]  # fmt: skip
    with pytest.raises(ValueError, match="fraction"):
        hpdv2.read_train(root, fraction=0.0)


def test_order_shuffle_makes_answer_one_right_about_half_the_time(root, tmp_path):
    # Store every pair with the preferred image first: without the shuffle every target would be 0.
    dst = _copy(root, tmp_path)
    rows = _rows(dst, "train.json")
    fixed = []
    for _ in range(5):  # 400 rows over the same images
        for r in rows:
            paths = _paths(r)
            first = paths[r["human_preference"].index(1)]
            fixed.append({"prompt": r["prompt"], "image_path": [first, next(p for p in paths if p != first)],
                          "human_preference": [1, 0]})  # fmt: skip
    (dst / "train.json").write_text(json.dumps(fixed))
    ts = hpdv2.read_train(dst, fraction=1.0)
    share = sum(s.target for s in ts.samples) / len(ts.samples)
    assert 0.4 < share < 0.6, share  # 400 fair coins: sd 0.025
    for s, r in zip(ts.samples, fixed):
        assert s.images[s.target] == ImageRef(str(dst / "train" / r["image_path"][0]))


def test_eval_view_is_the_test_json(root):
    rows = _rows(root, "test.json")
    es = hpdv2.read_eval(root)
    assert len(es.groups) == len(rows) == 10
    for g, row in zip(es.groups, rows):
        assert g.prompt == row["prompt"] and len(g.images) == 9
        assert g.ranks == tuple(float(r) for r in row["rank"])
        assert g.images == tuple(ImageRef(str(root / "test" / p)) for p in row["image_path"])
    assert es.groups[0].images[0].load().size == (64, 64)


def test_paths_that_include_the_folder_or_are_absolute(root, tmp_path):
    dst = _copy(root, tmp_path)
    rows = _rows(dst, "test.json")
    rows[0]["image_path"] = [f"test/{p}" for p in rows[0]["image_path"]]
    rows[1]["image_path"] = [str(dst / "test" / p) for p in rows[1]["image_path"]]
    (dst / "test.json").write_text(json.dumps(rows))
    es = hpdv2.read_eval(dst)
    assert es.skipped == Counter()
    assert es.groups[0].images[0] == ImageRef(str(dst / "test" / Path(rows[0]["image_path"][0]).name))
    assert es.groups[1].images[0] == ImageRef(rows[1]["image_path"][0])


def test_bad_train_rows_are_skipped_counted_and_logged(root, tmp_path, caplog):
    dst = _copy(root, tmp_path)
    rows = _rows(dst, "train.json")
    rows[0]["prompt"] = ""
    rows[1] = ["not", "an", "object"]
    rows[2]["human_preference"] = [1, 1]
    (dst / "train" / _paths(rows[3])[1]).unlink()
    rows[4].pop("file_path", None)
    rows[4].pop("image_path", None)
    (dst / "train.json").write_text(json.dumps(rows))
    with caplog.at_level(logging.INFO):
        ts = hpdv2.read_train(dst, fraction=1.0)
    assert ts.skipped == Counter({"empty prompt": 1, "malformed row": 3, "missing image": 1})
    assert len(ts.samples) == len(rows) - 5
    assert any(f"{dst / 'train.json'} row 3: missing image" in m for m in caplog.messages)
    assert "skipped 5" in caplog.messages[-1]


def test_bad_test_rows_are_skipped_and_missing_images_dropped(root, tmp_path):
    dst = _copy(root, tmp_path)
    rows = _rows(dst, "test.json")
    rows[0]["rank"] = rows[0]["rank"][:8]  # 8 ranks for 9 images
    rows[1]["prompt"] = " "
    rows[2]["rank"] = ["a"] * 9
    (dst / "test" / rows[3]["image_path"][4]).unlink()
    (dst / "test.json").write_text(json.dumps(rows))
    es = hpdv2.read_eval(dst)
    assert es.skipped == Counter(
        {"rank/image length mismatch": 1, "empty prompt": 1, "malformed row": 1, "missing image": 1}
    )
    g = es.groups[0]
    assert g.group_id == "hpdv2-test-3" and len(g.images) == 8
    assert g.ranks == tuple(float(r) for i, r in enumerate(rows[3]["rank"]) if i != 4)


def test_malformed_json_file_fails_naming_it(tmp_path):
    (tmp_path / "train.json").write_text('[{"prompt": "a", ')
    with pytest.raises(ValueError, match="train.json is not valid JSON"):
        hpdv2.read_train(tmp_path)
    (tmp_path / "test.json").write_text('{"prompt": "not a list"}')
    with pytest.raises(ValueError, match="not a JSON list"):
        hpdv2.read_eval(tmp_path)
