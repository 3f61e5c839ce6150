"""distill's task: the loss of a batch, student against the frozen teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmcli import onednn
from mmcli.errors import BadInput
from mmcli.models.multimodal import MultimodalModel
from mmcli.train import objectives as obj
from mmcli.train.distill.config import CLASS_LOSSES, PAIR_LOSSES, DistillConfig
from mmcli.train.distill.data import DistillData
from mmcli.train.distill.students import Student
from mmcli.train.distill.teacher import teacher_scale
from mmcli.train.sampler import Batch
from mmcli.train.task import JointTask


class DistillTask(JointTask):
    """The distillation loss of a batch (student vs the frozen teacher), validation, saving.

    The teacher is held outside the module tree (not in ``state_dict``, not wrapped by DDP,
    never trained) but moves with it (``.to(device)``).
    """

    def __init__(
        self,
        student: Student,
        teacher: MultimodalModel,
        cfg: DistillConfig,
        data: DistillData,
        *,
        cached: bool = False,
    ):
        super().__init__(data, cfg.eval_batch_size)
        self.student = student.model
        self.trained = list(student.trained)
        self.frozen = list(student.frozen)
        self.targets = dict(student.targets)
        self.cfg = cfg
        self.cached = cached
        self._teacher = [teacher]
        self.scale_t = teacher_scale(teacher)
        # the teacher's outputs a batch needs: what each student modality learns from, and
        # the frozen copies' (whose outputs are the teacher's)
        wanted = set(self.targets.values()) | (set(self.frozen) & set(data.modalities))
        self.teacher_mods = [m for m in data.modalities if m in wanted]
        # a learned linear projector per modality whose student width is not the teacher's
        # (only a checkpoint student or identity heads; named / derived students' heads map
        # into the teacher's width themselves). Trained, resumed, never saved with the student.
        self.projector = nn.ModuleDict()
        for m in self.trained:
            s_dim, t_dim = self.student.out_dim(m), teacher.out_dim(self.targets[m])
            if s_dim != t_dim:
                self.projector[m] = nn.Linear(s_dim, t_dim, bias=False)
        w = cfg.losses
        self.need_tokens = bool(set(w) & set(CLASS_LOSSES)) and (
            self.student.fusion_kind == "attention" or teacher.fusion_kind == "attention"
        )
        if cached and "kd" in w and teacher.fusion_kind == "attention":
            raise BadInput(
                "--cache-teacher stores one embedding per row, and kd through the teacher's "
                "attention fusion needs its tokens",
                hint="drop --cache-teacher (or the kd loss)",
            )

    @property
    def teacher(self) -> MultimodalModel:
        return self._teacher[0]

    @property
    def model(self) -> MultimodalModel:
        """The model trained (and saved, validated): the student."""
        return self.student

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.teacher._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        for m in self.frozen:  # frozen copies keep their batch-norm statistics
            self.student.encoders[m].eval()
        if self.cfg.cross:
            for name, module in self.student.named_children():
                if name not in ("encoders", "heads"):
                    module.eval()
        return self

    # -- outputs ------------------------------------------------------------------
    def _teacher_outputs(self, batch: Batch, modalities: list[str]):
        """{m: raw projected embedding [K*B, D]}, {m: (tokens, mask)} (when fusion needs them)."""
        raw, toks = {}, {}
        t = self.teacher
        dev = next(t.parameters()).device
        with torch.no_grad(), onednn.linear(dev):  # (fp32 CPU products only, see mmcli.onednn)
            for m in modalities:
                key = f"teacher.{m}"
                if key in batch.data:
                    raw[m] = batch.data[key].float()
                    continue
                x = batch.data[m]
                if t.encoders[m].takes_text:  # a pretrained text tower: its own tokenizer
                    table = self.data.dataset.tables[m]
                    x = table.model_input(t.encoders[m], batch.rows[m].numpy()).to(x.device)
                pooled, tm = self.pooled_rows(t, batch, m, x, tokens=self.need_tokens)
                if tm is not None:
                    toks[m] = tm
                raw[m] = (t.heads[m](pooled) if m in t.heads else pooled).float()
        return raw, toks

    def _student_outputs(self, batch: Batch, t_raw: dict, t_toks: dict):
        raw, toks = {}, {}
        s = self.student
        for m in self.trained:
            pooled, tm = self.pooled_rows(s, batch, m, batch.data[m], tokens=self.need_tokens)
            if tm is not None:
                toks[m] = tm
            raw[m] = s.heads[m](pooled).float()
        for m in self.frozen:  # the teacher's own encoder: its outputs are the teacher's
            if m in t_raw:
                raw[m] = t_raw[m]
                if m in t_toks:
                    toks[m] = t_toks[m]
        return raw, toks

    @staticmethod
    def _aligned(t: torch.Tensor, s: torch.Tensor, b: int) -> torch.Tensor:
        """The teacher's rows lined up with the student's (cross-modal: one image per item
        against K captions, or the first caption against one audio clip)."""
        if t.shape[0] == s.shape[0]:
            return t
        return t[:b].repeat(s.shape[0] // b, 1)

    def _in_teacher_space(self, m: str, raw: torch.Tensor) -> torch.Tensor:
        return self.projector[m](raw) if m in self.projector else raw

    # -- the loss -----------------------------------------------------------------
    @property
    def coupled(self) -> bool:
        """similarity, contrastive and relational compare the batch's rows with each other:
        ``--accum-steps`` then uses the gradient cache; every loss is computed over the
        whole N×B batch there (the per-row ones are cheap after the encoders)."""
        return bool(set(self.cfg.losses) & {"similarity", "contrastive", "relational"})

    def represent(self, batch: Batch, cached=None):
        """(teacher outputs, teacher tokens, student outputs, student tokens); encoded again,
        the teacher's are taken from the first pass (``cached``)."""
        if cached is None:
            t_raw, t_toks = self._teacher_outputs(batch, self.teacher_mods)
        else:
            t_raw, t_toks = cached[0], cached[1]
        s_raw, s_toks = self._student_outputs(batch, t_raw, t_toks)
        return t_raw, t_toks, s_raw, s_toks

    def batch_loss(self, batch: Batch, reps):
        w = self.cfg.losses
        t_raw, t_toks, s_raw, s_toks = reps
        losses: dict[str, torch.Tensor] = {}
        logs: dict[str, float] = {}
        self._modality_losses(batch, s_raw, t_raw, losses)
        if set(w) & set(PAIR_LOSSES):
            self._pair_losses(batch, s_raw, t_raw, losses, logs)
        if set(w) & set(CLASS_LOSSES):
            self._class_losses(batch, s_raw, s_toks, t_raw, t_toks, losses)
        total = combine(losses, w)
        return total, {**{k: float(v.detach()) for k, v in losses.items()}, **logs}

    def state_logs(self) -> dict[str, float]:
        p = self.student.logit_scale
        return {"logit_scale": float(p.detach().exp())} if p is not None and p.requires_grad else {}

    def _modality_losses(self, batch: Batch, s_raw: dict, t_raw: dict, losses: dict) -> None:
        """feature and relational: each student modality against its teacher target."""
        w = self.cfg.losses
        feats, rels = [], []
        for m in self.trained:
            t_m = self._aligned(t_raw[self.targets[m]], s_raw[m], len(batch))
            present = batch.present[m].repeat(s_raw[m].shape[0] // len(batch))
            if "feature" in w and present.any():
                s_m = self._in_teacher_space(m, s_raw[m])[present]
                feats.append(obj.feature_loss(s_m, t_m[present], self.cfg.feature_loss))
            if "relational" in w:
                s_all, _ = self.gathered_rows(batch, F.normalize(s_raw[m], dim=-1), m)
                t_all, _ = self.gathered_rows(batch, F.normalize(t_m, dim=-1), m, grad=False)
                rels.append(obj.relational_loss(s_all, t_all))
        if feats:
            losses["feature"] = torch.stack(feats).mean()
        if rels:
            losses["relational"] = torch.stack(rels).mean()

    def _pair_losses(self, batch: Batch, s_raw: dict, t_raw: dict, losses: dict, logs: dict):
        """similarity distributions and contrastive (the student's own + interactive)."""
        w = self.cfg.losses
        sim_t = self.cfg.temperature / self.scale_t  # on cosines: the teacher's logits / T
        p = self.student.logit_scale
        scale = p.exp() if p is not None else self.scale_t
        sims, own, inter = [], [], []
        if self.cfg.cross:
            a, b = self.cfg.from_modality, self.cfg.to_modality
            t_a = self._aligned(t_raw[a], s_raw[b], len(batch))
            s_b, ib = self.gathered_rows(batch, F.normalize(s_raw[b], dim=-1), b)
            t_a, ia = self.gathered_rows(batch, F.normalize(t_a, dim=-1), b, grad=False)
            # the student's B rows stand in for the teacher's A rows (its head maps B
            # into A's space): against the teacher's A rows of the other items
            if "similarity" in w:
                sims.append(obj.similarity_loss(s_b, t_a, t_a, t_a, sim_t))
            if "contrastive" in w:
                inter.append(obj.contrastive_loss(s_b, t_a, ib, ia, self.scale_t))
        for a, b in [] if self.cfg.cross else self.data.pairs:
            s_a, ia = self.gathered_rows(batch, F.normalize(s_raw[a], dim=-1), a)
            s_b, ib = self.gathered_rows(batch, F.normalize(s_raw[b], dim=-1), b)
            t_a, _ = self.gathered_rows(batch, F.normalize(t_raw[a], dim=-1), a, grad=False)
            t_b, _ = self.gathered_rows(batch, F.normalize(t_raw[b], dim=-1), b, grad=False)
            if "similarity" in w:
                sims.append(obj.similarity_loss(s_a, s_b, t_a, t_b, sim_t))
            if "contrastive" in w:
                own.append(obj.contrastive_loss(s_a, s_b, ia, ib, scale))
                p_a = self._projected_rows(batch, s_raw, a, s_a)
                p_b = self._projected_rows(batch, s_raw, b, s_b)
                inter.append(obj.interactive_contrastive_loss(p_a, p_b, t_a, t_b, ia, ib, scale))
        if sims:
            losses["similarity"] = torch.stack(sims).mean()
        if own or inter:
            parts = [torch.stack(x).mean() for x in (own, inter) if x]
            losses["contrastive"] = torch.stack(parts).mean()
            if own:
                logs["contrastive/own"] = float(parts[0].detach())
            logs["contrastive/interactive"] = float(parts[-1].detach())

    def _class_losses(self, batch, s_raw, s_toks, t_raw, t_toks, losses: dict) -> None:
        """Hinton kd on the fused embedding's logits, and/or cross-entropy on the labels."""
        w = self.cfg.losses
        b = len(batch)
        s_first = {m: F.normalize(e[:b], dim=-1) for m, e in s_raw.items()}
        s_logits = self.student.classifier(
            self.student.fuse_parts(s_toks, s_first, batch.present)[0]
        )
        if "kd" in w:
            with torch.no_grad():
                t_first = {m: F.normalize(t_raw[m][:b], dim=-1) for m in s_first}
                fused = self.teacher.fuse_parts(t_toks, t_first, batch.present)[0]
                t_logits = self.teacher.classifier(fused)
            losses["kd"] = obj.kd_loss(s_logits, t_logits, self.cfg.temperature)
        if "ce" in w:
            losses["ce"] = obj.classify_loss(s_logits, batch.labels)

    def _projected_rows(self, batch, s_raw, m, rows):
        if m not in self.projector:
            return rows
        return self.gathered_rows(batch, F.normalize(self.projector[m](s_raw[m]), dim=-1), m)[0]


def combine(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """The weighted sum of the losses computed (``kd=0.9,ce=0.1`` is Hinton's mix)."""
    if not losses:
        raise BadInput(
            "none of the chosen losses applies to this data",
            hint=f"chosen: {', '.join(weights)}",
        )
    return sum(weights[k] * v for k, v in losses.items())
