"""Encoded images (``preprocess --store encoded``): what a shard keeps, and decoding it.

What is kept, per image (:func:`encode_image`, in preprocess's workers):

* a JPEG, PNG or WebP file whose shorter side is at most :func:`max_side` (twice the
  largest size the transform resizes to: ``2 × --image-size``, or ``2 × resize_size``
  for ``--like`` transforms that crop) is kept **as it is**, byte for byte. Decoding it
  (:func:`decode_image`) runs the very code ``--store pixels`` runs on the file
  (``ImageTransform.__call__``: JPEG draft scale, EXIF orientation, RGB conversion,
  resize and crop), so the pixels are identical;
* a larger image is decoded once (EXIF orientation applied, converted to RGB), its
  shorter side resized to :func:`max_side` (bicubic, antialiased) and re-encoded as JPEG
  at quality :data:`QUALITY` without chroma subsampling (4:4:4). Its pixels then differ
  from ``--store pixels`` by the re-encoding (tests/test_encoded_shards.py measures the
  bound: mean absolute difference under 1.5 levels of 255, see docs/formats.md);
* any other format (BMP, GIF, TIFF, ...) within the size is re-encoded losslessly as
  PNG after the RGB conversion: identical pixels again.

Every kept file is decoded once at preprocess time (a JPEG at 1/8 scale: every
entropy-coded block is still read, only the inverse DCT is smaller; then converted to
RGB), so a training run never meets an undecodable row.

Decoding in training and ``extract`` (:class:`mmcli.data.decodepool.Decoder`): rows are split over worker
processes in order (``--workers``; 0 = in the calling thread), each decodes its part
with the table's transform, or, with ``augment``, a random resized crop (open_clip's
training default: scale (0.9, 1.0), torchvision's aspect ratios (3/4, 4/3), bicubic)
and a horizontal flip with probability 1/2, drawn from a seed per row so that a step
is reproducible (``--resume``) whatever the number of workers. On CUDA, JPEG rows of
mmcli's own transform can be decoded on the GPU (:func:`decode_gpu`,
``torchvision.io.decode_jpeg``): a different IDCT and resize kernel, so those pixels
are not the CPU's (the same code on the CPU device is tested; on CUDA it is not: no GPU
on the test machines). torchvision 0.29 deprecates its decoders for TorchCodec's; its
warning is silenced here.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from mmcli.data.image import ImageDecodeError, ImageTransform, decoded, open_rgb
from mmcli.formats.userfiles import NotAFile, open_file

QUALITY = 95  # JPEG quality of re-encoded large images
SIDE_FACTOR = 2  # kept as is up to this multiple of the size the transform resizes to
KEPT_FORMATS = ("JPEG", "PNG", "WEBP")
#: open_clip's training crop (open_clip.transform.AugmentationCfg: scale (0.9, 1.0),
#: torchvision's RandomResizedCrop ratio (3/4, 4/3), bicubic); plus a horizontal flip
AUGMENT_SCALE = (0.9, 1.0)
AUGMENT_RATIO = (3 / 4, 4 / 3)


def max_side(t: ImageTransform) -> int:
    """The largest shorter side kept as is; larger images are re-encoded at this size."""
    return SIDE_FACTOR * max(t.size, t.resize_size or 0)


def store_spec(t: ImageTransform) -> dict[str, Any]:
    """What an encoded table's spec adds to the transform's (see the module docstring)."""
    return {
        "store": "encoded",
        "max_side": max_side(t),
        "reencode": f"JPEG quality {QUALITY} 4:4:4 above max_side, PNG for other formats",
    }


def read_bytes(path: str) -> bytes:
    try:
        with open_file(path, "file") as f:
            return f.read()
    except NotAFile as e:
        raise ImageDecodeError(e.reason) from None


def encode_image(path: str, t: ImageTransform, sizes: list | None = None) -> bytes:
    """The bytes an encoded shard keeps for the image at ``path`` (module docstring);
    ImageDecodeError for what ``--store pixels`` would refuse too."""
    raw = read_bytes(path)
    cap = max_side(t)
    with decoded(raw, t.max_pixels) as im:
        fmt, (w, h) = im.format, im.size
        if fmt in KEPT_FORMATS and min(w, h) <= cap:
            _validate(im)  # a corrupt file is caught here, never in training
            if sizes is not None:  # upsampled or not: as --store pixels reports it
                turned = im.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientation
                sizes.append((h, w) if turned else (w, h))
            return raw
    from PIL import Image

    im = open_rgb(raw, t.max_pixels)
    if sizes is not None:
        sizes.append(im.size)
    buf = io.BytesIO()
    if min(im.size) > cap:
        scale = cap / min(im.size)
        new = (max(cap, round(im.width * scale)), max(cap, round(im.height * scale)))
        im = im.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0)
        im.save(buf, "JPEG", quality=QUALITY, subsampling=0)
    else:
        im.save(buf, "PNG")
    blob = buf.getvalue()
    t(blob)
    return blob


def _validate(im) -> None:
    """Decode the whole file once: a JPEG at 1/8 scale (the decoder still reads every
    entropy-coded block, only the inverse DCT is smaller), other formats in full; then the
    RGB conversion training will do."""
    from mmcli.data.image import to_rgb

    if im.format == "JPEG":
        im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
    im.load()
    to_rgb(im)


def decode_image(blob: bytes, t: ImageTransform) -> np.ndarray:
    """A stored row -> uint8 [3, S, S], exactly as ``--store pixels`` makes it."""
    return t(blob)


def crop_params(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, top, crop width, crop height): torchvision's RandomResizedCrop.get_params
    (10 tries, then the center crop within the ratios) with open_clip's scale."""
    area = width * height
    log_ratio = (math.log(AUGMENT_RATIO[0]), math.log(AUGMENT_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*AUGMENT_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= width and 0 < ch <= height:
            top = int(rng.integers(0, height - ch + 1))
            left = int(rng.integers(0, width - cw + 1))
            return left, top, cw, ch
    ratio = width / height
    if ratio < AUGMENT_RATIO[0]:
        cw, ch = width, int(round(width / AUGMENT_RATIO[0]))
    elif ratio > AUGMENT_RATIO[1]:
        cw, ch = int(round(height * AUGMENT_RATIO[1])), height
    else:
        cw, ch = width, height
    return (width - cw) // 2, (height - ch) // 2, cw, ch


def augmented(blob: bytes, t: ImageTransform, seed: int) -> np.ndarray:
    """A random resized crop of the whole stored image to S x S (bicubic, antialiased) and
    a horizontal flip with probability 1/2, both drawn from ``seed``."""
    from PIL import Image

    im = open_rgb(blob, t.max_pixels)
    rng = np.random.default_rng(seed)
    left, top, cw, ch = crop_params(im.width, im.height, rng)
    box = (left, top, left + cw, top + ch)
    im = im.resize((t.size, t.size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    if rng.uniform() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))


def decode_batch(task: tuple) -> np.ndarray:
    """Worker: (blobs, transform, seeds or None) -> uint8 [len(blobs), 3, S, S]."""
    blobs, t, seeds = task
    out = np.empty((len(blobs), 3, t.size, t.size), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        out[i] = decode_image(blob, t) if seeds is None else augmented(blob, t, seeds[i])
    return out


def transform_of(spec: dict[str, Any]) -> ImageTransform:
    """The transform an encoded table's rows are decoded with (no pixel limit: the rows
    were checked at preprocess time)."""
    from mmcli.data.image import image_transform_from_spec

    return replace(image_transform_from_spec(spec), max_pixels=0)


def is_jpeg(blob: bytes) -> bool:
    return bytes(blob[:3]) == b"\xff\xd8\xff"


def decode_gpu(blobs: Sequence[bytes], t: ImageTransform, device: Any):
    """JPEG rows decoded on the GPU (``torchvision.io.decode_jpeg``, EXIF orientation
    applied), the shorter side resized (bicubic, antialiased) and center-cropped there:
    uint8 [N, 3, S, S] on ``device``. Not mmcli's CPU pixels to the bit (another IDCT and
    resize kernel); only for mmcli's own transform and JPEG rows (else ValueError)."""
    import warnings

    import torch
    import torch.nn.functional as F

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders (TorchCodec)
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

    if not t.default or not all(is_jpeg(b) for b in blobs):
        raise ValueError("GPU decoding takes JPEG rows of mmcli's own transform")
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        images = decode_jpeg(
            data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True
        )
    out = torch.empty((len(images), 3, t.size, t.size), dtype=torch.uint8, device=device)
    for i, x in enumerate(images):
        h, w = x.shape[1:]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        crop = x[:, top : top + side, left : left + side].unsqueeze(0).float()
        y = F.interpolate(crop, size=(t.size, t.size), mode="bicubic", antialias=True)
        out[i] = y.round().clamp(0, 255).to(torch.uint8)[0]
    return out


def pixel_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """An encoded table's spec without its storage keys: the spec of the pixels its rows
    decode to (what a model trained on them records)."""
    return {k: v for k, v in spec.items() if k not in store_spec(ImageTransform())}
