"""What fault-tolerant distributed Ranger says when it cannot run: torchft missing, no
Lighthouse, an option torchft does not carry, a Lighthouse that cannot bind. No process group,
no peers: each answer comes before any of that."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from rangerdl import Ranger
from rangerdl.distributed import SyncOptions


def test_missing_torchft_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from rangerdl.distributed import ft

    monkeypatch.setitem(sys.modules, "torchft", None)  # import torchft -> ImportError
    with pytest.raises(ImportError, match=r'pip install "rangerdl\[ft\]"'):
        ft.connect("127.0.0.1:1", "a")
    opt = Ranger(nn.Linear(2, 1).parameters(), lookahead=False)
    with pytest.raises(ImportError, match=r"rangerdl\[ft\]"):
        ft.FaultTolerantSync(opt, manager=None)


def test_importing_rangerdl_imports_no_torchft() -> None:
    code = "import sys, rangerdl, rangerdl.distributed; import rangerdl.distributed.ft; "
    code += "print('torchft' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_unreachable_lighthouse_is_an_error_naming_it_within_the_timeout() -> None:
    pytest.importorskip("torchft")
    from rangerdl.distributed.ft import connect

    with socket.socket() as s:  # a port nobody serves
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"http://127\.0\.0\.1:{port}.*rangerdl lighthouse"):
        connect(f"127.0.0.1:{port}", "a", connect_timeout_s=1.0)
    assert time.monotonic() - start < 10


def test_options_that_cannot_combine_are_refused_by_name() -> None:
    pytest.importorskip("torchft")
    from rangerdl.distributed.ft import FaultTolerantSync

    opt = Ranger(nn.Linear(2, 1).parameters(), lookahead=False)
    with pytest.raises(ValueError, match=r"shard_slow and compression = 'int4' cannot combine"):
        options = SyncOptions(shard_slow=True, compression="int4")
        FaultTolerantSync(opt, manager=None, options=options)


def test_an_optimizer_with_its_own_slow_weights_is_refused() -> None:
    pytest.importorskip("torchft")
    from rangerdl.distributed.ft import FaultTolerantSync

    with pytest.raises(ValueError, match="lookahead=False"):
        FaultTolerantSync(Ranger([torch.zeros(2, requires_grad=True)]), manager=None)


def test_lighthouse_command_refuses_bad_numbers_and_a_taken_address() -> None:
    pytest.importorskip("torchft")
    from rangerdl.cli import main

    assert main(["lighthouse", "--min-replicas=0"]) == 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "rangerdl", "lighthouse", f"--bind=127.0.0.1:{port}"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert f"cannot serve the Lighthouse at 127.0.0.1:{port}" in out.stderr, out.stderr


FT = ["--distributed.backend=torchft", "--distributed.lighthouse=127.0.0.1:1"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], r"needs replica_groups = N"),
        (
            ["--distributed.replica_groups=2", "--distributed.replica_group=2"],
            r"replica_group must be in \[0, 2\)",
        ),
        (["--distributed.replica_groups=3"], r"batch_size = 64 .* replica_groups = 3"),
        (
            [
                "--distributed.replica_groups=2",
                "--distributed.shard_slow=true",
                "--distributed.overlap=true",
            ],
            r"\[distributed\] overlap and shard_slow cannot combine",
        ),
        (
            ["--distributed.replica_groups=2", "--distributed.strategy=ddp"],
            r"strategy = 'ddp' needs torchrun",
        ),
    ],
)
def test_train_config_for_torchft_names_the_key(overrides: list[str], message: str) -> None:
    from rangerdl.train.config import load_config

    with pytest.raises(ValueError, match=message):
        load_config(None, [*FT, *overrides])


def test_train_config_for_torchft_needs_the_lighthouse_and_the_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rangerdl.train.config import load_config

    monkeypatch.delenv("TORCHFT_LIGHTHOUSE", raising=False)
    monkeypatch.delenv("REPLICA_GROUP_ID", raising=False)
    with pytest.raises(ValueError, match=r"needs the Lighthouse's address"):
        load_config(None, ["--distributed.backend=torchft", "--distributed.replica_groups=2"])
    monkeypatch.setenv("TORCHFT_LIGHTHOUSE", "127.0.0.1:1")
    cfg = load_config(None, ["--distributed.backend=torchft", "--distributed.replica_groups=2"])
    with pytest.raises(ValueError, match=r"which replica group is this process"):
        cfg.distributed.group_index()
    monkeypatch.setenv("REPLICA_GROUP_ID", "1")
    assert cfg.distributed.group_index() == 1
    monkeypatch.setenv("REPLICA_GROUP_ID", "7")
    with pytest.raises(ValueError, match=r"REPLICA_GROUP_ID='7'"):
        cfg.distributed.group_index()


def test_a_process_whose_group_peer_died_ends_at_once(tmp_path: Path) -> None:
    """A process of a replica group of several (a torchrun job) whose peer on the host died
    ends at once, with the reason, instead of waiting where no signal handler runs (a quorum
    that waits for the dead peer) for torchrun's SIGKILL 30 s later, the group held in the
    quorum all the while. Here the main thread sleeps in C, as it would in torchft's quorum."""
    pytest.importorskip("torchft")
    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    script = tmp_path / "watched.py"
    script.write_text(
        "import logging, sys, time\n"
        "from unittest import mock\n"
        "from rangerdl.distributed import ft_group\n"
        "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')\n"
        "gathered = [('host', int(sys.argv[1])), ('host', 0)]\n"
        "with mock.patch('socket.gethostname', return_value='host'), \\\n"
        "        mock.patch('os.getpid', return_value=0), \\\n"
        "        mock.patch('rangerdl.distributed.release.all_gather_object', "
        "return_value=gathered):\n"
        "    watch = ft_group.PeerWatch(local_group=None)\n"
        "print('watching', watch.pids, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(script), str(peer.pid)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == f"watching [{peer.pid}]\n"
        peer.kill()
        killed = time.monotonic()
        out, _ = proc.communicate(timeout=20)
        assert time.monotonic() - killed < 5, out
        assert proc.returncode == 1, out
        assert f"process {peer.pid} of this replica group has died" in out, out
    finally:
        for p in (peer, proc):
            p.kill()
            p.wait()


def test_a_closed_watch_lets_the_peers_end() -> None:
    pytest.importorskip("torchft")
    from unittest import mock

    from rangerdl.distributed import ft_group

    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gathered = [("host", peer.pid), ("host", 0)]
    with (
        mock.patch("socket.gethostname", return_value="host"),
        mock.patch("os.getpid", return_value=0),
        mock.patch("rangerdl.distributed.release.all_gather_object", return_value=gathered),
    ):
        watch = ft_group.PeerWatch(local_group=None)
    assert watch.pids == [peer.pid]
    watch.close()  # what FaultTolerantSync.close() does before the processes end normally
    peer.kill()
    peer.wait()
    time.sleep(0.5)  # this process is still here
    assert not ft_group._alive(peer.pid)
