"""Output locks, stale temporary files, outputs-never-inputs and fsync, in one process
(the kill tests in tests/test_kills.py run them as separate processes)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mmcli.errors import BadInput
from mmcli.formats import atomic
from mmcli.formats.locks import OutputLock, holder_of, lock_path_for, remove_stale_temps
from mmcli.formats.outputs import refuse_foreign_file, refuse_inputs_as_outputs

TRY_LOCK = """
import sys
from mmcli.errors import BadInput
from mmcli.formats.locks import OutputLock
try:
    OutputLock(sys.argv[1], "test").release()
except BadInput as e:
    print(e)
    sys.exit(2)
"""


def _try_lock(target) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", TRY_LOCK, str(target)], capture_output=True, text=True, timeout=60
    )


def test_a_lock_is_between_processes_and_removed_when_released(tmp_path):
    out = tmp_path / "out"
    lock = OutputLock(out, "extract")
    assert lock_path_for(out) == tmp_path / ".out.lock" and lock_path_for(out).exists()
    assert not out.exists()  # locking creates nothing but the lock file beside it
    r = _try_lock(out)
    assert r.returncode == 2 and f"(pid {os.getpid()}: mmcli extract" in r.stdout
    assert holder_of(out) is None  # this process holds it: not "another writer"
    lock.release()
    assert not lock_path_for(out).exists() and _try_lock(out).returncode == 0


def test_one_lock_for_every_spelling_of_the_output(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    with OutputLock(tmp_path / "real", "extract"):
        for spelling in (tmp_path / "alias", f"{tmp_path}/./real/", tmp_path / "x" / ".." / "real"):
            assert _try_lock(spelling).returncode == 2, spelling


def test_a_later_writer_in_the_same_process_takes_the_lock_over(tmp_path):
    first = OutputLock(tmp_path / "o", "a")
    second = OutputLock(tmp_path / "o", "b")  # e.g. the first is kept alive by a traceback
    assert second.held and not first.held
    first.release()  # no effect: it was taken over
    assert _try_lock(tmp_path / "o").returncode == 2
    second.release()
    assert _try_lock(tmp_path / "o").returncode == 0


DIE_WITH_A_CHILD = """
import multiprocessing as mp, os, sys, time
from mmcli.formats.locks import OutputLock
lock = OutputLock(sys.argv[1], "preprocess")
child = mp.get_context("fork").Process(target=time.sleep, args=(30,))
child.start()
print(child.pid, flush=True)
os._exit(0)  # as if killed: no release, the lock file stays
"""


def test_a_forked_child_does_not_keep_a_dead_writers_lock(tmp_path):
    p = subprocess.Popen(
        [sys.executable, "-c", DIE_WITH_A_CHILD, str(tmp_path / "o")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    child = int(p.stdout.readline())
    p.stdout.close()
    assert p.wait(timeout=60) == 0
    try:
        os.kill(child, 0)  # the child lives on, with a copy of every fd of its parent...
        assert lock_path_for(tmp_path / "o").exists()
        assert _try_lock(tmp_path / "o").returncode == 0  # ...but not of the lock
    finally:
        os.kill(child, 9)


def test_stale_temps_only_of_own_outputs(tmp_path):
    names = [".state.safetensors.k2j3h4g5.tmp", ".notes.txt.abcdefgh.tmp", "state.safetensors"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    assert remove_stale_temps(tmp_path, {"state.safetensors"}.__contains__) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])


def test_outputs_never_inputs_by_real_path(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.safetensors").write_bytes(b"x")
    (tmp_path / "link.safetensors").symlink_to(data / "a.safetensors")
    with pytest.raises(BadInput, match="would replace an input file"):
        refuse_inputs_as_outputs([data], files=[tmp_path / "link.safetensors"])
    with pytest.raises(BadInput, match="is where the input is read from"):
        refuse_inputs_as_outputs([data / "a.safetensors"], folder=tmp_path / "." / "data")
    with pytest.raises(BadInput, match="is where the input is read from"):
        refuse_inputs_as_outputs([str(data / "*.safetensors")], folder=data)
    refuse_inputs_as_outputs([data], files=[tmp_path / "b.safetensors"], folder=tmp_path / "out")
    with pytest.raises(BadInput, match="exists and is not a thing.*--overwrite"):
        refuse_foreign_file(
            data / "a.safetensors", lambda p: False, what="a thing", overwrite=False
        )
    refuse_foreign_file(data / "a.safetensors", lambda p: False, what="a thing", overwrite=True)


def test_atomic_writes_fsync_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.path.isdir(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    atomic.atomic_write_bytes(tmp_path / "f.bin", b"data")
    assert synced == [False, True]  # the file before the rename, the folder after it
    atomic.atomic_write_bytes(tmp_path / "g.bin", b"data", fsync=False)
    assert len(synced) == 2 and (tmp_path / "g.bin").read_bytes() == b"data"


def test_a_signal_right_after_the_temp_file_is_created_leaves_nothing(tmp_path, monkeypatch):
    """The gap CI hit: Ctrl-C lands after the temporary file exists but before its name
    reached the writer. The name is known before the file is, so it is removed."""
    real_open = os.open

    def open_then_interrupted(path, flags, *args):
        fd = real_open(path, flags, *args)
        if flags & os.O_CREAT:
            os.close(fd)
            raise KeyboardInterrupt  # as the SIGINT handler raises it
        return fd

    monkeypatch.setattr(atomic.os, "open", open_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic.atomic_write_bytes(tmp_path / "f.bin", b"data")
    assert list(tmp_path.iterdir()) == []


def test_a_temp_name_taken_by_another_writer_is_left_alone(tmp_path, monkeypatch):
    taken = tmp_path / ".f.bin.aaaaaaaa.tmp"
    taken.write_bytes(b"theirs")
    draws = iter(["aaaaaaaa", "bbbbbbbb"])
    monkeypatch.setattr(atomic, "_random_token", lambda: next(draws))
    atomic.atomic_write_bytes(tmp_path / "f.bin", b"ours")
    assert taken.read_bytes() == b"theirs" and (tmp_path / "f.bin").read_bytes() == b"ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == [taken.name, "f.bin"]
