"""The synthetic writer (data/synthetic.py): published layouts, determinism, the hidden quality."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data.synthetic import COLOURS, RATING_LEVELS, colour_mapping, main, write_hpdv2, write_imagereward

IR_COLUMNS = [
    "image_path", "prompt_id", "prompt", "classification", "image_amount_in_total", "rank",
    "overall_rating", "image_text_alignment_rating", "fidelity_rating",
]  # fmt: skip


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _drawn_colour(im: Image.Image) -> str:
    a = np.asarray(im, dtype=float).reshape(-1, 3)
    mean = a[(a.min(axis=1) < 200) | (np.ptp(a, axis=1) > 60)].mean(axis=0)  # not the white ground
    return min(COLOURS, key=lambda k: float(((np.array(COLOURS[k]) - mean) ** 2).sum()))


@pytest.mark.parametrize("write", [write_imagereward, write_hpdv2])
def test_same_seed_gives_byte_identical_files(tmp_path, write):
    write(tmp_path / "a", prompts=12, seed=5)
    write(tmp_path / "b", prompts=12, seed=5)
    write(tmp_path / "c", prompts=12, seed=6)
    a, b, c = (_files(tmp_path / k) for k in "abc")
    assert a == b
    assert a != c


def test_colour_mapping_is_a_seeded_permutation():
    maps = [colour_mapping(s) for s in range(12)]
    for m in maps:
        assert set(m) == set(COLOURS) and sorted(m.values()) == list(RATING_LEVELS)
    assert colour_mapping(3) == colour_mapping(3)
    assert len({tuple(m.values()) for m in maps}) > 4


def test_imagereward_layout_columns_and_dtypes(tmp_path):
    out = tmp_path / "ir"
    manifest = write_imagereward(out, prompts=10, seed=0, prompts_per_zip=4)
    assert json.loads((out / "synthetic.json").read_text()) == manifest
    assert manifest["colour_mapping"] == colour_mapping(0) and manifest["task"] == "colour"
    for split, n_prompts, n_zips in (("train", 10, 3), ("validation", 8, 2), ("test", 8, 2)):
        schema = pq.read_schema(out / f"metadata-{split}.parquet")
        assert schema.names == IR_COLUMNS
        assert all(schema.field(c).type == pa.int8() for c in IR_COLUMNS[4:])
        rows = pq.read_table(out / f"metadata-{split}.parquet").to_pylist()
        assert len({r["prompt_id"] for r in rows}) == n_prompts == manifest["counts"][split]["prompts"]
        zips = sorted((out / "images" / split).iterdir())
        assert [z.name for z in zips] == [f"{split}_{i}.zip" for i in range(1, n_zips + 1)]
        from_zips = []
        for z in zips:
            with zipfile.ZipFile(z) as zf:
                infos = zf.infolist()
                assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in infos)
                part_rows = json.loads(zf.read(f"{z.stem}/{z.stem}.json"))
                for r in part_rows:
                    data = zf.read(f"{z.stem}/{Path(r['image_path']).name}")
                    assert data[:4] == b"RIFF" and data[12:16] == b"VP8L"  # lossless WebP
                from_zips += part_rows
        assert from_zips == rows  # the per-zip json holds the parquet's rows
        for pid in {r["prompt_id"] for r in rows}:
            group = [r for r in rows if r["prompt_id"] == pid]
            assert 4 <= len(group) <= 9 and all(r["image_amount_in_total"] == len(group) for r in group)
            for x in group:  # higher rating <=> better (smaller) rank, ties share a level
                for y in group:
                    assert (x["overall_rating"] > y["overall_rating"]) == (x["rank"] < y["rank"])
            assert min(r["rank"] for r in group) == 1


def test_colour_tier_rating_follows_the_mapping_with_a_little_noise(tmp_path):
    out = tmp_path / "ir"
    write_imagereward(out, prompts=16, seed=4)
    mapping = colour_mapping(4)
    rows = pq.read_table(out / "metadata-train.parquet").to_pylist()
    off = []
    with zipfile.ZipFile(out / "images/train/train_1.zip") as zf:
        for r in rows:
            with zf.open(f"train_1/{Path(r['image_path']).name}") as fh, Image.open(fh) as im:
                off.append(r["overall_rating"] - mapping[_drawn_colour(im.convert("RGB"))])
    assert set(off) <= {-1, 0, 1}
    assert 0.8 <= off.count(0) / len(off) < 1.0  # label noise 0.1


def test_prompt_tier_columns_follow_the_documented_formula(tmp_path):
    out = tmp_path / "ir"
    manifest = write_imagereward(out, prompts=16, seed=2, task="prompt")
    assert manifest["task"] == "prompt" and manifest["colour_mapping"] is None
    rows = pq.read_table(out / "metadata-train.parquet").to_pylist()
    for r in rows:
        assert r["image_text_alignment_rating"] in (1, 4, 7) and r["fidelity_rating"] in (3, 7)
        if r["image_text_alignment_rating"] in (1, 7):  # both wrong / both right: the match terms are 0 / 5
            clean = 1 + (5 if r["image_text_alignment_rating"] == 7 else 0) + (r["fidelity_rating"] == 7)
            assert abs(r["overall_rating"] - clean) <= 1


def test_hpdv2_layout_and_labels(tmp_path):
    out = tmp_path / "hpd"
    manifest = write_hpdv2(out, prompts=30, seed=7)
    mapping = colour_mapping(7)
    train = json.loads((out / "train.json").read_text())
    test = json.loads((out / "test.json").read_text())
    assert len(train) == manifest["counts"]["train"]["pairs"] == 60
    assert [("image_path" in r, "file_path" in r) for r in train[:2]] == [(True, False), (False, True)]
    agree = 0
    for r in train:
        assert r["human_preference"] in ([1, 0], [0, 1])
        q = [
            mapping[_drawn_colour(Image.open(out / "train" / p).convert("RGB"))]
            for p in (r.get("image_path") or r["file_path"])
        ]
        assert q[0] != q[1]
        agree += (q[0] > q[1]) == (r["human_preference"] == [1, 0])
    assert agree / len(train) >= 0.75  # the better image is preferred, up to label noise 0.1
    assert len(test) == 8
    for r in test:
        assert len(r["image_path"]) == len(r["rank"]) == 9 and len(r["raw_annotations"]) == 3
        assert all((out / "test" / p).is_file() for p in r["image_path"])
        assert np.allclose(r["rank"], np.mean([a["rank"] for a in r["raw_annotations"]], axis=0), atol=1e-4)


def test_cli_writes_and_refuses_a_foreign_folder(tmp_path, capsys):
    main([str(tmp_path / "out"), "--kind", "hpdv2", "--prompts", "8", "--seed", "2", "--size", "32"])
    assert "wrote hpdv2" in capsys.readouterr().out
    assert Image.open(tmp_path / "out/train/000000.png").size == (32, 32)
    main([str(tmp_path / "out"), "--kind", "imagereward", "--prompts", "8"])  # rewriting our own run is fine
    assert not (tmp_path / "out/train.json").exists()
    assert json.loads((tmp_path / "out/synthetic.json").read_text())["kind"] == "imagereward"
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign/notes.txt").write_text("mine")
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:  # a user error: one line, exit 2, no traceback
        main([str(tmp_path / "foreign"), "--kind", "hpdv2"])
    assert refused.value.code == 2 and "refusing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0


def test_hpdv2_draw_seed_gives_other_images_of_the_same_preference_and_records_test_quality(tmp_path):
    a = write_hpdv2(tmp_path / "a", prompts=8, seed=3)
    b = write_hpdv2(tmp_path / "b", prompts=8, seed=3, draw_seed=1003)
    assert a["colour_mapping"] == b["colour_mapping"] == colour_mapping(3)
    assert (tmp_path / "a" / "train.json").read_text() != (tmp_path / "b" / "train.json").read_text()
    assert len(a["test_quality"]) == a["counts"]["test"]["prompts"] == 8
    assert all(len(q) == 9 and set(q) <= set(RATING_LEVELS) for q in a["test_quality"])
    # the annotators rank by quality plus N(0, 1) noise: the mean rank mostly follows the quality
    test = json.loads((tmp_path / "a" / "test.json").read_text())
    agree = [(qi > qj) == (ri < rj) for row, q in zip(test, a["test_quality"])
             for qi, ri in zip(q, row["rank"]) for qj, rj in zip(q, row["rank"]) if qi != qj]  # fmt: skip
    assert sum(agree) / len(agree) > 0.8
