"""SegmentWriter / SegmentedDataset: round trips against numpy references, damage, crashes."""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from rangerdl.data import SegmentedDataset, SegmentWriter, collate, open_splits
from rangerdl.data.manifest import MANIFEST_NAME

FIELDS = {"x": ("float32", (2, 3)), "y": ("int64", ()), "z": ("uint16", ())}


def reference_rows(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((n, 2, 3)).astype(np.float32),
        "y": np.arange(n, dtype=np.int64),
        "z": rng.integers(0, 65536, size=n).astype(np.uint16),
    }


def write_rows(
    path: Path, ref: dict[str, np.ndarray], segment_bytes: int, batches: list[int] | None = None
) -> Path:
    n = len(ref["y"])
    cuts = np.cumsum(batches or [n])
    starts = np.concatenate([[0], cuts[:-1]])
    with SegmentWriter(path, FIELDS, segment_bytes=segment_bytes, metadata={"task": "t"}) as w:
        for a, b in zip(starts, cuts, strict=True):
            w.append(**{k: v[a:b] for k, v in ref.items()})
    return path


def segment_files(path: Path) -> list[Path]:
    return sorted(path.glob("seg-*.npy"))


@pytest.fixture
def rows_dir(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    ref = reference_rows(1000)
    # 24 + 8 + 2 = 34 bytes per row; 4096 // 34 = 120 rows per segment -> 9 segments.
    return write_rows(tmp_path / "ds", ref, 4096, batches=[1, 7, 300, 2, 450, 240]), ref


def test_rows_round_trip_across_segments(rows_dir: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, ref = rows_dir
    ds = SegmentedDataset(path)
    assert len(ds) == 1000
    assert ds.num_segments == -(-1000 // 120)
    assert ds.metadata == {"task": "t"}
    for i in [0, 1, 119, 120, 121, 500, 959, 960, 999, -1]:
        item = ds[i]
        j = i % 1000
        assert set(item) == {"x", "y", "z"}
        assert item["x"].dtype == torch.float32 and item["x"].shape == (2, 3)
        assert torch.equal(item["x"], torch.from_numpy(ref["x"][j]))
        assert item["y"].dtype == torch.int64 and item["y"].item() == j
        # uint16 is widened to int64, the value kept exactly
        assert item["z"].dtype == torch.int64 and item["z"].item() == int(ref["z"][j])
    with pytest.raises(IndexError):
        ds[1000]
    with pytest.raises(IndexError):
        ds[-1001]


def test_getitems_equals_getitem_across_segments(
    rows_dir: tuple[Path, dict[str, np.ndarray]],
) -> None:
    path, _ = rows_dir
    ds = SegmentedDataset(path)
    indices = np.random.default_rng(1).permutation(1000)[:300].tolist()
    batched = ds.__getitems__(indices)
    for i, item in zip(indices, batched, strict=True):
        single = ds[i]
        assert single.keys() == item.keys()
        for k in item:
            assert item[k].dtype == single[k].dtype and torch.equal(item[k], single[k])


def test_segment_files_are_plain_npy_and_hashed_as_recorded(
    rows_dir: tuple[Path, dict[str, np.ndarray]],
) -> None:
    path, ref = rows_dir
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    start = 0
    for seg in manifest["segments"]:
        n = seg["num_rows"]
        for name, info in seg["files"].items():
            file = path / info["name"]
            # numpy's own reader, no mmap: the file is an ordinary .npy
            data = np.load(file, allow_pickle=False)
            np.testing.assert_array_equal(data, ref[name][start : start + n])
            assert file.stat().st_size == info["bytes"]
            raw = file.read_bytes()
            assert hashlib.sha256(raw[len(raw) - data.nbytes :]).hexdigest() == info["sha256"]
        start += n
    assert start == 1000
    assert not list(path.glob("*.tmp"))


def test_tokens_windows_match_the_stream_across_segments(tmp_path: Path) -> None:
    stream = np.random.default_rng(2).integers(0, 50000, size=10_001).astype(np.uint16)
    seq_len = 37
    with SegmentWriter(
        tmp_path, {"tokens": ("uint16", ())}, kind="tokens", seq_len=seq_len, segment_bytes=2000
    ) as w:
        for part in np.array_split(stream, 7):
            w.append(tokens=part)
    ds = SegmentedDataset(tmp_path)
    assert ds.num_segments == -(-10_001 // 1000)
    assert len(ds) == (10_001 - 1) // seq_len
    for i in range(len(ds)):
        item = ds[i]
        assert item["x"].dtype == torch.int64 and item["y"].dtype == torch.int64
        np.testing.assert_array_equal(item["x"].numpy(), stream[i * seq_len : (i + 1) * seq_len])
        np.testing.assert_array_equal(
            item["y"].numpy(), stream[i * seq_len + 1 : (i + 1) * seq_len + 1]
        )
    indices = np.random.default_rng(3).permutation(len(ds))[:100].tolist()
    for i, item in zip(indices, ds.__getitems__(indices), strict=True):
        assert torch.equal(item["x"], ds[i]["x"]) and torch.equal(item["y"], ds[i]["y"])
        item["x"].fill_(-1)  # x and y overlap in the stream but are separate copies
        np.testing.assert_array_equal(
            item["y"].numpy(), stream[i * seq_len + 1 : (i + 1) * seq_len + 1]
        )


def test_items_are_writable_copies_never_views_of_the_map(
    rows_dir: tuple[Path, dict[str, np.ndarray]],
) -> None:
    path, ref = rows_dir
    ds = SegmentedDataset(path)
    items = [ds[5], *ds.__getitems__([5, 700])]
    maps = [m for seg in ds._maps.values() for m in seg.values()]
    assert maps, "reading should have mapped the segments"
    for item in items:
        for tensor in item.values():
            ptr = tensor.untyped_storage().data_ptr()
            for m in maps:
                assert not (m.ctypes.data <= ptr < m.ctypes.data + m.nbytes)
    # Safe to write (a view of a read-only map would segfault here), and the data is unchanged.
    for item in items:
        item["x"].add_(1.0)
    assert torch.equal(ds[5]["x"], torch.from_numpy(ref["x"][5]))


def test_pickles_as_its_path_not_its_data(rows_dir: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, ref = rows_dir
    ds = SegmentedDataset(path)
    ds.__getitems__(list(range(1000)))  # map every segment first
    blob = pickle.dumps(ds)
    # The path plus, per file, its identity (inode, size, times) and header length.
    num_files = sum(len(s.files) for s in ds.manifest.segments)
    assert len(blob) < 1000 + 80 * num_files < ds.nbytes
    clone = pickle.loads(blob)
    assert clone.checksum == ds.checksum and len(clone) == len(ds)
    assert torch.equal(clone[999]["x"], torch.from_numpy(ref["x"][999]))


def test_unpickled_copy_refuses_a_replaced_dataset(
    rows_dir: tuple[Path, dict[str, np.ndarray]],
) -> None:
    path, _ = rows_dir
    blob = pickle.dumps(SegmentedDataset(path))
    write_rows(path, reference_rows(50, seed=9), 4096)
    with pytest.raises(ValueError, match="changed after the dataset was opened"):
        pickle.loads(blob)


def test_checksum_identifies_content_not_the_write(tmp_path: Path) -> None:
    ref = reference_rows(300)
    a = SegmentedDataset(write_rows(tmp_path / "a", ref, 4096))
    b = SegmentedDataset(write_rows(tmp_path / "b", ref, 4096, batches=[100, 200]))
    ref["x"][17, 0, 0] += 1
    c = SegmentedDataset(write_rows(tmp_path / "c", ref, 4096))
    assert a.checksum == b.checksum != c.checksum
    assert segment_files(tmp_path / "a")[0].name != segment_files(tmp_path / "b")[0].name


# ---- damage: each gives an error that names the file and what is wrong ----


def test_truncated_segment_is_refused(rows_dir: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, _ = rows_dir
    victim = segment_files(path)[3]
    with open(victim, "r+b") as fh:
        fh.truncate(victim.stat().st_size - 1)
    with pytest.raises(ValueError, match=rf"{victim.name}.*truncated"):
        SegmentedDataset(path)


def test_extended_segment_is_refused(rows_dir: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, _ = rows_dir
    victim = segment_files(path)[0]
    with open(victim, "ab") as fh:
        fh.write(b"\0" * 8)
    with pytest.raises(ValueError, match=rf"{victim.name}.*longer"):
        SegmentedDataset(path)


def test_deleted_segment_is_refused(rows_dir: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, _ = rows_dir
    victim = segment_files(path)[5]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{victim.name}.*missing"):
        SegmentedDataset(path)


def test_changed_data_is_caught_by_checksum_only(
    rows_dir: tuple[Path, dict[str, np.ndarray]],
) -> None:
    path, _ = rows_dir
    victim = segment_files(path)[2]
    with open(victim, "r+b") as fh:
        fh.seek(-3, 2)
        byte = fh.read(1)
        fh.seek(-3, 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    SegmentedDataset(path, verify="sizes")  # sizes, dtypes and shapes still match
    with pytest.raises(ValueError, match=rf"{victim.name}.*sha256"):
        SegmentedDataset(path, verify="checksum")


def _edit(manifest: dict, how: str) -> None:
    seg = manifest["segments"][1]
    if how == "dtype":
        manifest["fields"]["x"]["dtype"] = "float64"
    elif how == "shape":
        manifest["fields"]["x"]["shape"] = [3, 2, 1]
    elif how == "rows":
        seg["num_rows"] -= 1
        manifest["num_rows"] -= 1
        manifest["num_samples"] -= 1
    elif how == "total":
        manifest["num_samples"] += 1
    elif how == "version":
        manifest["version"] = 2
    elif how == "file":
        seg["files"]["y"]["name"] = seg["files"]["x"]["name"]
    elif how == "field":
        del seg["files"]["z"]


@pytest.mark.parametrize(
    ("how", "error", "pattern"),
    [
        ("dtype", ValueError, r"\.x\.npy: dtype float32, the manifest says float64"),
        ("shape", ValueError, r"\.x\.npy: shape \(120, 2, 3\), the manifest says \(120, 3, 2, 1\)"),
        ("rows", ValueError, r"seg-00001-\w+\.x\.npy: .*119"),
        ("total", ValueError, r"num_samples"),
        ("version", ValueError, r"'version' is 2; this rangerdl reads version 1"),
        ("file", ValueError, r"\.x\.npy: longer than written: 3008 bytes, the manifest says 1088"),
        ("field", ValueError, r"segments\[1\]: files for fields"),
    ],
)
def test_edited_manifest_is_refused(
    rows_dir: tuple[Path, dict[str, np.ndarray]], how: str, error: type, pattern: str
) -> None:
    path, _ = rows_dir
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    _edit(manifest, how)
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(error, match=pattern):
        SegmentedDataset(path)


def test_unreadable_or_missing_manifest_is_refused(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "ds", reference_rows(10), 4096)
    text = (path / MANIFEST_NAME).read_text()
    (path / MANIFEST_NAME).write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=rf"{MANIFEST_NAME}: not valid JSON"):
        SegmentedDataset(path)
    (path / MANIFEST_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=r"manifest\.json not found"):
        SegmentedDataset(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SegmentedDataset(tmp_path / "nowhere")
    write_rows(tmp_path / "train", reference_rows(10), 4096)
    with pytest.raises(FileNotFoundError, match=r"holds the splits \['train'\]: open one of them"):
        SegmentedDataset(tmp_path)


# ---- crashes: the manifest is the commit marker ----


def test_exception_while_writing_leaves_nothing(tmp_path: Path) -> None:
    ref = reference_rows(500)
    with (
        pytest.raises(RuntimeError, match="boom"),
        SegmentWriter(tmp_path, FIELDS, segment_bytes=4096) as w,
    ):
        w.append(**{k: v[:400] for k, v in ref.items()})
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


CRASH_SCRIPT = """
import os, sys
import numpy as np
from rangerdl.data import SegmentWriter
n = 500
with SegmentWriter(sys.argv[1], {"x": ("float32", (2, 3)), "y": ("int64", ()), "z": ("uint16", ())},
                   segment_bytes=4096) as w:
    w.append(x=np.zeros((n, 2, 3), np.float32), y=np.arange(n), z=np.zeros(n, np.uint16))
    os._exit(3)  # killed mid-write: no cleanup, no manifest
"""


def _crash_writer(path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CRASH_SCRIPT), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr


def test_killed_writer_leaves_nothing_that_opens(tmp_path: Path) -> None:
    _crash_writer(tmp_path)
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.endswith(".npy") for n in leftovers) and any(n.endswith(".tmp") for n in leftovers)
    with pytest.raises(FileNotFoundError, match="write did not finish"):
        SegmentedDataset(tmp_path)
    # The next complete write clears the debris.
    write_rows(tmp_path, reference_rows(10), 4096)
    assert len(SegmentedDataset(tmp_path, verify="checksum")) == 10
    assert len(segment_files(tmp_path)) == 3


def test_killed_rewrite_keeps_the_old_dataset(
    rows_dir: tuple[Path, dict[str, np.ndarray]],
) -> None:
    path, ref = rows_dir
    before = SegmentedDataset(path, verify="checksum")
    _crash_writer(path)
    after = SegmentedDataset(path, verify="checksum")
    assert after.checksum == before.checksum
    assert torch.equal(after[999]["x"], torch.from_numpy(ref["x"][999]))


def test_complete_rewrite_replaces_and_cleans(
    rows_dir: tuple[Path, dict[str, np.ndarray]],
) -> None:
    path, _ = rows_dir
    ref = reference_rows(30, seed=4)
    write_rows(path, ref, 4096)
    ds = SegmentedDataset(path)
    assert len(ds) == 30 and len(segment_files(path)) == 3
    assert torch.equal(ds[29]["x"], torch.from_numpy(ref["x"][29]))


# ---- writer input checks ----


@pytest.mark.parametrize(
    ("arrays", "pattern"),
    [
        ({"x": np.zeros((2, 2, 3)), "y": np.zeros(2, np.int64)}, r"missing fields \['z'\]"),
        (
            {"x": np.zeros((2, 3, 2)), "y": np.zeros(2, np.int64), "z": np.zeros(2, np.uint16)},
            r"'x' has shape \(2, 3, 2\), expected \(n, 2, 3\)",
        ),
        (
            {"x": np.zeros((2, 2, 3)), "y": np.zeros(2), "z": np.zeros(2, np.uint16)},
            r"'y' is int64; cannot store float64",
        ),
        (
            {"x": np.zeros((2, 2, 3)), "y": np.zeros(2, np.int64), "z": np.array([1, 70000])},
            r"'z' is uint16 \[0, 65535\]; got values in \[1, 70000\]",
        ),
        (
            {"x": np.zeros((2, 2, 3)), "y": np.zeros(3, np.int64), "z": np.zeros(2, np.uint16)},
            "different lengths",
        ),
    ],
)
def test_append_rejects_bad_batches(tmp_path: Path, arrays: dict, pattern: str) -> None:
    w = SegmentWriter(tmp_path, FIELDS)
    with pytest.raises(ValueError, match=pattern):
        w.append(**arrays)


def test_append_casts_when_nothing_is_lost(tmp_path: Path) -> None:
    with SegmentWriter(tmp_path, FIELDS) as w:
        w.append(x=np.full((2, 2, 3), 0.5), y=[3, 4], z=np.array([0, 65535], np.int64))
    ds = SegmentedDataset(tmp_path)
    assert ds[1]["x"].dtype == torch.float32 and ds[1]["z"].item() == 65535


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"fields": {"mask": ("bool", ())}}, "reserved"),
        ({"fields": {"a b": ("int64", ())}}, "field name"),
        ({"fields": {"x": ("uint64", ())}}, "uint64 is not supported"),
        ({"fields": {"x": ("int64", (0,))}}, "positive ints"),
        ({"fields": {"tokens": ("uint8", ())}, "kind": "tokens"}, "seq_len must be a positive"),
        ({"fields": {"t": ("uint8", ())}, "kind": "tokens", "seq_len": 4}, "named 'tokens'"),
        ({"fields": {"x": ("int64", ())}, "metadata": {"a": object()}}, "plain JSON"),
        ({"fields": {"x": ("int64", ())}, "kind": "images"}, "kind must be"),
    ],
)
def test_writer_rejects_bad_configuration(tmp_path: Path, kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        SegmentWriter(tmp_path / "ds", **kwargs)
    assert not (tmp_path / "ds").exists()  # constructors do no I/O


def test_empty_write_is_refused_and_leaves_the_old_dataset(
    rows_dir: tuple[Path, dict[str, np.ndarray]],
) -> None:
    path, _ = rows_dir
    checksum = SegmentedDataset(path).checksum
    with pytest.raises(ValueError, match="no samples"), SegmentWriter(path, FIELDS):
        pass
    with (
        pytest.raises(ValueError, match="need seq_len"),
        SegmentWriter(path, {"tokens": ("uint8", ())}, kind="tokens", seq_len=8) as w,
    ):
        w.append(tokens=np.zeros(8, np.uint8))  # 8 tokens: no window of 8 + 1
    assert SegmentedDataset(path, verify="checksum").checksum == checksum


# ---- padding, collate, splits ----


def test_padding_item_and_collate_mask(rows_dir: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, ref = rows_dir
    ds = SegmentedDataset(path)
    items = ds.__getitems__([3, None, 4, None])
    pad = items[1]
    assert pad["mask"].item() is False
    assert pad["x"].shape == (2, 3) and pad["z"].dtype == torch.int64
    batch = collate(items)
    assert batch["mask"].tolist() == [True, False, True, False]
    assert batch["x"].shape == (4, 2, 3)
    assert torch.equal(batch["x"][2], torch.from_numpy(ref["x"][4]))
    assert torch.count_nonzero(batch["x"][1]) == 0
    full = collate(ds.__getitems__([1, 2]))
    assert set(full) == {"x", "y", "z"} and full["y"].tolist() == [1, 2]
    with pytest.raises(ValueError, match="empty batch"):
        collate([])


def test_open_splits(tmp_path: Path) -> None:
    ref = reference_rows(20)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_splits(tmp_path / "nowhere")
    write_rows(tmp_path / "test", ref, 4096)
    with pytest.raises(FileNotFoundError, match=r"train.*found splits \['test'\]"):
        open_splits(tmp_path)
    write_rows(tmp_path / "train", ref, 4096)
    write_rows(tmp_path / "val", ref, 4096)
    (tmp_path / "notes").mkdir()
    splits = open_splits(tmp_path)
    assert list(splits) == ["train", "val", "test"]
    with pytest.raises(FileNotFoundError, match="single dataset"):
        open_splits(tmp_path / "train")


def test_batched_read_collates_like_stacking_single_items(
    rows_dir: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    from torch.utils.data import default_collate

    with SegmentWriter(
        tmp_path / "tok", {"tokens": ("uint8", ())}, kind="tokens", seq_len=5, segment_bytes=64
    ) as w:
        w.append(tokens=np.arange(200, dtype=np.uint8))
    for ds, indices, keys in [
        (SegmentedDataset(rows_dir[0]), [999, 0, None, 120, 119, -2, None], {"x", "y", "z"}),
        # 64-token segments: windows 12 and 25 span two of them
        (SegmentedDataset(tmp_path / "tok"), [12, None, 0, 25, 37, 38], {"x", "y"}),
    ]:
        fast = collate(ds.__getitems__(indices))
        slow = collate([ds[i] for i in indices])
        generic = default_collate(ds.__getitems__(indices))
        assert fast.keys() == slow.keys() == generic.keys() == keys | {"mask"}
        for key in fast:
            assert fast[key].dtype == slow[key].dtype and torch.equal(fast[key], slow[key]), key
            assert torch.equal(generic[key], slow[key]), key
        with pytest.raises(IndexError, match=f"index {len(ds)} out of range"):
            ds.__getitems__([0, len(ds)])
