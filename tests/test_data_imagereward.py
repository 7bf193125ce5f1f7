"""The ImageRewardDB reader (data/imagereward.py) against folders written by data/synthetic.py.

The expected values are read back from the written parquet / json directly, so these tests
check that the reader returns exactly what is on disk, not what the writer meant to write.
"""

from __future__ import annotations

import json
import logging
import shutil
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import shared_fixture
from PIL import Image

from data import imagereward
from data.images import BadImageError
from data.synthetic import COLOURS, write_imagereward
from data.types import ImageRef


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ir") / "ImageRewardDB"
    write_imagereward(out, prompts=24, seed=3, prompts_per_zip=4)  # 6 train zips, 8 test prompts
    return out


def _copy(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst


def _parquet_rows(root: Path, split: str) -> list[dict]:
    return pq.read_table(root / f"metadata-{split}.parquet").to_pylist()


def _snapshot(root: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_train_view_is_exactly_the_parquet(root):
    rows = _parquet_rows(root, "train")
    ts = imagereward.read_train(root)
    assert [(s.sample_id, s.prompt, s.target) for s in ts.samples] == [
        (r["image_path"], r["prompt"], r["overall_rating"]) for r in rows
    ]
    assert all(s.task == "rating" and len(s.images) == 1 for s in ts.samples)
    ratings = [r["overall_rating"] for r in rows]
    assert ts.rating_values == tuple(range(min(ratings), max(ratings) + 1))
    assert ts.skipped == Counter()
    # each image is a member of the zip its image_path names, read without extraction
    for s, r in zip(ts.samples, rows):
        part = r["image_path"].split("/")[2]
        assert s.images[0] == ImageRef(
            str(root / "images/train" / f"{part}.zip"), f"{part}/{Path(r['image_path']).name}"
        )


def test_other_rating_fields_and_fixed_scale(root):
    rows = _parquet_rows(root, "train")
    fid = imagereward.read_train(root, rating_field="fidelity_rating")
    assert [s.target for s in fid.samples] == [r["fidelity_rating"] for r in rows]
    fixed = imagereward.read_train(root, rating_values=(1, 2, 3, 4, 5))
    assert fixed.rating_values == (1, 2, 3, 4, 5)
    assert [s.target for s in fixed.samples] == [
        r["overall_rating"] for r in rows if r["overall_rating"] <= 5
    ]
    assert fixed.skipped["rating outside the scale"] == sum(r["overall_rating"] > 5 for r in rows)
    with pytest.raises(ValueError, match="single digits"):
        imagereward.read_train(root, rating_values=(0, 5, 10))


def test_a_rating_beyond_one_digit_is_skipped_not_a_new_scale(root, tmp_path):
    # the scale is configured (1-7), so a row rated 10 is skipped and counted
    dst = _copy(root, tmp_path)
    t = pq.read_table(dst / "metadata-train.parquet")
    col = t.column("overall_rating").to_pylist()
    col[0] = 10
    t = t.set_column(t.schema.get_field_index("overall_rating"), "overall_rating", pa.array(col, pa.int8()))
    pq.write_table(t, dst / "metadata-train.parquet")
    ts = imagereward.read_train(dst)
    assert ts.rating_values == (1, 2, 3, 4, 5, 6, 7)
    assert ts.skipped == {"rating outside the scale": 1}


def test_zip_json_gives_the_same_samples_as_the_parquet(root, tmp_path):
    dst = _copy(root, tmp_path)
    (dst / "metadata-train.parquet").unlink()
    from_zips = imagereward.read_train(dst)
    from_parquet = imagereward.read_train(root)
    key = [(s.sample_id, s.prompt, s.target, s.images[0].member) for s in from_parquet.samples]
    assert [(s.sample_id, s.prompt, s.target, s.images[0].member) for s in from_zips.samples] == key


def test_subsets_take_the_first_4k_train_zips(root):
    ts = imagereward.read_train(root, subset="1k")
    rows = [r for r in _parquet_rows(root, "train") if int(r["image_path"].split("/")[2].split("_")[1]) <= 4]
    assert [s.sample_id for s in ts.samples] == [r["image_path"] for r in rows]
    assert {Path(s.images[0].path).name for s in ts.samples} == {f"train_{i}.zip" for i in range(1, 5)}
    assert len(imagereward.read_train(root, subset="2k").samples) == len(_parquet_rows(root, "train"))
    with pytest.raises(ValueError, match="unknown subset"):
        imagereward.read_train(root, subset="3k")
    with pytest.raises(ValueError, match="train split only"):
        imagereward.read_train(root, split="test", subset="1k")


def test_eval_view_groups_per_prompt_with_human_ranks(root):
    rows = _parquet_rows(root, "test")
    es = imagereward.read_eval(root)
    assert len(es.groups) == len({r["prompt_id"] for r in rows}) == 8
    for g in es.groups:
        mine = [r for r in rows if r["prompt_id"] == g.group_id]
        assert g.prompt == mine[0]["prompt"]
        assert g.ranks == tuple(float(r["rank"]) for r in mine)
        assert len(g.images) == mine[0]["image_amount_in_total"]


def test_train_and_eval_views_of_one_split_agree(root):
    train_view = {(s.prompt, s.images[0]) for s in imagereward.read_train(root, split="test").samples}
    eval_view = {(g.prompt, ref) for g in imagereward.read_eval(root).groups for ref in g.images}
    assert train_view == eval_view


def test_images_decode_from_zips_without_extraction_and_carry_the_hidden_quality(root):
    before = _snapshot(root)
    mapping = json.loads((root / "synthetic.json").read_text())["colour_mapping"]
    for s in imagereward.read_train(root, split="validation").samples:
        im = s.images[0].load()
        assert im.mode == "RGB" and im.size == (64, 64)
        # the colour tier: the drawn colour sets the rating, up to +-1 label noise
        assert abs(mapping[_drawn_colour(im)] - s.target) <= 1
    assert _snapshot(root) == before, "reading or loading wrote files under the dataset root"


def _drawn_colour(im: Image.Image) -> str:
    a = np.asarray(im, dtype=float).reshape(-1, 3)
    mean = a[(a.min(axis=1) < 200) | (np.ptp(a, axis=1) > 60)].mean(axis=0)  # not the white ground
    return min(COLOURS, key=lambda k: float(((np.array(COLOURS[k]) - mean) ** 2).sum()))


def test_bad_rows_are_skipped_counted_and_logged(root, tmp_path, caplog):
    dst = _copy(root, tmp_path)
    rows = _parquet_rows(dst, "test")
    rows[0]["prompt"] = "   "  # empty prompt
    rows[1]["image_path"] = rows[1]["image_path"].replace(".webp", "-gone.webp")  # missing image
    rows[2]["rank"] = None  # malformed for the eval view
    rows[3]["image_path"] = "images/test/elsewhere/x.webp"  # names no test_N zip
    rows[4]["overall_rating"] = None
    schema = pq.read_schema(dst / "metadata-test.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), dst / "metadata-test.parquet")
    with caplog.at_level(logging.INFO):
        es = imagereward.read_eval(dst)
    assert es.skipped == Counter({"empty prompt": 1, "missing image": 1, "malformed row": 2})
    assert sum(len(g.images) for g in es.groups) == len(rows) - 4
    parquet = str(dst / "metadata-test.parquet")
    assert any(parquet + " row 1" in m and "missing image" in m for m in caplog.messages)
    assert any(parquet + " row 0" in m and "empty prompt" in m for m in caplog.messages)
    assert "skipped 4 (empty prompt: 1, malformed row: 2, missing image: 1)" in caplog.messages[-1]
    ts = imagereward.read_train(dst, split="test")
    assert ts.skipped == Counter(
        {"empty prompt": 1, "missing image": 1, "malformed row": 1, "rating missing or NaN": 1}
    )


def test_malformed_json_row_in_a_zip_is_skipped(root, tmp_path):
    dst = _copy(root, tmp_path)
    (dst / "metadata-test.parquet").unlink()
    zpath = dst / "images/test/test_1.zip"
    with zipfile.ZipFile(zpath) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    rows = json.loads(members["test_1/test_1.json"])
    rows[0] = "not a row"
    members["test_1/test_1.json"] = json.dumps(rows).encode()
    with zipfile.ZipFile(zpath, "w") as zf:  # also: members without the folder prefix
        for n, data in members.items():
            zf.writestr(n.split("/")[-1], data)
    es = imagereward.read_train(dst, split="test")
    assert es.skipped == Counter({"malformed row": 1})
    assert len(es.samples) == len(_parquet_rows(root, "test")) - 1
    assert es.samples[0].images[0].member == Path(es.samples[0].sample_id).name
    es.samples[0].images[0].load()


def test_extracted_images_are_used_when_the_zip_is_absent(root, tmp_path):
    dst = _copy(root, tmp_path)
    with zipfile.ZipFile(dst / "images/test/test_1.zip") as zf:
        zf.extractall(dst / "images/test")
    (dst / "images/test/test_1.zip").unlink()
    es = imagereward.read_eval(dst)
    ref = es.groups[0].images[0]
    assert ref.member is None and Path(ref.path).is_file()
    assert ref.load().size == (64, 64)


def test_corrupt_image_in_a_zip_is_found_lazily(root, tmp_path):
    dst = _copy(root, tmp_path)
    zpath = dst / "images/test/test_1.zip"
    with zipfile.ZipFile(zpath) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    victim = sorted(n for n in members if n.endswith(".webp"))[0]
    members[victim] = members[victim][:40]  # truncated webp
    with zipfile.ZipFile(zpath, "w") as zf:
        for n, data in members.items():
            zf.writestr(n, data)
    ref = next(r for g in imagereward.read_eval(dst).groups for r in g.images if r.member == victim)
    with pytest.raises(BadImageError, match=victim):
        ref.load()


def test_missing_split_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata-train.parquet"):
        imagereward.read_train(tmp_path)


def test_github_test_json_with_the_real_labels(tmp_path):
    # The real THUDM/ImageReward data/test.json (labels only) with a stand-in image per path.
    rows = json.loads(shared_fixture("imagereward_test.json").read_text())
    rows[1]["ranking"] = rows[1]["ranking"][:-1]  # rank/image length mismatch
    rows[2]["prompt"] = ""  # empty prompt
    rows[3] = {"id": "x", "prompt": "p"}  # malformed row
    (tmp_path / "test.json").write_text(json.dumps(rows))
    png = tmp_path / "one.png"
    Image.new("RGB", (8, 8), (5, 5, 5)).save(png)
    missing = rows[0]["generations"][0]
    for row in rows[4:] + rows[:1]:
        for g in row["generations"]:
            if g != missing:
                (tmp_path / "test_images" / g).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(png, tmp_path / "test_images" / g)
    es = imagereward.read_eval(tmp_path)
    assert len(es.groups) == 466 - 3
    assert es.skipped == Counter(
        {"rank/image length mismatch": 1, "empty prompt": 1, "malformed row": 1, "missing image": 1}
    )
    first = es.groups[0]
    assert first.group_id == rows[0]["id"] and first.ranks == tuple(float(r) for r in rows[0]["ranking"][1:])
    assert sum(len(g.images) for g in es.groups) == sum(len(r["generations"]) for r in rows[4:]) + 3
    assert es.groups[1].images[0].load().size == (28, 28)
