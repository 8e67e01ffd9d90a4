"""The data layer under faults: full disks, killed and concurrent prepares, datasets replaced or
truncated under a reader, and a low open-file limit.

Whatever could crash the interpreter on a regression (SIGBUS from a sparse or truncated map) runs
in a child process, so a failure is a failed test and not a dead test run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from rangerdl._lock import FolderInUseError, FolderLock
from rangerdl.data import SegmentedDataset, SegmentWriter, open_splits, prepare

PYTHON = [sys.executable, "-X", "faulthandler"]


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PYTHON, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def rangerdl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PYTHON, "-m", "rangerdl", *args], capture_output=True, text=True, timeout=timeout
    )


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (needs root; skipped where mounting is not permitted)."""
    disk = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    disk.mkdir()
    try:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs: {exc}")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.strip()}")
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def hidden_debris(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".staging-" in p.name or ".old-" in p.name)


# ---- full disk ---------------------------------------------------------------------------------


def test_prepare_on_a_full_disk_names_the_bytes_and_keeps_the_previous_dataset(
    small_disk: Path,
) -> None:
    out = small_disk / "ds"
    assert rangerdl("data", "prepare", "digits", "--out", str(out)).returncode == 0
    before = {n: d.checksum for n, d in open_splits(out, verify="checksum").items()}
    # 2000 x 3x32x32 float32 = 23 MiB on a 2 MiB disk: refused before anything is written.
    big = ["--samples", "2000", "--shape", "3", "32", "32", "--overwrite", "--out", str(out)]
    proc = rangerdl("data", "prepare", "synthetic", *big)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("rangerdl data: error: no space left"), proc.stderr
    assert str(out) in proc.stderr and "MiB" in proc.stderr and "free" in proc.stderr
    assert hidden_debris(small_disk) == []
    after = {n: d.checksum for n, d in open_splits(out, verify="checksum").items()}
    assert after == before


def test_segment_writer_on_a_full_disk_raises_and_removes_its_files(small_disk: Path) -> None:
    # No free-space check here (the writer cannot know the total): the disk fills mid-write,
    # which a write through a sparse map turns into SIGBUS.
    code = """
        import sys, numpy as np
        from pathlib import Path
        from rangerdl._fileio import DiskFullError
        from rangerdl.data import SegmentWriter
        out = Path(sys.argv[1])
        try:
            with SegmentWriter(out, {"x": ("float32", (256,))}, segment_bytes=1 << 20) as w:
                for _ in range(8):
                    w.append(x=np.ones((1024, 256), np.float32))
        except DiskFullError as exc:
            print("DiskFullError:", exc)
        print(sorted(p.name for p in out.iterdir()))
    """
    proc = run_python(code, str(small_disk / "ds"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, listing = proc.stdout.strip().splitlines()
    assert first.startswith("DiskFullError: no space left to write ")
    assert ".x.npy.tmp" in first and "bytes" in first
    assert listing == "[]"


def test_file_backed_order_on_a_full_disk_raises_instead_of_sigbus(small_disk: Path) -> None:
    code = """
        import sys
        from rangerdl._fileio import DiskFullError
        from rangerdl.data import epoch_order
        try:
            epoch_order(10**6, 0, 0, max_ram_samples=0, order_dir=sys.argv[1])
        except DiskFullError as exc:
            print("DiskFullError:", exc)
    """
    proc = run_python(code, str(small_disk))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("DiskFullError: no space left to write the order of 1000000")


# ---- staging folders of killed prepares ----------------------------------------------------------


def test_prepare_removes_staging_folders_of_dead_prepares(tmp_path: Path) -> None:
    dead, live = dead_pid(), os.getppid()
    stale = [f".ds.staging-{dead}-0123abcd", f".ds.old-{dead}-89abcdef", ".ds.staging-deadbeef"]
    for name in [*stale, f".ds.staging-{live}-00000000", ".other.staging-1-0123abcd"]:
        (tmp_path / name / "train").mkdir(parents=True)
        (tmp_path / name / "train" / "junk").write_bytes(b"x" * 1000)
    prepare("digits", tmp_path / "ds")
    assert hidden_debris(tmp_path) == [
        f".ds.staging-{live}-00000000",
        ".other.staging-1-0123abcd",
    ]


def test_killed_prepare_leaves_debris_that_the_next_prepare_removes(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    args = ["data", "prepare", "synthetic", "--samples", "3000", "--shape", "3", "32", "32"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rangerdl", *args, "--segment-mb", "1", "--out", str(out)]
    )
    try:
        for _ in range(600):  # wait for its staging folder to hold a finished segment
            staging = list(tmp_path.glob(".ds.staging-*/train/seg-*.npy"))
            if staging or proc.poll() is not None:
                break
            subprocess.run(["sleep", "0.02"])
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    if not staging:
        pytest.skip("the prepare finished before it could be killed")
    assert hidden_debris(tmp_path)
    prepare("digits", out)
    assert hidden_debris(tmp_path) == []


def test_prepare_killed_between_its_renames_restores_the_previous_dataset(tmp_path: Path) -> None:
    prepare("digits", tmp_path / "ds")
    checksum = SegmentedDataset(tmp_path / "ds" / "train").checksum
    os.rename(tmp_path / "ds", tmp_path / f".ds.old-{dead_pid()}-0123abcd")  # died right here
    with pytest.raises(ValueError, match="already holds a prepared dataset"):
        prepare("digits", tmp_path / "ds", seed=1)
    assert SegmentedDataset(tmp_path / "ds" / "train").checksum == checksum
    assert hidden_debris(tmp_path) == []


# ---- one writer per folder -------------------------------------------------------------------------

HOLD_LOCK = """
    import sys, time
    from rangerdl._lock import FolderLock
    with FolderLock(sys.argv[1], what="dataset folder"):
        print("locked", flush=True)
        time.sleep(60)
"""


def test_second_prepare_of_a_folder_is_refused_naming_the_holder(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLD_LOCK), str(out)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        proc = rangerdl("data", "prepare", "digits", "--out", str(out))
        assert proc.returncode == 1
        assert proc.stderr.startswith("rangerdl data: error: dataset folder")
        assert f"process {holder.pid}" in proc.stderr and "in use" in proc.stderr
        assert not out.exists() and hidden_debris(tmp_path) == []
    finally:
        holder.kill()  # a killed holder's lock is released by the kernel
        holder.wait()
    prepare("digits", out)
    assert not (tmp_path / ".ds.lock").exists()


def test_folder_lock_api(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with FolderLock(run, what="run folder") as lock:
        assert lock.held and (tmp_path / ".run.lock").read_text().split()[0] == str(os.getpid())
        with pytest.raises(FolderInUseError, match=rf"run folder {run} is in use by process") as e:
            FolderLock(run, what="run folder").acquire()
        assert e.value.pid == os.getpid() and isinstance(e.value, ValueError)
    assert not lock.held and not (tmp_path / ".run.lock").exists()
    FolderLock(run).acquire().release()


def test_second_segment_writer_of_a_directory_is_refused(tmp_path: Path) -> None:
    fields = {"x": ("float32", ())}
    with SegmentWriter(tmp_path / "ds", fields) as first:
        first.append(x=np.zeros(3, np.float32))
        with pytest.raises(FolderInUseError, match="dataset directory"):
            SegmentWriter(tmp_path / "ds", fields).append(x=np.ones(3, np.float32))
    assert np.array_equal(
        SegmentedDataset(tmp_path / "ds").__getitems__([0, 1, 2]).columns["x"], torch.zeros(3)
    )


# ---- a dataset replaced, changed or truncated under a reader ------------------------------------------


def read_all(ds: SegmentedDataset) -> dict[str, torch.Tensor]:
    return dict(ds.__getitems__(list(range(len(ds)))).columns)


def test_dataset_replaced_under_a_job_still_reads_what_it_opened(tmp_path: Path) -> None:
    out = tmp_path / "d"
    prepare("digits", out, segment_bytes=16 << 10)
    expected = {n: read_all(SegmentedDataset(out / n)) for n in ("train", "test")}
    splits = open_splits(out)  # as a job does at its start; nothing read yet
    prepare("digits", out, overwrite=True, seed=5, segment_bytes=16 << 10)
    assert SegmentedDataset(out / "test").checksum != splits["test"].checksum
    for name, ds in splits.items():
        got = read_all(ds)
        assert all(torch.equal(got[k], expected[name][k]) for k in ("x", "y")), name


def test_changed_file_is_named_when_its_map_is_reopened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepare("digits", tmp_path / "d", segment_bytes=16 << 10, test_fraction=0)
    # Too many files to hold open (a tiny fd limit): files are checked when (re)mapped.
    monkeypatch.setattr("rangerdl.data.dataset.fd_limit", lambda: 16)
    ds = SegmentedDataset(tmp_path / "d" / "train", max_open_segments=1)
    assert ds._fds == {}
    ds[0]
    victim = tmp_path / "d" / "train" / ds.manifest.segments[1].files["y"].name
    victim.write_bytes(victim.read_bytes())  # same bytes, another file (a copy over it)
    with pytest.raises(ValueError, match=rf"{victim.name}: segment file changed after the"):
        ds[ds._starts[1]]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{victim.name}: segment file removed after"):
        ds[ds._starts[1]]


def test_segment_truncated_under_a_reader_is_an_error_naming_it(tmp_path: Path) -> None:
    prepare("digits", tmp_path / "d", test_fraction=0)
    code = """
        import os, sys
        from rangerdl.data import SegmentedDataset
        ds = SegmentedDataset(sys.argv[1])
        ds.__getitems__(list(range(64)))          # maps the segment
        victim = ds.path / ds.manifest.segments[0].files["x"].name
        os.truncate(victim, 4096)                 # e.g. `cp other.npy victim`
        try:
            ds.__getitems__(list(range(64, 1400)))
        except ValueError as exc:
            print("ValueError:", exc)
    """
    proc = run_python(code, str(tmp_path / "d" / "train"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ValueError: ") and ".x.npy: segment file changed" in proc.stdout
    assert "its size is 4096 bytes" in proc.stdout


# ---- file descriptors ------------------------------------------------------------------------------

FD_SCRIPT = """
    import os, resource, sys
    import numpy as np
    from rangerdl.data import SegmentWriter, SegmentedDataset
    out, extra, max_open = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    with SegmentWriter(out, {"x": ("float32", ()), "y": ("int64", ())}, segment_bytes=12) as w:
        w.append(x=np.arange(300, dtype="float32"), y=np.arange(300))  # 300 segments, 600 files
    base = len(os.listdir("/proc/self/fd"))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (base + extra, hard))
    kwargs = {} if max_open == "default" else {"max_open_segments": int(max_open)}
    ds = SegmentedDataset(out, **kwargs)
    total = 0.0
    for start in range(0, 300, 7):
        total += float(ds.__getitems__(list(range(start, min(300, start + 7)))).columns["x"].sum())
    total += sum(float(ds[i]["x"]) for i in range(300))
    print(total, len(os.listdir("/proc/self/fd")) - base)
"""


def test_many_segments_read_under_a_low_open_file_limit(tmp_path: Path) -> None:
    proc = run_python(FD_SCRIPT, str(tmp_path / "ds"), "200", "default")
    assert proc.returncode == 0, proc.stderr[-2000:]
    total, extra_fds = proc.stdout.split()
    assert float(total) == 2 * sum(range(300))
    assert int(extra_fds) <= 200 // 4 + 200 // 8


LOWERED_LIMIT_SCRIPT = """
    import os, resource, sys
    import numpy as np
    from rangerdl.data import SegmentWriter, SegmentedDataset
    out, first_limit, extra, max_open = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    n = 400
    with SegmentWriter(out, {"x": ("float32", ()), "y": ("int64", ())}, segment_bytes=12) as w:
        w.append(x=np.arange(n, dtype="float32") / 2, y=np.arange(n))  # 1 row per segment
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if first_limit:  # too low to keep the 800 files open: they are opened when mapped
        resource.setrlimit(resource.RLIMIT_NOFILE, (first_limit, hard))
    kwargs = {} if max_open == "default" else {"max_open_segments": int(max_open)}
    ds = SegmentedDataset(out, **kwargs)
    for i in range(0, n, 8):  # maps every eighth segment under the limit it was opened with
        ds[i]
    order, batches = np.random.default_rng(0).permutation(n), np.random.default_rng(1).permutation(n)
    in_use = len(os.listdir("/proc/self/fd")) - 1  # less the one listing them
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + extra, hard))
    for i in order.tolist():
        sample = ds[i]
        assert sample["y"].item() == i and sample["x"].item() == i / 2, (i, sample)
    for batch in np.array_split(batches, 40):
        got = ds.__getitems__(batch.tolist()).columns
        assert got["y"].tolist() == batch.tolist() and got["x"].tolist() == (batch / 2).tolist()
    assert len(os.listdir("/proc/self/fd")) - 1 <= in_use + extra
    print("read", n, "samples twice")
"""


@pytest.mark.parametrize(
    ("first_limit", "max_open"),
    [(0, "default"), (1024, "default"), (0, "400")],
    ids=["files-held-open", "files-opened-when-mapped", "max-open-above-the-limit"],
)
def test_dataset_reads_on_under_a_lower_open_file_limit_than_it_was_opened_with(
    tmp_path: Path, first_limit: int, max_open: str
) -> None:
    # The limit drops to 4 above the files in use: a segment (2 files) still fits, so the map
    # cache shrinks instead of failing, and every sample comes back right, in shuffled order.
    proc = run_python(LOWERED_LIMIT_SCRIPT, str(tmp_path / "ds"), str(first_limit), "4", max_open)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "read 400 samples twice"


def test_open_file_limit_error_names_the_dataset_and_the_limit(tmp_path: Path) -> None:
    # Not even one segment (2 files) can be mapped: the only case that is an error.
    code = """
        import os, resource, sys
        import numpy as np
        from rangerdl.data import SegmentWriter, SegmentedDataset
        with SegmentWriter(sys.argv[1], {"x": ("float32", ()), "y": ("int64", ())}, segment_bytes=12) as w:
            w.append(x=np.zeros(40, "float32"), y=np.arange(40))
        ds = SegmentedDataset(sys.argv[1])
        in_use = len(os.listdir("/proc/self/fd")) - 1
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        ds[0]
    """
    proc = run_python(code, str(tmp_path / "ds"))
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert f"{tmp_path / 'ds'}: too many open files" in last
    assert "ulimit -n" in last and "is " in last and "not even one segment" in last


def test_faulthandler_is_on_for_the_cli() -> None:
    # A SIGBUS that cannot be turned into an error at least prints where it happened.
    code = (
        "import faulthandler, rangerdl.cli as c; c.main(['data']); print(faulthandler.is_enabled())"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip().splitlines()[-1] == "True"


def test_clean_up_does_not_touch_unrelated_folders(tmp_path: Path) -> None:
    keep = tmp_path / ".dsx.staging-1-0123abcd"
    keep.mkdir()
    prepare("digits", tmp_path / "ds")
    assert keep.is_dir()
    shutil.rmtree(keep)
