"""Hostile or damaged input to the data layer: every problem is one line naming the
file (and row and column where there is one), never a traceback, an OOM or silent training."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from rangerdl.cli import main
from rangerdl.data import SegmentedDataset, integrity, open_splits, prepare

# ---- one large label ---------------------------------------------------------------------------


def test_label_far_above_the_distinct_labels_is_refused_naming_the_file(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((10, 3)))
    np.save(tmp_path / "y.npy", np.array([0, 10**6] * 5))  # 10**9 was an OOM kill
    with pytest.raises(ValueError, match=r"y\.npy: label 1000000 would make 1000001 classes, but"):
        prepare("arrays", tmp_path / "out", x=tmp_path / "x.npy", y=tmp_path / "y.npy")
    assert not (tmp_path / "out").exists()


def test_integer_labels_store_no_generated_class_names(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((40, 2)))
    np.save(tmp_path / "y.npy", np.arange(40) % 4 * 100)  # classes 0, 100, 200, 300: K = 301
    out = prepare("arrays", tmp_path / "out", x=tmp_path / "x.npy", y=tmp_path / "y.npy")
    meta = SegmentedDataset(out / "train").metadata
    assert meta["num_classes"] == 301 and "class_names" not in meta


def test_synthetic_with_more_classes_than_samples_is_refused(tmp_path: Path) -> None:
    # 10**9 classes made a (10**9, *shape) array of class means
    with pytest.raises(ValueError, match="num_classes 1000000 is more than samples 10"):
        prepare("synthetic", tmp_path / "s", samples=10, shape=(2,), num_classes=10**6)


# ---- non-finite input --------------------------------------------------------------------------


def test_nan_and_inf_in_a_csv_are_refused_naming_line_and_column(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("a,b,label\n1,2,0\n3,nan,1\n5,6,0\n7,8,1\n9,-inf,0\n")
    with pytest.raises(ValueError, match=r"t\.csv: row 1 \(line 3\), column 1 'b': holds nan"):
        prepare("arrays", tmp_path / "o", x=tmp_path / "t.csv", label_column="label")


def test_inf_in_npy_and_float32_overflow_are_refused(tmp_path: Path) -> None:
    x = np.zeros((6, 2, 3))
    x[4, 1, 2] = np.inf
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.arange(6) % 2)
    with pytest.raises(ValueError, match=r"x\.npy: row 4, position \(1, 2\): holds inf"):
        prepare("arrays", tmp_path / "o", x=tmp_path / "x.npy", y=tmp_path / "y.npy")
    x[4, 1, 2] = 1e39  # finite in float64, inf once stored as float32
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(ValueError, match=r"row 4, position \(1, 2\): 1e\+39 does not fit float32"):
        prepare("arrays", tmp_path / "o", x=tmp_path / "x.npy", y=tmp_path / "y.npy")
    np.save(tmp_path / "x.npy", np.zeros((6, 2)))
    np.save(tmp_path / "r.npy", np.array([0.5, 1, np.nan, 2, 3, 4]))
    with pytest.raises(ValueError, match=r"r\.npy: row 2, the label: holds nan"):
        prepare("arrays", tmp_path / "o", x=tmp_path / "x.npy", y=tmp_path / "r.npy")


def test_drop_nonfinite_drops_the_rows_and_says_how_many(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [f"{i},{'nan' if i % 5 == 0 else i},{i % 2}" for i in range(40)]
    (tmp_path / "t.csv").write_text("a,b,label\n" + "\n".join(rows) + "\n")
    args = ["data", "prepare", "arrays", "--x", str(tmp_path / "t.csv"), "--label-column", "2"]
    assert main([*args, "--out", str(tmp_path / "o"), "--drop-nonfinite", "--no-standardize"]) == 0
    assert "8 samples with NaN or inf dropped" in capsys.readouterr().out
    splits = open_splits(tmp_path / "o")
    a = [
        float(v)
        for ds in splits.values()
        for v in ds.__getitems__(range(len(ds))).columns["x"][:, 0]
    ]
    assert sorted(a) == [float(i) for i in range(40) if i % 5]


# ---- checksums and labels as training reads them --------------------------------------------------


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_are_caught_when_the_dataset_is_opened(tmp_path: Path) -> None:
    out = prepare("digits", tmp_path / "d")
    victim = next((out / "train").glob("*.x.npy"))
    flip_last_byte(victim)
    with pytest.raises(ValueError, match=rf"{victim.name}: sha256 of the data is"):
        open_splits(out)  # the default, as the trainer opens it
    SegmentedDataset(out / "train", verify="sizes")  # sizes still match


def test_checksum_is_verified_once_and_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(integrity, "RACY_S", 0.0)
    monkeypatch.setattr(integrity, "_MEMO", {})
    out = prepare("digits", tmp_path / "d", segment_bytes=16 << 10)
    hashed: list[str] = []
    real = integrity_sha256 = __import__("rangerdl.data.dataset", fromlist=["x"]).sha256_file

    def counting(path: Path, offset: int) -> str:
        hashed.append(path.name)
        return integrity_sha256(path, offset)

    monkeypatch.setattr("rangerdl.data.dataset.sha256_file", counting)
    SegmentedDataset(out / "train")
    assert hashed == []  # the writer remembered what it hashed (.verified.json)
    monkeypatch.setattr(integrity, "_MEMO", {})
    (out / "train" / integrity.STAMP_NAME).unlink()
    SegmentedDataset(out / "train")
    assert len(hashed) == 2 * SegmentedDataset(out / "train").num_segments
    SegmentedDataset(out / "train")
    assert len(hashed) == 2 * SegmentedDataset(out / "train").num_segments
    victim = next((out / "train").glob("*.y.npy"))
    flip_last_byte(victim)  # a new mtime/ctime: hashed again, and caught
    with pytest.raises(ValueError, match="sha256"):
        SegmentedDataset(out / "train")
    assert real is not None


def test_label_outside_num_classes_is_named_where_it_is_read(tmp_path: Path) -> None:
    out = prepare("digits", tmp_path / "d", test_fraction=0)
    victim = next((out / "train").glob("*.y.npy"))
    y = np.load(victim, mmap_mode="r+")
    y[50] = 123456789
    y.flush()
    del y
    ds = SegmentedDataset(out / "train", verify="sizes")
    pattern = rf"{victim.name}: row 50 holds y 123456789, outside \[0, 10\) \(num_classes"
    with pytest.raises(ValueError, match=pattern):
        ds.__getitems__(list(range(40, 60)))
    with pytest.raises(ValueError, match=pattern):
        ds[50]
    assert int(ds[49]["y"]) == int(ds.__getitems__([49]).columns["y"][0])
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers check too
    with pytest.raises(ValueError, match=pattern):
        clone.__getitems__([50])


# ---- each bad input file is one line naming it -------------------------------------------------------


def _write_inputs(d: Path) -> None:
    d.mkdir()
    (d / "empty.npy").write_bytes(b"")
    np.save(d / "x.npy", np.random.default_rng(0).random((10, 3)))
    np.save(d / "y.npy", np.arange(10) % 2)
    (d / "short.npy").write_bytes((d / "x.npy").read_bytes()[:150])
    (d / "latin1.csv").write_bytes(b"a,b,lab\xe9l\n1,2,0\n3,4,1\n5,6,1\n7,8,0\n")
    (d / "notzip.npz").write_bytes(b"PK but not a zip")
    np.save(d / "xs.npy", np.array([["a", "b"]] * 10))
    np.save(d / "yc.npy", np.arange(10) * 1j)


@pytest.mark.parametrize(
    ("args", "file", "reason"),
    [
        (["--x", "empty.npy", "--y", "y.npy"], "empty.npy", "empty or truncated"),
        (["--x", "short.npy", "--y", "y.npy"], "short.npy", "empty or truncated"),
        (["--x", "latin1.csv", "--label-column", "2"], "latin1.csv", "not UTF-8"),
        (["--x", "notzip.npz", "--y", "y.npy"], "notzip.npz", "not a readable .npz"),
        (["--x", "xs.npy", "--y", "y.npy"], "xs.npy", "features have dtype <U1"),
        (["--x", "x.npy", "--y", "yc.npy"], "yc.npy", "labels have dtype complex128"),
    ],
)
def test_bad_input_file_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], file: str, reason: str
) -> None:
    _write_inputs(tmp_path / "in")
    args = [str(tmp_path / "in" / a) if "." in a else a for a in args]
    assert main(["data", "prepare", "arrays", *args, "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rangerdl data: error: "), err
    assert str(tmp_path / "in" / file) in err and reason in err, err


def test_string_labels_in_npy_become_classes(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.arange(20.0).reshape(10, 2))
    np.save(tmp_path / "y.npy", np.array(["cat", "dog"] * 5))
    out = prepare("arrays", tmp_path / "o", x=tmp_path / "x.npy", y=tmp_path / "y.npy")
    meta = SegmentedDataset(out / "train").metadata
    assert meta["class_names"] == ["cat", "dog"] and meta["num_classes"] == 2


@pytest.mark.parametrize("content", ["[]", "[1, 2]", '"x"', "{", "\xff"])
def test_malformed_manifest_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    out = prepare("digits", tmp_path / "d")
    (out / "train" / "manifest.json").write_bytes(content.encode("latin-1"))
    assert main(["data", "inspect", str(out / "train")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out / 'train' / 'manifest.json'}: " in err, err
    with pytest.raises(ValueError, match=r"manifest\.json: "):
        open_splits(out)
    assert json.loads((out / "test" / "manifest.json").read_text())["format"]
