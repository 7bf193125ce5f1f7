"""Bad input, data side: damaged copies of the synthetic datasets are read without a traceback and
without silently wrong data. Every damage is applied to real files written by ``data.synthetic``;
each test checks what was skipped (by reason), that the rest is exactly what is on disk, and that
nothing outside the dataset folder is opened.
"""

from __future__ import annotations

import json
import math
import shutil
import zipfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.config import ConfigError, load_config
from common.errors import DataError
from data import hpdv2, imagereward
from data.prompts import messages_for
from data.sets import drop_long_prompts, inside_root
from data.synthetic import write_hpdv2, write_imagereward


@pytest.fixture(scope="module")
def ir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ir") / "ImageRewardDB"
    write_imagereward(out, prompts=12, seed=5, prompts_per_zip=4)  # 3 train zips
    return out


@pytest.fixture(scope="module")
def hpd(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hpd") / "HPDv2"
    write_hpdv2(out, prompts=10, seed=2)  # 20 train pairs, 8 test prompts
    return out


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _set_column(path: Path, name: str, values: list, type_=None) -> None:
    """Rewrite one parquet column (as pandas would: a float column once it holds NaN)."""
    t = pq.read_table(path)
    t = t.set_column(t.schema.get_field_index(name), name, pa.array(values, type_))
    pq.write_table(t, path)


def _column(path: Path, name: str) -> list:
    return pq.read_table(path).column(name).to_pylist()


# ------------------------------------------------------------------ class 1: the rating scale


@pytest.mark.parametrize("bad", [8, 0, -1, 10, 3.5, float("nan"), None], ids=str)
def test_one_bad_rating_is_skipped_and_never_changes_the_scale(ir, tmp_path, bad):
    root = _copy(ir, tmp_path)
    meta = root / "metadata-train.parquet"
    ratings = _column(meta, "overall_rating")
    _set_column(meta, "overall_rating", [bad, *ratings[1:]], pa.float64())
    ts = imagereward.read_train(root)
    assert ts.rating_values == (1, 2, 3, 4, 5, 6, 7), "one bad row must not change the task"
    assert sum(ts.skipped.values()) == 1, ts.skipped
    reason = next(iter(ts.skipped))
    if bad is None or (isinstance(bad, float) and math.isnan(bad)):
        assert reason == "rating missing or NaN"
    elif bad == 3.5:
        assert reason == "rating not an integer"
    else:
        assert reason == "rating outside the scale"
    assert [s.target for s in ts.samples] == ratings[1:]
    # the prompt the model reads keeps the configured scale
    text = messages_for("rating", "a cat", 1, ts.rating_values)[0]["content"][-1]["text"]
    assert "from 1 (worst) to 7 (best)" in text


def test_bad_ratings_are_skipped_in_evaluation_too(ir, tmp_path):
    root = _copy(ir, tmp_path)
    meta = root / "metadata-test.parquet"
    ratings = _column(meta, "overall_rating")
    _set_column(meta, "overall_rating", [8.0, 2.5, *ratings[2:]], pa.float64())
    clean = imagereward.read_eval(ir, rating_field="overall_rating", rating_values=tuple(range(1, 8)))
    es = imagereward.read_eval(root, rating_field="overall_rating", rating_values=tuple(range(1, 8)))
    assert es.skipped == Counter({"rating outside the scale": 1, "rating not an integer": 1})
    assert sum(len(g.images) for g in es.groups) == sum(len(g.images) for g in clean.groups) - 2


def test_scale_comes_from_the_config(ir):
    cfg = load_config(None, [f"data.root={ir}", "data.rating_min=2", "data.rating_max=6"])
    assert cfg.data.rating_values == (2, 3, 4, 5, 6)
    ts = imagereward.read_train(ir, rating_values=cfg.data.rating_values)
    assert ts.rating_values == (2, 3, 4, 5, 6)
    assert all(2 <= s.target <= 6 for s in ts.samples)
    assert ts.skipped["rating outside the scale"] == sum(
        r not in range(2, 7) for r in _column(ir / "metadata-train.parquet", "overall_rating")
    )
    for bad in (["data.rating_max=10"], ["data.rating_min=5", "data.rating_max=5"], ["data.rating_min=-1"]):
        with pytest.raises(ConfigError, match="rating_min"):
            load_config(None, bad)


def test_negative_rank_in_evaluation_names_the_row(ir, tmp_path):
    root = _copy(ir, tmp_path)
    meta = root / "metadata-test.parquet"
    ranks = _column(meta, "rank")
    _set_column(meta, "rank", [-1, 1.5, *ranks[2:]], pa.float64())
    es = imagereward.read_eval(root)
    assert es.skipped == Counter({"malformed row": 2})


# ---------------------------------------------------------------- class 3: decoding, named files


def test_invalid_utf8_in_parquet_skips_only_that_row(ir, tmp_path):
    root = _copy(ir, tmp_path)
    meta = root / "metadata-train.parquet"
    prompts = [p.encode() for p in _column(meta, "prompt")]
    prompts[2] = b"a red \xff\xfe circle"
    _set_column(meta, "prompt", pa.array(prompts, pa.binary()).view(pa.string()))
    with pytest.raises(UnicodeDecodeError):  # the damage is real: pyarrow itself cannot read it back
        pq.read_table(meta).to_pylist()
    ts = imagereward.read_train(root)
    assert ts.skipped == Counter({"prompt not valid UTF-8": 1})
    assert len(ts.samples) == len(prompts) - 1


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_unreadable_parquet_is_an_error_naming_it(ir, tmp_path, damage):
    root = _copy(ir, tmp_path)
    meta = root / "metadata-train.parquet"
    data = meta.read_bytes()
    meta.write_bytes(
        {"garbage": b"\x00PAR1 not parquet" * 50, "truncated": data[: len(data) // 2], "empty": b""}[damage]
    )
    with pytest.raises(DataError, match="metadata-train.parquet"):
        imagereward.read_train(root)


def _zip_layout(ir: Path, tmp_path: Path) -> Path:
    root = _copy(ir, tmp_path)
    (root / "metadata-train.parquet").unlink()  # read the {split}_N.json inside each zip instead
    return root


def test_truncated_zip_in_the_json_fallback_is_skipped_and_counted(ir, tmp_path):
    root = _zip_layout(ir, tmp_path)
    whole = imagereward.read_train(root)
    victim = root / "images/train/train_2.zip"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])
    ts = imagereward.read_train(root)
    assert ts.skipped == Counter({"unreadable zip": 1})
    assert {s.sample_id for s in ts.samples} == {
        s.sample_id for s in whole.samples if "train_2/" not in s.sample_id
    }


@pytest.mark.parametrize(
    "payload", [b"{not json", b"\xff\xfe\x00garbled", b'{"a": 1}'], ids=["json", "bytes", "object"]
)
def test_garbled_json_inside_a_zip_is_skipped_and_counted(ir, tmp_path, payload):
    root = _zip_layout(ir, tmp_path)
    victim = root / "images/train/train_3.zip"
    with zipfile.ZipFile(victim) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    with zipfile.ZipFile(victim, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, payload if name.endswith(".json") else data)
    ts = imagereward.read_train(root)
    assert ts.skipped == Counter({"unreadable zip": 1}) and ts.samples


def test_every_zip_unreadable_is_one_error(ir, tmp_path):
    root = _zip_layout(ir, tmp_path)
    for z in (root / "images/train").glob("*.zip"):
        z.write_bytes(b"")
    with pytest.raises(DataError, match="no usable rows.*unreadable zip"):
        imagereward.read_train(root)


@pytest.mark.parametrize("name", ["train.json", "test.json"])
def test_invalid_utf8_in_hpdv2_json_skips_only_that_row(hpd, tmp_path, name):
    root = _copy(hpd, tmp_path)
    path = root / name
    text = path.read_bytes()
    first = json.loads(text)[0]["prompt"].encode()
    assert text.count(first) >= 1
    path.write_bytes(
        text.replace(first, first[:3] + b"\xc3\x28" + first[3:], 1)
    )  # an invalid 2-byte sequence
    with pytest.raises(UnicodeDecodeError):
        json.loads(path.read_bytes())
    if name == "train.json":
        ts = hpdv2.read_train(root, fraction=1.0)
        assert ts.skipped == Counter({"prompt not valid UTF-8": 1})  # only the row that holds the bytes
        assert len(ts.samples) == len(json.loads(text)) - 1
    else:
        es = hpdv2.read_eval(root)
        assert es.skipped["prompt not valid UTF-8"] >= 1
        assert len(es.groups) == len(json.loads(text)) - es.skipped["prompt not valid UTF-8"]


@pytest.mark.parametrize(
    "content", [b"", b"[{", b"\x89PNG\r\n\x1a\n", b'{"rows": []}', b"[" * 100000 + b"]" * 100000]
)
def test_hpdv2_json_that_does_not_parse_names_the_file(hpd, tmp_path, content):
    root = _copy(hpd, tmp_path)
    (root / "train.json").write_bytes(content)
    with pytest.raises(DataError, match="train.json"):
        hpdv2.read_train(root)


def test_missing_hpdv2_json_is_an_oserror_naming_it(hpd, tmp_path):
    root = _copy(hpd, tmp_path)
    (root / "test.json").unlink()
    with pytest.raises(FileNotFoundError, match="test.json"):
        hpdv2.read_eval(root)


# ------------------------------------------------------------------------ prompts that cannot run


def test_lone_surrogate_prompt_is_skipped(hpd, tmp_path, tiny):
    root = _copy(hpd, tmp_path)
    rows = json.loads((root / "train.json").read_text())
    rows[0]["prompt"] = "a red \ud800 circle"  # json.dumps writes the escape \ud800: valid JSON, invalid text
    (root / "train.json").write_text(json.dumps(rows))
    ts = hpdv2.read_train(root, fraction=1.0)
    assert ts.skipped == Counter({"prompt not valid UTF-8": 1})
    _, processor = tiny
    with pytest.raises(Exception):  # noqa: B017 — the damage is real: this is what would have crashed training
        processor.tokenizer.encode(rows[0]["prompt"])


def test_long_prompts_are_skipped_and_counted(ir, tmp_path, tiny):
    _, processor = tiny
    root = _copy(ir, tmp_path)
    meta = root / "metadata-train.parquet"
    prompts = _column(meta, "prompt")
    prompts[0] = "a red circle " * 8000  # ~100,000 characters
    prompts[1] = "x" * 2000
    _set_column(meta, "prompt", prompts)
    ts = imagereward.read_train(root)
    n_long = len(processor.tokenizer.encode(prompts[0]))
    assert n_long > 512
    skipped = Counter()
    kept = drop_long_prompts(ts.samples, processor.tokenizer, 512, skipped, "sample")
    assert skipped["prompt too long"] == 2 and len(kept) == len(ts.samples) - 2
    assert all(len(s.prompt) < 1000 for s in kept)
    assert drop_long_prompts(ts.samples, processor.tokenizer, 0, Counter(), "sample") == ts.samples
    short = len(processor.tokenizer.encode(prompts[2]))
    assert len(drop_long_prompts(ts.samples[2:3], processor.tokenizer, short, Counter(), "s")) == 1
    assert len(drop_long_prompts(ts.samples[2:3], processor.tokenizer, short - 1, Counter(), "s")) == 0


@pytest.mark.parametrize("prompt", ["", "   ", None, 7, ["a"]], ids=repr)
def test_empty_or_non_text_prompts_are_skipped(hpd, tmp_path, prompt):
    root = _copy(hpd, tmp_path)
    rows = json.loads((root / "test.json").read_text())
    rows[1]["prompt"] = prompt
    (root / "test.json").write_text(json.dumps(rows))
    assert hpdv2.read_eval(root).skipped == Counter({"empty prompt": 1})


# -------------------------------------------------------- class 4: containment and duplicates


def test_inside_root_by_hand(tmp_path):
    root = tmp_path / "data"
    assert inside_root(root, "a/b.png") == str(root / "a/b.png")
    assert inside_root(root, "a/../b.png") == str(root / "b.png")
    assert inside_root(root, str(root / "x.png")) == str(root / "x.png")  # absolute but inside
    for bad in ("../x.png", "a/../../x.png", "/etc/passwd", str(tmp_path / "data2/x.png"), "", "a\0b"):
        assert inside_root(root, bad) is None, bad


def _outside_image(tmp_path: Path, src: Path) -> Path:
    """A real, decodable image outside the dataset folder: escaping rows would open it."""
    outside = tmp_path / "outside" / src.name
    outside.parent.mkdir(exist_ok=True)
    shutil.copy(src, outside)
    return outside


def test_hpdv2_paths_that_escape_the_root_are_skipped(hpd, tmp_path):
    root = _copy(hpd, tmp_path)
    rows = json.loads((root / "train.json").read_text())

    def key(r):
        return "file_path" if "file_path" in r else "image_path"

    outside = _outside_image(tmp_path, root / "train" / rows[0][key(rows[0])][0])
    rows[0][key(rows[0])][0] = f"../../outside/{outside.name}"  # relative to ROOT/train/
    rows[1][key(rows[1])] = [str(outside), rows[1][key(rows[1])][1]]  # absolute, elsewhere
    rows[2][key(rows[2])][1] = "../../../../../../etc/passwd"
    (root / "train.json").write_text(json.dumps(rows))
    ts = hpdv2.read_train(root, fraction=1.0)
    assert ts.skipped == Counter({"image path outside the dataset folder": 3})
    used = {ref.path for s in ts.samples for ref in s.images}
    assert not any(str(outside) in p or "passwd" in p for p in used)

    test = json.loads((root / "test.json").read_text())
    test[0]["image_path"][0] = str(outside)
    (root / "test.json").write_text(json.dumps(test))
    es = hpdv2.read_eval(root)
    assert es.skipped == Counter({"image path outside the dataset folder": 1})
    assert len(es.groups[0].images) == 8


def test_imagereward_paths_that_escape_the_root_are_skipped(ir, tmp_path):
    root = _copy(ir, tmp_path)
    meta = root / "metadata-train.parquet"
    paths = _column(meta, "image_path")
    # extracted copies outside the folder, where the escaping paths point
    with zipfile.ZipFile(root / "images/train/train_1.zip") as zf:
        member = next(n for n in zf.namelist() if n.endswith(".webp"))
        (tmp_path / "outside/train_1").mkdir(parents=True)
        (tmp_path / "outside/train_1/escaped.webp").write_bytes(zf.read(member))
    paths[0] = "../outside/train_1/escaped.webp"
    paths[1] = str(tmp_path / "outside/train_1/escaped.webp")
    _set_column(meta, "image_path", paths)
    ts = imagereward.read_train(root)
    assert ts.skipped == Counter({"image path outside the dataset folder": 2})
    assert not any("outside" in str(s.images[0]) for s in ts.samples)


def test_a_symlinked_image_folder_inside_the_root_is_still_read(hpd, tmp_path):
    # the user's own layout choice: HPDv2/test -> a folder elsewhere (e.g. another disk)
    root = _copy(hpd, tmp_path)
    elsewhere = tmp_path / "big-disk-test"
    shutil.move(root / "test", elsewhere)
    (root / "test").symlink_to(elsewhere)
    es = hpdv2.read_eval(root)
    assert es.skipped == Counter() and len(es.groups) == len(json.loads((root / "test.json").read_text()))


def test_imagereward_duplicate_rows_are_dropped(ir, tmp_path):
    root = _copy(ir, tmp_path)
    meta = root / "metadata-train.parquet"
    t = pq.read_table(meta)
    pq.write_table(pa.concat_tables([t, t.slice(0, 3)]), meta)  # three rows repeated at the end
    ts = imagereward.read_train(root)
    assert ts.skipped == Counter({"duplicate row": 3})
    assert [s.sample_id for s in ts.samples] == t.column("image_path").to_pylist()

    test_meta = root / "metadata-test.parquet"
    t = pq.read_table(test_meta)
    pq.write_table(pa.concat_tables([t, t.slice(0, 1)]), test_meta)
    es = imagereward.read_eval(root)
    assert es.skipped == Counter({"duplicate row": 1})
    assert sum(len(g.images) for g in es.groups) == t.num_rows


def test_hpdv2_duplicate_pairs_are_dropped_but_disagreement_is_kept(hpd, tmp_path):
    root = _copy(hpd, tmp_path)
    rows = json.loads((root / "train.json").read_text())
    n = len(rows)
    key = lambda r: "file_path" if "file_path" in r else "image_path"  # noqa: E731
    same = dict(rows[0])
    swapped = dict(rows[1])  # the same pair shown the other way round, same winner
    swapped[key(swapped)] = rows[1][key(rows[1])][::-1]
    swapped["human_preference"] = rows[1]["human_preference"][::-1]
    opposite = dict(rows[2])  # the same pair, the other image preferred: disagreement, kept
    opposite["human_preference"] = rows[2]["human_preference"][::-1]
    (root / "train.json").write_text(json.dumps(rows + [same, swapped, opposite]))
    ts = hpdv2.read_train(root, fraction=1.0)
    assert ts.skipped == Counter({"duplicate row": 2})
    assert len(ts.samples) == n + 1


def test_hpdv2_test_duplicates(hpd, tmp_path):
    root = _copy(hpd, tmp_path)
    rows = json.loads((root / "test.json").read_text())
    rows[0]["image_path"].append(rows[0]["image_path"][0])
    rows[0]["rank"].append(5.0)
    rows.append(json.loads(json.dumps(rows[3])))
    (root / "test.json").write_text(json.dumps(rows))
    es = hpdv2.read_eval(root)
    assert es.skipped == Counter({"duplicate row": 2})
    assert len(es.groups) == len(rows) - 1 and len(es.groups[0].images) == 9


def test_github_test_json_escapes_and_duplicates(tmp_path, ir):
    root = tmp_path / "gh"
    images = root / "test_images"
    images.mkdir(parents=True)
    with zipfile.ZipFile(next((ir / "images/test").glob("*.zip"))) as zf:
        webps = [n for n in zf.namelist() if n.endswith(".webp")][:3]
        for i, n in enumerate(webps):
            (images / f"{i}.webp").write_bytes(zf.read(n))
    outside = _outside_image(tmp_path, images / "0.webp")
    rows = [
        {
            "id": "a",
            "prompt": "p",
            "generations": ["0.webp", "1.webp", "2.webp", "0.webp"],
            "ranking": [1, 2, 3, 1],
        },
        {
            "id": "b",
            "prompt": "q",
            "generations": ["0.webp", "../../outside/0.webp", "1.webp"],
            "ranking": [1, 2, 3],
        },
        {"id": "c", "prompt": "p", "generations": ["0.webp", "1.webp", "2.webp"], "ranking": [1, 2, 3]},
    ]
    (root / "test.json").write_text(json.dumps(rows))
    assert outside.is_file()
    es = imagereward.read_eval(root)
    assert es.skipped == Counter({"duplicate row": 2, "image path outside the dataset folder": 1})
    assert [g.group_id for g in es.groups] == ["a", "b"]
