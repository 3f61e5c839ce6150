"""``mmcli caption`` as a library: a model's caption decoder over tensor shards or files.

    cap = Captioner.load("runs/cap/model.safetensors", DecodeOptions(beam=3))
    for line in cap.caption_tensors(["out/tensors"], split="test"):
        line      # {"id": "toy-00042", "caption": "a small red circle ...", "score": -1.93}
    cap.caption_files(["photo.jpg"])

Each item is captioned from its first row of the decoder's source table (image or
audio). Files are decoded as ``mmcli preprocess`` prepared the training data, from the
input spec stored in the checkpoint (image size, audio rate and length). ``score`` is
the caption's log-probability (see :mod:`mmcli.generate.search`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmcli import onednn
from mmcli.errors import BadInput
from mmcli.formats.manifest import load_manifest_index, locate_manifest
from mmcli.formats.tensorfile import TensorSet, open_tensors, where_paths
from mmcli.generate.search import DecodeOptions, Generated, generate
from mmcli.models.multimodal import MultimodalModel
from mmcli.models.tokenizers import tokenizer_from_spec


def item_splits(ts: TensorSet) -> list[str | None]:
    """The manifest ``split`` of every item of ``ts`` (BadInput without a manifest)."""
    path = locate_manifest(ts.source, ts.paths)
    if path is None:
        raise BadInput(
            "the shards name no readable manifest, so their items have no split",
            where=where_paths(ts.paths),
            hint="keep the manifest.jsonl that preprocess wrote next to the shards",
        )
    index = load_manifest_index(path)
    return [index[i].split if i in index else None for i in ts.ids()]


def select_items(ts: TensorSet, split: str | None) -> np.ndarray:
    """bool [items]: the items of ``split`` (every item for None)."""
    if split is None:
        return np.ones(ts.num_items, dtype=bool)
    names = item_splits(ts)
    keep = np.array([n == split for n in names], dtype=bool)
    if not keep.any():
        have = sorted({n for n in names if n is not None})
        raise BadInput(
            f"no item of split {split!r}",
            where=where_paths(ts.paths),
            hint=f"splits there: {', '.join(have)}" if have else "the manifest has no split field",
        )
    return keep


def first_rows(ts: TensorSet, table: str) -> Iterator[tuple[int, Any, np.ndarray, np.ndarray]]:
    """Per shard: (shard index, its table, the first row of each of its items (-1: none),
    the global item number of each of its items)."""
    for i, shard in enumerate(ts.shards):
        owner = np.asarray(shard.item_index(table))
        rows = np.full(shard.num_items, -1, dtype=np.int64)
        rows[owner[::-1]] = np.arange(len(owner))[::-1]  # earlier rows win
        yield i, shard.tensor(table), rows, ts.item_offsets[i] + np.arange(shard.num_items)


class Captioner:
    """A model with a caption decoder, ready to caption batches of source rows."""

    def __init__(
        self,
        model: MultimodalModel,
        opts: DecodeOptions | None = None,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
    ):
        if model.captioner is None:
            where = (model.checkpoint or {}).get("path")
            raise BadInput(
                "the model has no caption decoder",
                where=where,
                hint="train one with mmcli fuse-train --objective caption "
                "(or contrastive=1,caption=2)",
            )
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.opts = opts or DecodeOptions()
        self.batch_size = batch_size
        self.decoder = model.captioner
        self.source: str = self.decoder.config.source
        self.tokenizer = tokenizer_from_spec(self.decoder.config.tokenizer)
        self._transform = None

    @classmethod
    def load(cls, path: str, opts: DecodeOptions | None = None, **kw: Any) -> Captioner:
        return cls(MultimodalModel.from_checkpoint(path), opts, **kw)

    # -- core -----------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, x: torch.Tensor) -> list[Generated]:
        """Caption source rows ``x`` (as the shards store them), in batches."""
        out: list[Generated] = []
        enc = self.model.encoders[self.source]
        with onednn.linear(self.device):  # fp32 CPU products through oneDNN (mmcli.onednn)
            for start in range(0, len(x), self.batch_size):
                rows = x[start : start + self.batch_size].to(self.device)
                if self.decoder.config.kind == "attention":
                    memory = self.decoder.memory(*enc.forward_tokens(rows))
                else:
                    memory = self.decoder.memory(enc(rows))
                out.extend(generate(self.decoder, memory, self.opts))
        return out

    def text(self, g: Generated) -> str:
        return self.tokenizer.decode(g.tokens).strip()

    def lines(self, ids: Sequence[str], x: torch.Tensor) -> list[dict[str, Any]]:
        return [
            {"id": i, "caption": self.text(g), "score": round(g.score, 4)}
            for i, g in zip(ids, self.generate(x))
        ]

    # -- inputs ---------------------------------------------------------------------
    def caption_tensors(
        self, sources: Sequence[str], split: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """One line per item of tensor (or feature) shards that has a source row."""
        ts = open_tensors(list(sources))
        ts.require(
            self.source, hint=f"the caption decoder reads {self.source}: pass shards with it"
        )
        self.model.check_input(ts, self.source)
        keep = select_items(ts, split)
        ids = ts.ids()
        for _, data, rows, items in first_rows(ts, self.source):
            sel = (rows >= 0) & keep[items]
            chunk = np.flatnonzero(sel)
            for s in range(0, len(chunk), self.batch_size * 4):
                part = chunk[s : s + self.batch_size * 4]
                x = data[torch.from_numpy(rows[part])]
                yield from self.lines([ids[items[j]] for j in part], x)

    def transform(self):
        if self._transform is None:
            spec = dict((self.model.config.inputs or {}).get(self.source) or {})
            if self.model.config.encoders[self.source].get("name") == "features":
                raise BadInput(
                    f"the model's {self.source} encoder takes precomputed features, not files",
                    hint="extract the features with its backbone and pass the feature files",
                )
            if self.source == "image":
                from mmcli.data.image import image_transform_from_spec

                self._transform = image_transform_from_spec(spec)
            elif self.source == "audio":
                from mmcli.data.audio import audio_transform_from_spec

                self._transform = audio_transform_from_spec(spec)
            else:
                raise BadInput(f"cannot read {self.source} files", hint="pass tensor shards")
        return self._transform

    def load_file(self, path: str, where: str | None = None) -> np.ndarray:
        """One file decoded into a source row (BadInput naming ``where``, default the path,
        when it does not decode)."""
        from mmcli.data.audio import AudioDecodeError
        from mmcli.data.image import ImageDecodeError

        try:
            return self.transform()(Path(path).expanduser())
        except (ImageDecodeError, AudioDecodeError) as e:
            raise BadInput(str(e), where=where or str(path)) from None

    def caption_files(
        self, paths: Sequence[str], ids: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """One line per file (its id: ``ids`` or the path as given)."""
        if not paths:
            return []
        x = torch.from_numpy(np.stack([self.load_file(p) for p in paths]))
        return self.lines(list(ids or paths), x)


def parse_source_line(obj: Any, source: str, where: str) -> tuple[str, str]:
    """A stdin line ``{"image": path}`` (or ``audio``; optional ``"id"``) -> (id, path)."""
    if not isinstance(obj, dict):
        raise BadInput(
            f"expected a JSON object, got {type(obj).__name__}",
            where=where,
            hint=f'e.g. {{"{source}": "path"}}',
        )
    path = obj.get(source)
    if not isinstance(path, str) or not path:
        other = [k for k in ("image", "audio", "text") if k in obj and k != source]
        raise BadInput(
            f'the line has no "{source}" path'
            + (f" (the model captions {source}, not {other[0]})" if other else ""),
            where=where,
            hint=f'e.g. {{"{source}": "path", "id": "optional id"}}',
        )
    item_id = obj.get("id", path)
    return str(item_id), path
