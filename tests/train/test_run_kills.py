"""fuse-train killed (kill -9 as a real process, tests/killpoints.py), then resumed or
rerun: the same tensors (torch.equal) as an uninterrupted run; a second run on the same
folder is refused; a cut-short metrics line is dropped; RunDir's rules for distill too."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from killpoints import assert_same_tensors, run_until_event, temp_files

from mmcli.errors import BadInput
from mmcli.train.state import METRICS_FILE, RunDir

ARGS = ["--encoder", "image=tiny", "--encoder", "text=tiny", "--encoder", "audio=tiny",
        "--embed-dim", "16", "--batch-size", "16", "--max-steps", "6", "--save-every", "2",
        "--log-every", "1", "--device", "cpu", "-q"]  # fmt: skip


def _train(cli, data, out, *extra):
    """fuse-train in this process, on one thread (as the killed process, OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cli("fuse-train", data, "-o", out, *ARGS, *extra)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clean(toy_tensors, tmp_path_factory):
    from typer.testing import CliRunner

    from mmcli.cli.app import app

    out = tmp_path_factory.mktemp("runs") / "clean"

    def cli(*args):
        return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)

    assert _train(cli, toy_tensors, out).exit_code == 0
    return out


def _steps(run) -> list:
    return [
        (r.get("step"), r.get("loss"), r.get("eval"))
        for r in map(json.loads, (run / METRICS_FILE).read_text().splitlines())
    ]


def _assert_same_run(clean, run):
    assert_same_tensors(clean, run)  # model, last and state (optimizer, RNG) checkpoints
    assert _steps(run) == _steps(clean)  # every step once, the same losses
    assert temp_files(run) == [] and not list(run.parent.glob(f".{run.name}.lock"))


def test_killed_mid_run_resumes_to_the_same_tensors(cli, toy_tensors, clean, tmp_path):
    run = tmp_path / "run"
    args = ["fuse-train", toy_tensors, "-o", run, *ARGS]
    r = run_until_event(args, event="rename", path=f"{run}/state.safetensors", nth=2)
    assert r.returncode == -signal.SIGKILL
    assert temp_files(run)  # the state being written when it was killed
    with open(run / METRICS_FILE, "a") as f:  # and the disk filled while a line was written
        f.write('{"step": 5, "epoch": 1, "lo')
    res = _train(cli, toy_tensors, run, "--resume")
    assert res.exit_code == 0, res.stderr
    _assert_same_run(clean, run)


def test_killed_before_its_first_checkpoint_reruns_afresh(cli, toy_tensors, clean, tmp_path):
    run = tmp_path / "run"
    args = ["fuse-train", toy_tensors, "-o", run, *ARGS]
    r = run_until_event(args, event="rename", path=f"{run}/state.safetensors", nth=1)
    assert r.returncode == -signal.SIGKILL
    assert (run / "run.json").exists() and not (run / "state.safetensors").exists()
    res = _train(cli, toy_tensors, run, "--resume")
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "nothing to resume: the run was stopped before its first checkpoint" in res.stderr
    assert "drop --resume: the run then starts afresh" in res.stderr
    res = _train(cli, toy_tensors, run)  # the same command, without --resume
    assert res.exit_code == 0, res.stderr
    _assert_same_run(clean, run)


def test_a_second_run_on_the_folder_is_refused(cli, toy_tensors, tmp_path):
    run = tmp_path / "run"
    args = ["fuse-train", toy_tensors, "-o", run, *ARGS]
    first = run_until_event(args, event="open", path=f"{run}/{METRICS_FILE}", action="stop")
    try:
        for extra in ([], ["--resume"], ["--overwrite"]):
            res = _train(cli, toy_tensors, run, *extra)
            assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
            assert f"another mmcli process is writing this output (pid {first.pid}: " in res.stderr
            assert "mmcli fuse-train" in res.stderr
    finally:
        first.kill()
        first.communicate()
    assert not (run / METRICS_FILE).exists()  # the refused runs wrote no metrics


def test_a_run_folder_is_never_an_input(cli, toy_tensors, tmp_path):
    res = cli("fuse-train", toy_tensors, "-o", toy_tensors, *ARGS, "--overwrite")
    assert res.exit_code == 2 and "is where the input is read from" in res.stderr
    (tmp_path / "t").mkdir()
    teacher = tmp_path / "t" / "model.safetensors"
    teacher.write_bytes(b"a teacher")
    res = cli("distill", toy_tensors, "--teacher", teacher, "-o", tmp_path / "t", "--overwrite")
    assert res.exit_code == 2 and "would replace an input file" in res.stderr
    assert teacher.read_bytes() == b"a teacher"


def test_rundir_rules_for_a_run_that_saved_nothing(tmp_path):
    """distill and fuse-train share RunDir: run.json and metrics but no state (killed
    before the first checkpoint) reruns afresh without --resume; another command's run,
    or a run with state, still needs --resume or --overwrite."""
    run = tmp_path / "r"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"command": "distill", "args": {}}))
    (run / METRICS_FILE).write_text('{"step": 1, "loss": 2.0}\n')
    (run / ".state.safetensors.abcd1234.tmp").write_bytes(b"half")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(BadInput, match="nothing to resume: the run was stopped before"):
        RunDir(run, command="distill", args={}, resume=True, overwrite=False)
    with pytest.raises(BadInput, match="already holds another run"):
        RunDir(run, command="fuse-train", args={}, resume=False, overwrite=False)
    d = RunDir(run, command="distill", args={"x": 1}, resume=False, overwrite=False)
    d.create()
    d.close()
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt", "run.json"]
    assert json.loads((run / "run.json").read_text())["args"] == {"x": 1}
    (run / "state.safetensors").write_bytes(b"saved")
    with pytest.raises(BadInput, match="already holds another run"):
        RunDir(run, command="distill", args={}, resume=False, overwrite=False)


def test_metrics_lines(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    d = RunDir(run, command="fuse-train", args={}, resume=False, overwrite=False, is_main=False)
    (run / METRICS_FILE).write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert [r["step"] for r in d.metrics()] == [1, 2]  # a cut-short last line is dropped
    (run / METRICS_FILE).write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(BadInput, match="line 2 is not a JSON object"):
        d.metrics()
