"""extract's loader: a background thread reading batches out of the memory-mapped shards."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mmcli.data.captions import caption_rows
from mmcli.formats.tensorfile import TensorSet
from mmcli.runtime import Prefetch

log = logging.getLogger("mmcli")


@dataclass
class Batch:
    shard: int  # position in the input set
    table: str
    start: int
    data: Any  # a CPU tensor (pinned on CUDA)


@dataclass
class EndOfShard:
    shard: int


class Loader:
    """A background thread reading batches from the memory-mapped shards, in order.

    It copies each batch out of the memory map (into pinned memory on CUDA, so the copy
    to the device can be non-blocking; in channels_last layout for ``channels_last``
    tables), so page faults, disk reads and the layout change happen off the compute
    thread. Yields :class:`Batch` and, after the last batch of a shard,
    :class:`EndOfShard`. The copies are torch's (``contiguous(channels_last)``,
    ``clone``): measured faster than numpy's strided transpose.
    """

    def __init__(
        self,
        tensors: TensorSet,
        shards,
        tables,
        batch_size: int,
        device,
        prefetch: int,
        channels_last=(),
        tokenize=None,
        decoders=None,
    ):
        self.tensors, self.shards, self.tables = tensors, list(shards), list(tables)
        self.device = device
        self.gpu_decode = device.type == "cuda"  # JPEG rows on the GPU (mmcli.data.encoded)
        self.batch_size = batch_size
        self.pin = device.type == "cuda"
        self.channels_last = set(channels_last)
        #: table -> a pretrained encoder's tokenize(captions): those tables are read as strings
        self.tokenize: dict[str, Any] = dict(tokenize or {})
        #: encoded table -> its Decoder (:func:`start_decoders`; the caller closes them), one
        #: for the whole run: its worker processes serve every shard
        self.decoders: dict[str, Any] = dict(decoders or {})
        self.feed = Prefetch(self._batches, depth=prefetch, name="mmcli-extract-loader")

    def _copy(self, data, table: str):
        """The batch in RAM (from the memory-mapped shard), image batches already in
        channels_last (torch's copy: measured faster here than numpy's strided one)."""
        import torch

        if table in self.tokenize:  # caption strings -> the model's own tokens
            return self.tokenize[table](data)
        if data.device.type != "cpu":  # decoded on the GPU already
            if table in self.channels_last:
                return data.contiguous(memory_format=torch.channels_last)
            return data
        if table in self.channels_last and data.dim() == 4:
            out = data.contiguous(memory_format=torch.channels_last)
            if out.data_ptr() == data.data_ptr():  # already channels_last: still copy
                out = out.clone(memory_format=torch.channels_last)
        else:
            out = data.clone()
        return out.pin_memory() if self.pin else out

    def _decoded(self, sf, table: str) -> Iterator[Any]:
        """An encoded table's batches, decoded in worker processes (or on the GPU)."""
        import torch

        from mmcli.data.encoded import decode_gpu

        decoder = self.decoders[table]
        data, offsets = sf.encoded(table)
        offsets = offsets.tolist()
        for start in range(0, len(offsets) - 1, self.batch_size):
            stop = min(start + self.batch_size, len(offsets) - 1)
            blobs = [data[offsets[r] : offsets[r + 1]].tobytes() for r in range(start, stop)]
            if self.gpu_decode:
                try:
                    x = decode_gpu(blobs, decoder.transform, self.device)
                except ValueError:  # not all JPEG, or a --like transform: the workers
                    x = None
                except Exception as e:  # nvjpeg refused: the workers from now on
                    log.info("GPU JPEG decoding unavailable (%s): decoding on the CPU", e)
                    self.gpu_decode, x = False, None
                if x is not None:
                    yield x
                    continue
            yield torch.from_numpy(decoder.decode(blobs))

    def _batches(self) -> Iterator[Batch | EndOfShard]:
        for i in self.shards:
            sf = self.tensors.shards[i]
            for table in self.tables:
                if sf.is_encoded(table):
                    start = 0
                    for x in self._decoded(sf, table):
                        yield Batch(i, table, start, self._copy(x, table))
                        start += len(x)
                    continue
                # memory-mapped (rows, ...), or the captions as given for a pretrained tokenizer
                data = caption_rows(sf, table) if table in self.tokenize else sf.tensor(table)
                for start in range(0, len(data), self.batch_size):
                    yield Batch(
                        i, table, start, self._copy(data[start : start + self.batch_size], table)
                    )
                del data
            yield EndOfShard(i)

    def __iter__(self) -> Iterator[Batch | EndOfShard]:
        return iter(self.feed)

    def close(self) -> None:
        self.feed.close()


def start_decoders(tensors: TensorSet, workers: int, device) -> dict[str, Any]:
    """The Decoders of the encoded tables of ``tensors``, their worker processes started
    now, so that they start up while the model is built (forkserver workers that import
    torch and torchvision for a library's transform took seconds); on CUDA, those of
    mmcli's own transform start only if the GPU cannot decode (nvjpeg first). The caller
    closes them (:func:`close_decoders`)."""
    from mmcli.data.decodepool import Decoder

    out: dict[str, Any] = {}
    encoded = [t for t in tensors.tables if any(sf.is_encoded(t) for sf in tensors.shards)]
    try:
        for table in encoded:
            decoder = Decoder(tensors.spec(table), workers)
            if device.type != "cuda" or not decoder.transform.default:
                decoder.start()
            out[table] = decoder
    except BaseException:
        close_decoders(out)
        raise
    return out


def close_decoders(decoders: dict[str, Any]) -> None:
    for decoder in decoders.values():
        decoder.close()
