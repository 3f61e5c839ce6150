"""The end of a ``distill`` run: teacher vs student, side by side.

Parameters (all, and those the run trained), encode throughput of each distilled modality
(rows/s of ``model.encode`` over training rows, the same batch size, median of 3), the same
evaluation metrics on the held-out split (:func:`mmcli.train.evaluation.evaluate_model`)
and the retention ratio student / teacher of each; for cross-modal runs the new
modality's recall against the teacher's other modalities.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmcli.modalities import PAIR_ORDER
from mmcli.models.multimodal import MultimodalModel
from mmcli.runtime import autocast, cast_for_inference, cpu_cast
from mmcli.train.data import Dataset
from mmcli.train.distill.config import DistillConfig
from mmcli.train.distill.data import DistillData
from mmcli.train.distill.students import Student
from mmcli.train.evaluation import evaluate_model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def encode_throughput(
    models: dict[str, MultimodalModel],
    modalities: dict[str, str],
    ds: Dataset,
    items: np.ndarray,
    *,
    batch_size: int,
    max_rows: int,
    repeats: int,
    device: torch.device,
    precision: str = "fp32",
) -> dict[str, dict[str, float]]:
    """Rows/s of ``model.encode`` over the rows of ``items`` (at most ``max_rows`` per
    modality), each named model with its modality (``modalities[name]``), batches read
    beforehand, the same batch size for all, models interleaved, median of ``repeats``.
    Per model: ``{modality: rows/s, "all": rows / total seconds}``.

    Timed at ``precision`` as inference runs it: bf16 on the CPU on bfloat16 copies of the
    models (what ``extract --precision bf16`` does; autocast there is for training only),
    autocast on CUDA; the models given are left as they are."""
    out: dict[str, dict[str, float]] = {}
    if cpu_cast(precision, device):  # one copy per distinct model
        cast = {
            id(m): cast_for_inference(copy.deepcopy(m), precision, device) for m in models.values()
        }
        models = {name: cast[id(m)] for name, m in models.items()}
    times: dict[str, list[float]] = {n: [] for n in models}
    batches: dict[str, list] = {}  # per model: the same rows, as its encoder takes them
    read: dict[tuple, list] = {}
    for name, model in models.items():
        m = modalities[name]
        enc = model.encoders[m]
        key = (m, id(enc) if enc.takes_text else None)
        if key not in read:
            rows = np.concatenate([ds.rows_of[m][i] for i in items])[:max_rows]
            # read (a pretrained text tower's captions tokenized) beforehand, as preprocess
            # tokenizes the byte tokens beforehand
            read[key] = [
                ds.tables[m].model_input(enc, rows[s : s + batch_size]).to(device)
                for s in range(0, len(rows), batch_size)
            ]
        batches[name] = read[key]
    for name, model in models.items():  # warm up
        model.eval().encode(modalities[name], batches[name][0])
    for _ in range(repeats):
        for name, model in models.items():
            m = modalities[name]
            start = time.perf_counter()
            for x in batches[name]:
                with autocast(device, precision):
                    model.encode(m, x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
    for name in models:
        m = modalities[name]
        n = sum(len(x) for x in batches[name])
        out[name] = {"modality": m, "rows": n, "rows_per_s": n / statistics.median(times[name]),
                     "precision": precision}  # fmt: skip
    return out


def final_report(
    teacher: MultimodalModel,
    student_path: Path,
    student: Student,
    data: DistillData,
    cfg: DistillConfig,
    *,
    device: torch.device,
    precision: str,
    summary: dict[str, Any],
) -> dict[str, Any]:
    """Teacher vs student: parameters, encode throughput, the same held-out metrics, retention."""
    best = MultimodalModel.from_checkpoint(student_path, device=device)
    report: dict[str, Any] = {
        "command": "distill",
        "run_dir": summary.get("run_dir"),
        "student_model": str(student_path),
        "losses": cfg.losses,
        "temperature": cfg.temperature,
    }
    metrics = _held_out_metrics(teacher, best, data, cfg)
    rates = _throughput(teacher, best, student, data, cfg, device=device, precision=precision)
    t_path = (teacher.checkpoint or {}).get("path")
    report["teacher"] = _side("teacher", teacher, t_path, None, rates, metrics)
    trained = sum(p.numel() for p in student.model.parameters() if p.requires_grad)
    report["student"] = _side("student", best, str(student_path), trained, rates, metrics)
    report["student"]["kind"] = student.description
    report["parameter_ratio"] = round(
        report["student"]["parameters"] / max(1, report["teacher"]["parameters"]), 4
    )
    report["speedup"] = _speedup(report, student)
    report["throughput_precision"] = precision  # bf16 on the CPU: bfloat16 copies, as extract
    shared = [
        k
        for k in metrics["student"]
        if k in metrics["teacher"] and not k.endswith("/pairs") and metrics["teacher"][k] > 0
    ]
    report["retention"] = {
        k: round(metrics["student"][k] / metrics["teacher"][k], 4) for k in shared
    }
    report["split"] = data.test_split
    report["items"] = int(len(data.test)) if data.test is not None else 0
    headline = _headline(report, data, cfg, metrics)
    if headline is not None and not cfg.cross:
        report["headline"] = headline
    if cfg.cross:
        report["cross_modal"] = _cross_summary(cfg, data, metrics["student"])
        if headline is not None:
            report["headline"] = headline
    report["train"] = {
        k: summary.get(k)
        for k in ("steps", "epochs", "seconds", "samples_per_s", "final_loss", "best_metrics")
    }
    return report


def _held_out_metrics(teacher, best, data: DistillData, cfg: DistillConfig) -> dict[str, dict]:
    """The same evaluation of teacher and student on the report's items."""
    metrics: dict[str, dict[str, float]] = {"teacher": {}, "student": {}}
    if data.test is None:
        return metrics
    pairs = data.eval_pairs
    t_pairs = [p for p in pairs if p[0] in teacher.encoders and p[1] in teacher.encoders]
    if cfg.cross:  # the teacher's own pairs too, for the record
        t_pairs = [p for p in PAIR_ORDER if p[0] in teacher.encoders and p[1] in teacher.encoders]
        tables = data.test_dataset.tables
        t_pairs = [p for p in t_pairs if p[0] in tables and p[1] in tables]
    bs = cfg.eval_batch_size
    metrics["teacher"] = evaluate_model(teacher, data.test_dataset, data.test, t_pairs, bs)
    metrics["student"] = evaluate_model(
        best, data.test_dataset, data.test, list(dict.fromkeys(t_pairs + pairs)), bs
    )
    return metrics


def _throughput(teacher, best, student: Student, data, cfg, *, device, precision):
    """Encode rows/s of each distilled modality of the student, and of the teacher's
    encoder it replaces."""
    models, mods = {}, {}
    for m in student.trained:
        models[f"student.{m}"], mods[f"student.{m}"] = best, m
        tm = student.targets[m]
        if tm in teacher.encoders:
            models[f"teacher.{tm}"], mods[f"teacher.{tm}"] = teacher, tm
    return encode_throughput(
        models,
        mods,
        data.dataset,
        data.train,
        batch_size=cfg.throughput_batch_size,
        max_rows=cfg.throughput_rows,
        repeats=cfg.throughput_repeats,
        device=device,
        precision=precision,
    )


def _side(prefix: str, model, path: str | None, trained: int | None, rates, metrics) -> dict:
    """One column of the report: the model, its size, encode speed and metrics."""
    mine = {k.split(".", 1)[1]: v for k, v in rates.items() if k.startswith(prefix + ".")}
    rows = sum(v["rows"] for v in mine.values())
    secs = sum(v["rows"] / v["rows_per_s"] for v in mine.values())
    out = {
        "model": path,
        "parameters": count_parameters(model),
        "encoders": {m: model.config.encoders[m]["name"] for m in model.modalities},
        "extract_rows_per_s": {
            **{m: round(v["rows_per_s"], 1) for m, v in mine.items()},
            **({"all": round(rows / secs, 1)} if len(mine) > 1 else {}),
        },
        "metrics": metrics[prefix],
    }
    if trained is not None:
        out["trained_parameters"] = trained
    return out


def _speedup(report: dict[str, Any], student: Student) -> dict[str, float]:
    speed = {}
    s_rates = report["student"]["extract_rows_per_s"]
    t_rates = report["teacher"]["extract_rows_per_s"]
    for m in student.trained:
        tm = student.targets[m]
        s, t = s_rates.get(m), t_rates.get(tm)
        if s and t:
            speed[m if m == tm else f"{m}/{tm}"] = round(s / t, 2)
    if s_rates.get("all") and t_rates.get("all"):
        speed["all"] = round(s_rates["all"] / t_rates["all"], 2)
    return speed


def _headline(report, data: DistillData, cfg: DistillConfig, metrics) -> dict | None:
    """The one figure the command prints: the first pair's recall@1 (cross-modal: the new
    modality against one it never saw in training)."""
    student_m = metrics["student"]
    if not cfg.cross:
        if not data.eval_pairs:
            return None
        a, b = data.eval_pairs[0]
        key = f"{a}-{b}/{a}_retrieval_recall@1"
        if key not in student_m:
            return None
        return {
            "metric": key,
            "meaning": f"{b} -> {a} recall@1 on the {data.test_split} split",
            "teacher": metrics["teacher"].get(key),
            "student": student_m[key],
            "retention": report["retention"].get(key),
        }
    b = cfg.to_modality
    for p in data.eval_pairs:
        if b in p and cfg.from_modality not in p:
            other = p[0] if p[1] == b else p[1]
            key = f"{p[0]}-{p[1]}/{other}_retrieval_recall@1"
            if key in student_m:
                return {
                    "metric": key,
                    "meaning": f"{b} -> {other} recall@1 on the {data.test_split} split "
                    f"(no {b}-{other} pair trained)",
                    "teacher": None,
                    "student": student_m[key],
                    "retention": None,
                }
    return None


def _cross_summary(cfg: DistillConfig, data: DistillData, metrics: dict[str, float]) -> dict:
    """Recall of the new modality against each of the teacher's others (never trained on)."""
    b = cfg.to_modality
    out: dict[str, Any] = {"from": cfg.from_modality, "to": b, "split": data.test_split}
    for p in data.eval_pairs:
        if b not in p:
            continue
        other = p[0] if p[1] == b else p[1]
        for k in (1, 5, 10):
            key = f"{p[0]}-{p[1]}/{other}_retrieval_recall@{k}"
            if key in metrics:
                out[f"{b}->{other} recall@{k}"] = metrics[key]
            key = f"{p[0]}-{p[1]}/{b}_retrieval_recall@{k}"
            if key in metrics:
                out[f"{other}->{b} recall@{k}"] = metrics[key]
    return out


__all__ = ["count_parameters", "encode_throughput", "final_report"]
