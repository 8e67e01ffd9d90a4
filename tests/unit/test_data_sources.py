"""Built-in sources (digits, text, arrays, synthetic) against their inputs, and ``prepare``."""

from __future__ import annotations

import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from rangerdl.data import SegmentedDataset, open_splits, prepare
from rangerdl.data.text import default_text_sources


def rows_of(ds: SegmentedDataset) -> list[tuple[bytes, object]]:
    batch = ds.__getitems__(list(range(len(ds))))
    return [(item["x"].numpy().tobytes(), item["y"].numpy().tobytes()) for item in batch]


def token_stream(ds: SegmentedDataset) -> bytes:
    """The stream the windows were cut from (all but a tail shorter than one window)."""
    items = ds.__getitems__(list(range(len(ds))))
    tokens = torch.cat([item["x"] for item in items] + [items[-1]["y"][-1:]])
    return bytes(tokens.to(torch.uint8).tolist())


def test_digits_is_a_fixed_stratified_split_of_sklearn_digits(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    splits = open_splits(prepare("digits", tmp_path / "a"))
    assert list(splits) == ["train", "test"]
    train, test = splits["train"], splits["test"]
    assert (len(train), len(test)) == (1438, 359)
    meta = train.metadata
    assert meta["task"] == "classification" and meta["num_classes"] == 10
    assert meta["class_names"] == [str(d) for d in range(10)] and meta["input_shape"] == [1, 8, 8]
    item = train[0]
    assert item["x"].dtype == torch.float32 and item["x"].shape == (1, 8, 8)
    assert item["y"].dtype == torch.int64
    # Every (image, label) of sklearn's digits lands in exactly one split, scaled to [0, 1].
    digits = load_digits()
    source = Counter(
        ((img / 16.0).astype(np.float32)[None].tobytes(), np.int64(t).tobytes())
        for img, t in zip(digits.images, digits.target, strict=True)
    )
    assert Counter(rows_of(train)) + Counter(rows_of(test)) == source
    # Stratified: each class is ~20% test.
    test_labels = Counter(int(item["y"]) for item in test.__getitems__(list(range(len(test)))))
    for label, total in Counter(digits.target.tolist()).items():
        assert abs(test_labels[label] - 0.2 * total) <= 1
    # Fixed: the same split (and so the same checksums) every time.
    again = open_splits(prepare("digits", tmp_path / "b"))
    assert again["train"].checksum == train.checksum and again["test"].checksum == test.checksum


@pytest.fixture
def text_files(tmp_path: Path) -> list[Path]:
    root = tmp_path / "corpus"
    files = []
    for k in range(20):
        path = root / f"dir{k % 3}" / f"file{k:02d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"<<{k:02d}>>".encode() + bytes(range(256)) * (k + 1))
        files.append(path)
    return files


def test_text_splits_by_file_into_byte_windows(tmp_path: Path, text_files: list[Path]) -> None:
    splits = open_splits(
        prepare(
            "text",
            tmp_path / "out",
            sources=[str(tmp_path / "corpus")],
            seq_len=16,
            val_fraction=0.1,
            test_fraction=0.1,
        )
    )
    assert list(splits) == ["train", "val", "test"]
    owner: dict[int, str] = {}
    for name, ds in splits.items():
        assert ds.metadata["task"] == "lm" and ds.metadata["vocab_size"] == 256
        assert ds.metadata["seq_len"] == 16 == ds.seq_len
        stream = token_stream(ds)
        members = sorted(k for k in range(20) if f"<<{k:02d}>>".encode() in stream)
        # The stream is its files' bytes back to back, in path order (tail cut to whole windows).
        by_path = sorted(members, key=lambda k: text_files[k].relative_to(tmp_path).as_posix())
        full = b"".join(text_files[k].read_bytes() for k in by_path)
        assert len(ds) == (len(full) - 1) // 16 and full.startswith(stream)
        for k in members:
            assert k not in owner, f"file {k} is in {owner[k]} and {name}"
            owner[k] = name
    assert sorted(owner) == list(range(20))
    assert Counter(owner.values()) == {"train": 16, "val": 2, "test": 2}


def test_text_sources_as_globs_and_files(tmp_path: Path, text_files: list[Path]) -> None:
    out = prepare(
        "text",
        tmp_path / "out",
        sources=[str(tmp_path / "corpus" / "dir0" / "*.txt"), str(text_files[1])],
        seq_len=8,
        val_fraction=0,
        test_fraction=0,
    )
    splits = open_splits(out)
    assert list(splits) == ["train"]
    stream = token_stream(splits["train"])
    assert sorted(k for k in range(20) if f"<<{k:02d}>>".encode() in stream) == [
        0, 1, 3, 6, 9, 12, 15, 18
    ]  # fmt: skip


def test_text_errors(tmp_path: Path, text_files: list[Path]) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.txt does not exist"):
        prepare("text", tmp_path / "o", sources=[str(tmp_path / "nope.txt")])
    with pytest.raises(FileNotFoundError, match="matches no files"):
        prepare("text", tmp_path / "o", sources=[str(tmp_path / "*.md")])
    with pytest.raises(ValueError, match="cannot be split by file"):
        prepare("text", tmp_path / "o", sources=[str(text_files[0])])
    with pytest.raises(
        ValueError, match=r"text split 'train': its 18 file\(s\) hold \d+ bytes, fewer than seq_len"
    ):
        prepare("text", tmp_path / "o", sources=[str(tmp_path / "corpus")], seq_len=100_000)
    assert not (tmp_path / "o").exists()


def test_default_text_source_is_this_pythons_stdlib() -> None:
    root, files = default_text_sources()
    assert root == Path(sysconfig.get_paths()["stdlib"])
    names = {p.relative_to(root).as_posix() for p in files}
    assert {"os.py", "json/__init__.py", "asyncio/tasks.py"} <= names
    assert len(files) > 500
    assert not any("site-packages" in n or "dist-packages" in n for n in names)


def test_default_text_prepare(tmp_path: Path) -> None:
    splits = open_splits(prepare("text", tmp_path / "out", seq_len=64))
    assert list(splits) == ["train", "val", "test"]
    assert sum(ds.nbytes for ds in splits.values()) > 10 << 20
    assert "standard library" in splits["train"].metadata["source"]
    assert b"def " in token_stream(splits["val"])


def _pairs(splits: dict[str, SegmentedDataset]) -> Counter[tuple[tuple[float, ...], object]]:
    out: Counter[tuple[tuple[float, ...], object]] = Counter()
    for ds in splits.values():
        for item in ds.__getitems__(list(range(len(ds)))):
            out[(tuple(item["x"].tolist()), item["y"].item())] += 1
    return out


def test_arrays_from_npy_with_stratified_test_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 5))
    y = np.repeat(np.arange(4), 50)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    splits = open_splits(
        prepare(
            "arrays",
            tmp_path / "out",
            x=tmp_path / "x.npy",
            y=tmp_path / "y.npy",
            standardize=False,
        )
    )
    assert (len(splits["train"]), len(splits["test"])) == (160, 40)
    meta = splits["train"].metadata
    assert meta["task"] == "classification" and meta["num_classes"] == 4
    assert meta["input_shape"] == [5]
    expected = Counter(
        (tuple(r.astype(np.float32).tolist()), int(t)) for r, t in zip(x, y, strict=True)
    )
    assert _pairs(splits) == expected
    test_y = Counter(int(i["y"]) for i in splits["test"].__getitems__(list(range(40))))
    assert test_y == {0: 10, 1: 10, 2: 10, 3: 10}


def test_arrays_from_one_csv_with_string_labels(tmp_path: Path) -> None:
    lines = ["a,b,species,c"] + [
        f"{i},{i * 0.5},{['setosa', 'virginica', 'versicolor'][i % 3]},{-i}" for i in range(30)
    ]
    (tmp_path / "iris.csv").write_text("\n".join(lines) + "\n")
    splits = open_splits(
        prepare(
            "arrays",
            tmp_path / "out",
            x=str(tmp_path / "iris.csv"),
            label_column="species",
            test_fraction=0.2,
            standardize=False,
        )
    )
    meta = splits["test"].metadata
    assert meta["class_names"] == ["setosa", "versicolor", "virginica"]
    names = ["setosa", "virginica", "versicolor"]
    expected = Counter(
        ((float(i), i * 0.5, float(-i)), meta["class_names"].index(names[i % 3])) for i in range(30)
    )
    assert _pairs(splits) == expected


def test_arrays_from_npz_and_csv_pairs_and_regression(tmp_path: Path) -> None:
    x = np.arange(40, dtype=np.float64).reshape(20, 2)
    np.savez(tmp_path / "data.npz", x=x, y=np.arange(20) % 2)
    splits = open_splits(
        prepare(
            "arrays", tmp_path / "a", x=tmp_path / "data.npz", test_fraction=0, standardize=False
        )
    )
    assert list(splits) == ["train"] and len(splits["train"]) == 20
    np.savetxt(tmp_path / "x.csv", x, delimiter=",")
    np.savetxt(tmp_path / "y.csv", x[:, 0] * 0.25, delimiter=",")
    splits = open_splits(
        prepare(
            "arrays", tmp_path / "b", x=tmp_path / "x.csv", y=tmp_path / "y.csv", standardize=False
        )
    )
    assert splits["train"].metadata["task"] == "regression"
    assert splits["train"][0]["y"].dtype == torch.float32
    expected = Counter((tuple(r.tolist()), r[0] * 0.25) for r in x)
    assert _pairs(splits) == expected


def _xy(ds: SegmentedDataset) -> tuple[np.ndarray, np.ndarray]:
    items = ds.__getitems__(list(range(len(ds))))
    return np.stack([i["x"].numpy() for i in items]), np.array([i["y"].item() for i in items])


@pytest.mark.parametrize("chunk_bytes", [32 << 20, 200])  # one chunk; chunks of 6 rows merged
def test_arrays_standardises_float_features_with_the_train_split_statistics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_bytes: int
) -> None:
    import rangerdl.data.arrays

    monkeypatch.setattr(rangerdl.data.arrays, "CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(0)
    n = 120
    x = rng.normal(size=(n, 4)) * [1.0, 1e3, 1e-3, 1.0] + [0.0, 5e4, -7.0, 0.0]
    x[:, 3] = 2.5  # constant: std 1, so it becomes 0
    x[17, 0] = np.nan  # dropped before the statistics
    # regression targets stay raw: y names each sample's row in x
    rows = [",".join([*(repr(float(v)) for v in r), str(float(i))]) for i, r in enumerate(x)]
    (tmp_path / "t.csv").write_text("a,b,c,d,row\n" + "\n".join(rows) + "\n")
    splits = open_splits(
        prepare(
            "arrays",
            tmp_path / "out",
            x=tmp_path / "t.csv",
            label_column="row",
            task="regression",
            drop_nonfinite=True,
        )
    )
    (z_train, row_train), (z_test, row_test) = _xy(splits["train"]), _xy(splits["test"])
    train_rows, test_rows = row_train.astype(int), row_test.astype(int)
    assert 17 not in set(train_rows) | set(test_rows)
    assert len(train_rows) == 95 and len(test_rows) == 24
    raw_train = x[train_rows]
    stats = splits["train"].metadata["standardize"]
    assert splits["test"].metadata["standardize"] == stats
    mean, std = np.array(stats["mean"]), np.array(stats["std"])
    np.testing.assert_allclose(mean, raw_train.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std[:3], raw_train[:, :3].std(axis=0), rtol=1e-9)
    assert std[3] == 1.0
    kept = np.delete(x, 17, axis=0)
    assert not np.allclose(mean, kept.mean(axis=0), rtol=1e-6)  # not the statistics of all rows
    np.testing.assert_allclose(z_train[:, :3].mean(axis=0), 0, atol=1e-6)
    np.testing.assert_allclose(z_train[:, :3].std(axis=0), 1, atol=1e-5)
    assert np.all(z_train[:, 3] == 0) and np.all(z_test[:, 3] == 0)
    expected_test = ((x[test_rows] - mean) / std).astype(np.float32)
    np.testing.assert_allclose(z_test, expected_test, rtol=1e-6, atol=1e-6)


def test_arrays_standardisation_default_is_for_float_tables(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    y = np.arange(40) % 2
    np.save(tmp_path / "y.npy", y)
    cases = {
        "f32": (rng.normal(5, 3, size=(40, 3)).astype(np.float32), {}, True),
        "int": (rng.integers(0, 255, size=(40, 3)).astype(np.uint8), {}, False),
        "image": (rng.normal(5, 3, size=(40, 1, 2, 2)), {}, False),
        "int_forced": (rng.integers(0, 255, size=(40, 3)), {"standardize": True}, True),
        "float_off": (rng.normal(5, 3, size=(40, 3)), {"standardize": False}, False),
    }
    for name, (x, options, standardised) in cases.items():
        np.save(tmp_path / f"{name}.npy", x)
        out = prepare(
            "arrays", tmp_path / name, x=tmp_path / f"{name}.npy", y=tmp_path / "y.npy", **options
        )
        train = SegmentedDataset(out / "train")
        stats = train.metadata["standardize"]
        z, _ = _xy(train)
        if standardised:
            assert np.array(stats["mean"]).shape == x.shape[1:], name
            np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-5, err_msg=name)
        else:
            assert stats is None, name
            assert np.isin(z, x.astype(np.float32)).all(), name  # raw values


def test_no_standardize_flag_keeps_raw_values_and_the_summary_says_which(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rangerdl.cli import main

    x = np.arange(60.0).reshape(20, 3) * [1, 10, 100]
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.arange(20) % 2)
    args = ["data", "prepare", "arrays", "--x", str(tmp_path / "x.npy")]
    args += ["--y", str(tmp_path / "y.npy")]
    assert main([*args, "--out", str(tmp_path / "raw"), "--no-standardize"]) == 0
    assert "features stored as given, not standardised" in capsys.readouterr().out
    splits = open_splits(tmp_path / "raw")
    assert all(ds.metadata["standardize"] is None for ds in splits.values())
    assert _pairs(splits) == Counter((tuple(r.tolist()), i % 2) for i, r in enumerate(x))
    assert main([*args, "--out", str(tmp_path / "std")]) == 0
    out = capsys.readouterr().out
    assert "features standardised with the train split's statistics" in out
    mean = SegmentedDataset(tmp_path / "std" / "train").metadata["standardize"]["mean"]
    assert f"mean {mean}" in out


@pytest.mark.parametrize(
    ("files", "options", "error", "pattern"),
    [
        ({"x.npy": np.zeros((5, 2)), "y.npy": np.zeros(4, int)}, {}, ValueError, "5 samples but y has 4"),
        ({"x.npy": np.zeros((5, 2))}, {}, FileNotFoundError, "y file .*y.npy does not exist"),
        ({"x.npy": np.zeros((5, 2)), "y.npy": -np.ones(5, int)}, {}, ValueError, "labels must be >= 0"),
        ({"x.npy": np.zeros((5, 2)), "y.npy": np.zeros(5, int)}, {"label_column": "a"}, ValueError, "not both"),
        ({"x.txt": np.zeros((5, 2)), "y.npy": np.zeros(5, int)}, {}, ValueError, "expected .npy, .npz or .csv"),
    ],
)  # fmt: skip
def test_arrays_errors(
    tmp_path: Path, files: dict, options: dict, error: type, pattern: str
) -> None:
    for name, value in files.items():
        with open(tmp_path / name, "wb") as fh:
            np.save(fh, value)
    x_name = next(n for n in files if n.startswith("x"))
    with pytest.raises(error, match=pattern):
        prepare("arrays", tmp_path / "out", x=tmp_path / x_name, y=tmp_path / "y.npy", **options)
    assert not (tmp_path / "out").exists()


def test_arrays_csv_label_column_not_found(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("a,b\n1,2\n3,4\n5,6\n")
    with pytest.raises(
        ValueError, match=r"label_column 'c' not found; it has columns \['a', 'b'\]"
    ):
        prepare("arrays", tmp_path / "out", x=tmp_path / "d.csv", label_column="c")


def test_synthetic_is_learnable_and_reproducible(tmp_path: Path) -> None:
    splits = open_splits(
        prepare("synthetic", tmp_path / "a", samples=2000, shape=(16,), num_classes=5, seed=3)
    )
    train, test = splits["train"], splits["test"]
    assert (len(train), len(test)) == (1800, 200)
    assert train.metadata["input_shape"] == [16] and train.metadata["num_classes"] == 5

    def arrays(ds: SegmentedDataset) -> tuple[np.ndarray, np.ndarray]:
        items = ds.__getitems__(list(range(len(ds))))
        return np.stack([i["x"].numpy() for i in items]), np.array([int(i["y"]) for i in items])

    (xt, yt), (xs, ys) = arrays(train), arrays(test)
    means = np.stack([xt[yt == c].mean(0) for c in range(5)])
    predicted = np.argmin(((xs[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (predicted == ys).mean() > 0.9
    again = open_splits(
        prepare("synthetic", tmp_path / "b", samples=2000, shape=(16,), num_classes=5, seed=3)
    )
    assert again["train"].checksum == train.checksum
    small = open_splits(
        prepare("synthetic", tmp_path / "c", samples=10, shape=(2, 3), dtype="uint8")
    )
    assert small["train"][0]["x"].dtype == torch.int64 and small["train"][0]["x"].shape == (2, 3)


def test_prepare_checks_kind_options_and_out_dir(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown source 'mnist'"):
        prepare("mnist", tmp_path / "o")
    with pytest.raises(ValueError, match=r"no option\(s\) \['seq_len'\]; it accepts"):
        prepare("digits", tmp_path / "o", seq_len=3)
    out = prepare("synthetic", tmp_path / "o", samples=50, shape=(2,))
    checksum = open_splits(out)["train"].checksum
    with pytest.raises(ValueError, match="already holds a prepared dataset"):
        prepare("synthetic", out, samples=60, shape=(2,))
    # A failing overwrite leaves the old dataset and no staging debris.
    with pytest.raises(ValueError, match="leaves no training data"):
        prepare("synthetic", out, overwrite=True, samples=60, shape=(2,), test_fraction=0.999)
    assert open_splits(out)["train"].checksum == checksum
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    prepare("synthetic", out, overwrite=True, samples=60, shape=(2,))
    assert len(open_splits(out)["train"]) == 54
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing to write into it"):
        prepare("digits", foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_train_config_text_sources_prepare_once_per_list(
    tmp_path: Path, text_files: list[Path]
) -> None:
    from rangerdl.train.config import Config
    from rangerdl.train.data import open_data
    from rangerdl.train.runtime import Runtime

    def config(**data: object) -> Config:
        cfg = Config.from_dict({"data": {"cache_dir": str(tmp_path / "cache"), **data}})
        cfg.validate()
        return cfg

    rt = Runtime(0, 1, 0, torch.device("cpu"), None)
    glob = str(tmp_path / "corpus" / "**" / "*.txt")
    cfg = config(source="text", seq_len=8, text_sources=[glob])
    splits = open_data(cfg.data, rt)
    assert glob in splits["train"].metadata["source"]
    stream = b"".join(token_stream(ds) for ds in splits.values())
    assert all(f"<<{k:02d}>>".encode() in stream for k in range(20))
    dir0 = str(tmp_path / "corpus" / "dir0")
    other = open_data(config(source="text", seq_len=8, text_sources=[dir0]).data, rt)
    folders = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(folders) == 2 and all(f.startswith("text-L8-") for f in folders), folders
    assert other["train"].checksum != splits["train"].checksum
    with pytest.raises(ValueError, match=r"\[data\] text_sources is read by the built-in text"):
        config(source="digits", text_sources=[glob])
    with pytest.raises(ValueError, match=r"\[data\] text_sources must be a list of paths"):
        config(source="text", text_sources=[""])
