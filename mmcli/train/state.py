"""The run folder and resumable training state, without pickle.

    RUN/
      run.json            what was asked for (command, arguments) and the mmcli version
      metrics.jsonl       one line per logging step and per evaluation
      state.safetensors   resumable state: model, optimizer, grad scaler, RNG, position
      last.safetensors    the latest model checkpoint (what extract/eval/retrieve load)
      model.safetensors   the best model by the validation metric (or the last, without val)

The optimizer's state dict is split into tensors (stored as safetensors) and everything
else (stored as JSON in the metadata), so resuming never unpickles anything.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from mmcli.errors import BadInput
from mmcli.formats.atomic import atomic_open, atomic_write_bytes
from mmcli.formats.locks import INSIDE_LOCK, OutputLock, is_temp_of, remove_stale_temps
from mmcli.formats.outputs import refuse_inputs_as_outputs
from mmcli.formats.runs import (  # noqa: F401  (the run folder's file names, in one place)
    BEST_FILE,
    LAST_FILE,
    METRICS_FILE,
    RUN_FILE,
    STATE_FILE,
)
from mmcli.formats.runs import RUN_FILES as OWNED

log = logging.getLogger("mmcli")

# arguments a resumed run may change: they do not change what is trained
RESUMABLE_CHANGES = (
    "loop.log_every",
    "loop.save_every",
    "fuse.eval_batch_size",
    "distill.eval_batch_size",
    "distill.throughput_batch_size",
    "distill.teacher",  # the path: its content is checked by sha256
    "teacher_sha256",  # distill names a changed teacher itself
)


def changed_args(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) of the arguments that differ, as JSON values."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, dict) and v and k not in ("objectives", "encoders", "weights"):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a = flat(json.loads(json.dumps(old, default=str)))
    b = flat(json.loads(json.dumps(new, default=str)))
    return [
        (k, a.get(k), b.get(k))
        for k in sorted(a)  # what the run recorded (an older run may have recorded less)
        if k not in RESUMABLE_CHANGES and a.get(k) != b.get(k)
    ]


class RunDir:
    """A training run's folder: guards against clobbering, appends metrics, saves state.

    The constructor checks and takes the folder's lock (the main process; a second run on
    the folder is refused, naming the first); :meth:`create` writes (after the inputs were
    validated), so a run refused for bad input leaves nothing behind. A run that was
    stopped before its first checkpoint (``run.json`` but no ``state.safetensors``) has
    nothing to resume: run again without ``resume`` and it starts afresh, replacing what
    it had written.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        command: str,
        args: dict[str, Any],
        resume: bool,
        overwrite: bool,
        is_main: bool = True,
    ):
        self.path = Path(path)
        self.is_main = is_main
        if self.path.exists() and not self.path.is_dir():
            raise BadInput("run folder path exists and is not a folder", where=str(path))
        self._lock = OutputLock(self.path, command) if is_main else None
        try:
            fresh = self._check(command, args, resume, overwrite)
        except BaseException:
            self.close()
            raise
        self._pending = (command, args, resume, overwrite or fresh)

    def _check(self, command: str, args: dict[str, Any], resume: bool, overwrite: bool) -> bool:
        """Refuse what cannot go on; True for a rerun of a run that saved nothing."""
        path, run_file = str(self.path), self.path / RUN_FILE
        old = _read_run(run_file)
        if resume:
            if not (self.path / STATE_FILE).exists():
                stopped = old is not None
                raise BadInput(
                    "nothing to resume: "
                    + (
                        "the run was stopped before its first checkpoint (no state.safetensors)"
                        if stopped
                        else "no state.safetensors in the run folder"
                    ),
                    where=path,
                    hint="drop --resume: the run then starts afresh"
                    if stopped
                    else "drop --resume to start a new run",
                )
            if old and old.get("command") not in (None, command):
                raise BadInput(
                    f"the run folder holds a {old.get('command')} run, not {command}",
                    where=path,
                )
            if overwrite:
                raise BadInput("--resume and --overwrite: choose one", where=path)
            changed = changed_args((old or {}).get("args") or {}, args) if args else []
            if changed:
                shown = "; ".join(f"{k}: {a} -> {b}" for k, a, b in changed[:3])
                more = f" (and {len(changed) - 3} more)" if len(changed) > 3 else ""
                raise BadInput(
                    f"cannot resume with other arguments than the run's: {shown}{more}",
                    where=path,
                    hint=f"resume with the arguments in {run_file}, or start a new run "
                    "(another -o, or --overwrite)",
                )
            return False
        if overwrite or not self._existing():
            return False
        same = old is not None and old.get("command") in (None, command)
        if same and not (self.path / STATE_FILE).exists():
            log.info("the run in %s stopped before its first checkpoint: starting it afresh", path)
            return True
        raise BadInput(
            f"run folder already holds {'another run' if old is not None else 'other files'}",
            where=path,
            hint="use --resume to continue it, --overwrite to replace it, or another -o",
        )

    def _existing(self) -> bool:
        """Whether the folder holds anything but a killed run's temporary files."""
        if not self.path.is_dir():
            return False
        return any(
            not is_temp_of(p.name, _owned) and p.name != INSIDE_LOCK for p in self.path.iterdir()
        )

    def close(self) -> None:
        """Give up the folder's lock (also done when the RunDir is garbage collected)."""
        if self._lock is not None:
            self._lock.release()

    def create(self) -> None:
        """Make the folder and record the run: call once the inputs are known to be good."""
        command, args, resume, overwrite = self._pending
        run_file = self.path / RUN_FILE
        if not self.is_main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.path, _owned)  # a killed run's; we hold the lock
        if overwrite and not resume:
            for name in OWNED:
                (self.path / name).unlink(missing_ok=True)
        if not resume:
            from mmcli import __version__

            with atomic_open(run_file) as f:
                json.dump(
                    {"command": command, "mmcli": __version__, "args": args},
                    f,
                    indent=2,
                    default=str,
                )

    def file(self, name: str) -> Path:
        return self.path / name

    # -- metrics -------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.path / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """On resume: drop metric lines written after the checkpoint we resume from (and
        a last line cut short by a kill or a full disk)."""
        path = self.path / METRICS_FILE
        if not self.is_main or not path.exists():
            return
        keep = [r for r in self._records() if r.get("step", 0) <= step]
        with atomic_open(path) as f:
            f.write("".join(json.dumps(r, default=float) + "\n" for r in keep))

    def metrics(self) -> list[dict[str, Any]]:
        return self._records()

    def _records(self) -> list[dict[str, Any]]:
        """The records of metrics.jsonl. A last line that is not whole JSON (the run was
        killed, or the disk filled, while writing it) is dropped; a bad line before it is
        an error."""
        path = self.path / METRICS_FILE
        if not path.exists():
            return []
        lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
        records = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, RecursionError):
                if all(not rest.strip() for rest in lines[i + 1 :]):
                    log.info("%s: dropped a partial last line (the run was cut short)", path)
                    break
                raise BadInput(
                    f"line {i + 1} is not a JSON object",
                    where=str(path),
                    hint="fix or remove the line, or start the run again (--overwrite)",
                ) from None
            records.append(record)
        return records


def _owned(name: str) -> bool:
    return name in OWNED


def _read_run(run_file: Path) -> dict[str, Any] | None:
    """run.json, or None without one ({} when it is unreadable)."""
    try:
        old = json.loads(run_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError):
        return {}
    return old if isinstance(old, dict) else {}


def refuse_inputs(path: str | os.PathLike, inputs) -> None:
    """The run folder and the files it holds are never among a run's ``inputs``."""
    refuse_inputs_as_outputs(inputs, files=[Path(path) / n for n in OWNED], folder=path)


# ------------------------------------------------------------ state (de)serialise


def _flatten(prefix: str, obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors in a nested structure by {"__tensor__": key} and collect them."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {
            "__dict__": [
                [_flatten(f"{prefix}.k{i}", k, tensors), _flatten(f"{prefix}.{i}", v, tensors)]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    if isinstance(obj, (list, tuple)):
        return {
            "__list__": [_flatten(f"{prefix}.{i}", v, tensors) for i, v in enumerate(obj)],
            "tuple": isinstance(obj, tuple),
        }
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot serialise {type(obj).__name__} in training state")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            items = [_unflatten(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("tuple") else items
    return obj


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write a nested dict of tensors / JSON values atomically as one safetensors file
    (canonical header: the same state gives the same bytes)."""
    from mmcli.formats.safetensors_io import save_torch as save

    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten("s", state, tensors)
    # safetensors refuses shared storage: give each tensor its own copy
    tensors = {k: v.clone() for k, v in tensors.items()}
    atomic_write_bytes(
        path,
        save(
            tensors,
            metadata={
                "mmcli.format": "1",
                "mmcli.kind": "train-state",
                "mmcli.structure": json.dumps(structure),
            },
        ),
    )


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    where = str(path)
    try:
        with safe_open(where, framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(where)
    except Exception as e:  # corrupt or truncated file
        raise BadInput(f"cannot read the training state ({e})", where=where) from None
    if meta.get("mmcli.kind") != "train-state":
        raise BadInput("not an mmcli training state file", where=where)
    return _unflatten(json.loads(meta["mmcli.structure"]), tensors)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
