"""preprocess --store encoded: the compressed files in the shards, decoded on the fly.

Encoded rows decode to exactly the pixels ``--store pixels`` stores (JPEG, PNG, EXIF
orientation, RGBA, palette, grayscale, a BMP re-encoded as PNG); an image larger than
twice the size is re-encoded once (JPEG quality 95), within a measured bound; corrupt
files are caught at preprocess time; extract, fuse-train and ``--augment`` read them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmcli.errors import BadInput
from mmcli.formats.tensorfile import ShardFile, TensorSet
from mmcli.preprocess import PreprocessConfig, preprocess

SIZE = 32  # images at most 64 px on the shorter side are kept as they are


def photo(w: int, h: int, seed: int) -> np.ndarray:
    """Photo-like RGB: smooth gradients, a few shapes, mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack(
        [
            127 + 100 * np.sin(x / w * rng.uniform(1, 4) + rng.uniform(0, 6)),
            127 + 100 * np.cos(y / h * rng.uniform(1, 4) + rng.uniform(0, 6)),
            127 + 80 * np.sin((x + y) / (w + h) * rng.uniform(2, 6)),
        ],
        axis=-1,
    )
    for _ in range(3):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(4, min(w, h) / 2)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _save(path, arr, mode="RGB", **kw):
    im = Image.fromarray(arr)
    if mode != "RGB":
        im = im.convert(mode)
    im.save(path, **kw)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoded")
    imgs = root / "imgs"
    imgs.mkdir()
    files = {}
    exif = Image.Exif()
    exif[274] = 6  # EXIF orientation: rotate 90
    cases = [
        ("jpg", (48, 40), "RGB", {"quality": 90}),
        ("jpg", (40, 64), "RGB", {"quality": 85, "exif": exif}),
        ("jpg", (64, 64), "L", {"quality": 90}),
        ("png", (50, 45), "RGB", {}),
        ("png", (36, 60), "RGBA", {}),
        ("png", (40, 40), "P", {}),
        ("bmp", (44, 38), "RGB", {}),  # not kept as is: re-encoded losslessly (PNG)
        ("jpg", (200, 150), "RGB", {"quality": 92}),  # > 2 x 32: re-encoded once
        ("webp", (48, 48), "RGB", {"lossless": True}),
        ("png", (20, 24), "RGB", {}),  # smaller than the size: upsampled, and counted
    ]
    for i, (ext, (w, h), mode, kw) in enumerate(cases):
        arr = photo(w, h, i)
        if mode == "RGBA":
            arr = np.dstack([arr, np.linspace(0, 255, w * h).reshape(h, w).astype(np.uint8)])
            mode = "RGB"
            Image.fromarray(arr, "RGBA").save(imgs / f"{i}.{ext}")
        else:
            _save(imgs / f"{i}.{ext}", arr, mode, **kw)
        files[str(i)] = imgs / f"{i}.{ext}"
    (imgs / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    whole = files["0"].read_bytes()
    (imgs / "cut.jpg").write_bytes(whole[: len(whole) // 2])  # a truncated download
    lines = [{"id": k, "image": f"imgs/{p.name}", "text": f"photo {k}"} for k, p in files.items()]
    lines.append({"id": "bad", "image": "imgs/bad.jpg", "text": "broken"})
    lines.append({"id": "cut", "image": "imgs/cut.jpg", "text": "cut short"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = {}
    for store in ("pixels", "encoded"):
        out[store] = root / store
        preprocess(
            str(root / "manifest.jsonl"),
            str(out[store]),
            config=PreprocessConfig(image_size=SIZE, store=store, shard_size=4),
        )
    return root, files, out


def _rows(folder):
    from mmcli.train.data import load_dataset

    ds = load_dataset([str(folder)])
    rows = np.array([int(ds.rows_of["image"][i][0]) for i in range(len(ds.ids))])
    return ds, rows


def test_encoded_rows_decode_to_the_pixels_of_store_pixels(data):
    _, files, out = data
    px, px_rows = _rows(out["pixels"])
    en, en_rows = _rows(out["encoded"])
    assert en.ids == px.ids and "bad" not in en.ids
    assert en.encoded == ["image"] and px.encoded == []
    a = px.tables["image"].fetch(px_rows).numpy().astype(int)
    b = en.tables["image"].fetch(en_rows).numpy().astype(int)
    for k, item in enumerate(en.ids):
        if item == "7":  # 200 x 150: re-encoded at 64 px, JPEG quality 95 4:4:4
            diff = np.abs(a[k] - b[k])
            assert 0 < diff.mean() < 2.0 and diff.max() <= 40, (diff.mean(), diff.max())
        else:
            assert np.array_equal(a[k], b[k]), item
    # what is kept: the files themselves up to 2 x the size, else one re-encoding
    blobs = en.tables["image"].images.blobs(en_rows)
    for item, blob in zip(en.ids, blobs):
        original = files[item].read_bytes()
        if files[item].suffix == ".bmp":
            assert blob[:8] == b"\x89PNG\r\n\x1a\n"
        elif item == "7":
            with Image.open(files[item]) as im, Image.open(__import__("io").BytesIO(blob)) as re:
                assert re.format == "JPEG" and min(re.size) == 2 * SIZE and im.size[0] > 64
        else:
            assert blob == original, item


def test_decoding_in_worker_processes_is_the_same_and_in_order(data):
    _, _, out = data
    en, rows = _rows(out["encoded"])
    table = en.tables["image"]
    alone = table.fetch(rows[::-1].copy())
    en.decode_images(workers=2)
    try:
        assert torch.equal(table.fetch(rows[::-1].copy()), alone)
    finally:
        en.close()


def test_one_worker_pool_serves_every_shard_through_a_shared_buffer(data):
    """extract's loader starts the decode workers once (before the model is built) and
    keeps them for every shard; the pixels come back through shared memory, the same as
    decoded in this thread, and the buffer is gone after close."""
    from pathlib import Path

    from mmcli.data.decodepool import Decoder
    from mmcli.extract.loader import Batch, Loader, close_decoders, start_decoders

    _, _, out = data
    ts = TensorSet(out["encoded"])
    assert len(ts.shards) == 3
    cpu = torch.device("cpu")
    decoders = start_decoders(ts, 2, cpu)
    assert list(decoders) == ["image"]
    loader = Loader(ts, range(3), ["image"], 3, cpu, 2, decoders=decoders)
    workers, buffers, got = set(), set(), {}
    try:
        for msg in loader:
            if isinstance(msg, Batch):
                got.setdefault(msg.shard, []).append(msg.data)
                pool = decoders["image"]._pool
                workers.add(tuple(sorted(pool.pids)))
                if decoders["image"]._shm is not None:
                    buffers.add(decoders["image"]._shm.name)
    finally:
        loader.close()
        close_decoders(decoders)
    assert len(workers) == 1 and len(next(iter(workers))) == 2  # one pool for the 3 shards
    assert buffers and not any((Path("/dev/shm") / b.lstrip("/")).exists() for b in buffers)
    alone = Decoder(ts.spec("image"), 0)
    for i, sf in enumerate(ts.shards):
        data_, offsets = sf.encoded("image")
        blobs = [data_[offsets[r] : offsets[r + 1]].tobytes() for r in range(len(offsets) - 1)]
        assert torch.equal(torch.cat(got[i]), torch.from_numpy(alone.decode(blobs))), i


def test_a_corrupt_image_is_skipped_and_listed_at_preprocess(data):
    _, _, out = data
    listed = {}
    for store in ("pixels", "encoded"):
        lines = (out[store] / "errors.jsonl").read_text().splitlines()
        listed[store] = [(e["id"], e["field"]) for e in map(json.loads, lines)]
    assert listed["encoded"] == listed["pixels"] == [("bad", "image"), ("cut", "image")]
    record = json.loads((out["encoded"] / "preprocess.json").read_text())
    pixels = json.loads((out["pixels"] / "preprocess.json").read_text())
    assert record["options"]["store"] == "encoded" and record["summary"]["kept"] == 10
    assert record["summary"]["upsampled_images"] == pixels["summary"]["upsampled_images"] == 1
    assert "store" not in json.loads((out["pixels"] / "preprocess.json").read_text())["options"]


def test_info_shows_the_storage(data, cli):
    _, _, out = data
    r = cli("info", out["encoded"], "--json")
    assert r.exit_code == 0, r.stderr
    table = json.loads(r.stdout)["tables"]["image"]
    shard_bytes = sum(
        ShardFile(p).tensors["image.bytes"].end - ShardFile(p).tensors["image.bytes"].begin
        for p in TensorSet(out["encoded"]).paths
    )
    assert table["store"] == "encoded" and table["shape"] == [3, SIZE, SIZE]
    assert table["bytes"] == shard_bytes and table["bytes_per_image"] == round(shard_bytes / 10)
    assert table["spec"]["store"] == "encoded" and table["spec"]["max_side"] == 2 * SIZE
    r = cli("info", out["encoded"])
    text = " ".join((r.stdout + r.stderr).split())  # the console wraps long lines
    assert "stored encoded" in text and "per image" in text
    pixels = json.loads(cli("info", out["pixels"], "--json").stdout)["tables"]["image"]
    assert pixels["store"] == "pixels"


def test_extract_from_encoded_equals_extract_from_pixels(data, tmp_path):
    from mmcli.extract import extract

    _, _, out = data
    feats = {}
    for store in ("pixels", "encoded"):
        extract(str(out[store]), str(tmp_path / store), encoders={"image": "convnet"},
                workers=2 if store == "encoded" else 0, batch_size=4)  # fmt: skip
        ts = TensorSet(tmp_path / store)
        x, items = ts.table("image")
        feats[store] = dict(zip([ts.ids()[i] for i in items.tolist()], x))
    assert feats["pixels"].keys() == feats["encoded"].keys()
    for item, x in feats["pixels"].items():
        if item != "7":  # the re-encoded image
            assert torch.equal(x, feats["encoded"][item]), item


def test_fuse_train_and_distill_from_encoded_shards_augment_refused_on_pixels(data, tmp_path, cli):
    _, _, out = data
    args = ["--epochs", "1", "--batch-size", "3", "--encoder", "image=tiny", "--workers", "0"]
    r = cli("fuse-train", out["encoded"], "-o", tmp_path / "run", "--augment", *args)
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["steps"] == 3  # 10 items, batches of 3
    teacher = tmp_path / "run" / "model.safetensors"
    r = cli("distill", out["encoded"], "--teacher", teacher, "-o", tmp_path / "student",
            "--student", "image=tiny", "--epochs", "1", "--batch-size", "5", "--workers", "2",
            "--augment")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["train"]["steps"] == 2
    r = cli("fuse-train", out["pixels"], "-o", tmp_path / "run2", "--augment", *args)
    assert r.exit_code == 2
    assert "--augment crops the full images" in r.stderr and "--store encoded" in r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and r.stderr.strip().endswith(errors[0]) and "Traceback" not in r.stderr


def test_augmented_batches_are_reproducible_per_step(data):
    """A batch is a function of (seed, epoch, step): what --resume rebuilds, with any
    number of workers; crops and flips differ between steps and from the center crop."""
    from mmcli.train.sampler import BatchSampler

    _, _, out = data
    en, _ = _rows(out["encoded"])
    items = np.arange(len(en.ids))
    sampler = BatchSampler(en, items, 4, seed=3, modalities=["image"])
    en.decode_images(workers=0, augment=True)
    first = sampler.make_batch(1, 0).data["image"]
    again = sampler.make_batch(1, 0).data["image"]
    other = sampler.make_batch(1, 1).data["image"]
    en.decode_images(workers=2, augment=True)
    try:
        pooled = sampler.make_batch(1, 0).data["image"]
    finally:
        en.close()
    en.decode_images(workers=0, augment=False)
    plain = sampler.make_batch(1, 0).data["image"]
    assert torch.equal(first, again) and torch.equal(first, pooled)
    assert first.shape == plain.shape == (4, 3, SIZE, SIZE)
    assert not torch.equal(first, plain) and not torch.equal(first, other)


def test_crop_params_follow_torchvision_random_resized_crop():
    from mmcli.data.encoded import AUGMENT_RATIO, AUGMENT_SCALE, crop_params

    rng = np.random.default_rng(0)
    for w, h in [(64, 48), (48, 64), (300, 40), (33, 33)]:
        for _ in range(50):
            left, top, cw, ch = crop_params(w, h, rng)
            assert left >= 0 and left + cw <= w and top >= 0 and top + ch <= h
            if (w, h) != (300, 40):  # else the fallback: the center crop within the ratios
                share = cw * ch / (w * h)
                assert AUGMENT_SCALE[0] - 0.05 <= share <= AUGMENT_SCALE[1] + 0.05
                assert AUGMENT_RATIO[0] - 0.1 <= cw / ch <= AUGMENT_RATIO[1] + 0.1
    assert crop_params(300, 40, np.random.default_rng(1)) == ((300 - 53) // 2, 0, 53, 40)


def test_the_contract_checks_encoded_columns(tmp_path):
    from mmcli.formats.safetensors_io import save_numpy
    from mmcli.formats.tensorfile import Shard, serialize_shard

    shard = Shard(ids=["a", "b"], items={"image": np.array([0, 1])})
    shard.encoded["image"] = [b"\xff\xd8\xffabc", b"\x89PNGxyz"]
    good = tmp_path / "good.safetensors"
    good.write_bytes(serialize_shard(shard, kind="tensors", specs={"image": {"image_size": 8}}))
    sf = ShardFile(good)
    assert sf.tables == ["image"] and sf.is_encoded("image") and sf.rows("image") == 2
    with pytest.raises(BadInput, match="encoded images"):
        sf.tensor("image")
    sf = ShardFile(good)
    tensors = {n: sf._read(n) for n in sf.tensors}
    meta = dict(sf.metadata)
    broken = dict(tensors)
    broken["image.offsets"] = np.array([0, 9, 6], dtype=np.int64)
    path = tmp_path / "back.safetensors"
    path.write_bytes(save_numpy(broken, meta))
    with pytest.raises(BadInput, match="offsets must run from 0"):
        ShardFile(path).encoded("image")
    no_offsets = {k: v for k, v in tensors.items() if k != "image.offsets"}
    path.write_bytes(save_numpy(no_offsets, meta))
    with pytest.raises(BadInput, match="image.bytes without image.offsets"):
        ShardFile(path)
    both = {**tensors, "image": np.zeros((2, 3, 8, 8), np.uint8)}
    path.write_bytes(save_numpy(both, meta))
    with pytest.raises(BadInput, match="both as pixels and encoded"):
        ShardFile(path)


def test_the_gpu_decoding_path_run_on_the_cpu_is_close_to_the_pil_pixels(data):
    """extract's CUDA path (torchvision.io.decode_jpeg + a tensor resize), on the CPU
    device here (no GPU on the test machines): near, not equal to, the PIL pixels."""
    from mmcli.data.encoded import decode_gpu, is_jpeg

    _, _, out = data
    en, rows = _rows(out["encoded"])
    table = en.tables["image"]
    blobs = table.images.blobs(rows)
    jpeg = [k for k, b in enumerate(blobs) if is_jpeg(b)]
    assert len(jpeg) >= 3
    x = decode_gpu([blobs[k] for k in jpeg], table.images.decoder.transform, torch.device("cpu"))
    y = table.fetch(rows[jpeg])
    diff = (x.int() - y.int()).abs().float()
    assert x.shape == y.shape and x.dtype == torch.uint8
    assert diff.mean() < 2.0, diff.mean()
    with pytest.raises(ValueError, match="JPEG rows"):
        decode_gpu(blobs, table.images.decoder.transform, torch.device("cpu"))
