import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mmcli.data.audio import AudioDecodeError, load_audio
from mmcli.data.image import ImageDecodeError, load_image
from mmcli.data.text import BOS, EOS, OFFSET, PAD, ByteTokenizer, tokenizer_from_spec


def test_byte_tokenizer_layout_and_chinese():
    tok = ByteTokenizer(context_length=12)
    ids, cut = tok.encode("红色")
    assert not cut
    assert ids[0] == BOS and ids[7] == EOS and ids[8:] == [PAD] * 4
    assert bytes(i - OFFSET for i in ids[1:7]).decode() == "红色"
    assert tok.decode(ids) == "红色"


def test_truncation_never_splits_a_character():
    tok = ByteTokenizer(
        context_length=9
    )  # room for 7 bytes: two 3-byte characters fit, not a third
    ids, cut = tok.encode("一二三四")
    assert cut and tok.decode(ids) == "一二" and ids[7] == EOS


def test_whitespace_and_unicode_normalisation():
    tok = ByteTokenizer(context_length=20)
    assert tok.encode("  a \t b\n")[0] == tok.encode("a b")[0]
    assert tok.encode("e\u0301")[0] == tok.encode("\u00e9")[0]  # NFC


def test_batch_and_spec_round_trip():
    tok = ByteTokenizer(context_length=16, lowercase=True)
    arr, truncated = tok.encode_batch(["Hello", "x" * 40])
    assert arr.shape == (2, 16) and arr.dtype == np.int32 and truncated == 1
    assert tokenizer_from_spec(tok.spec()) == tok


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


@pytest.mark.parametrize(
    "mode, ext",
    [
        ("RGB", "jpg"),
        ("RGB", "png"),
        ("RGB", "webp"),
        ("RGB", "bmp"),
        ("L", "png"),
        ("P", "gif"),
        ("RGBA", "png"),
        ("CMYK", "jpg"),
        ("I;16", "png"),
        ("LA", "png"),
    ],
)
def test_every_format_and_mode_decodes_to_rgb(tmp_path, mode, ext):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)).convert(mode)
    out = load_image(_save(img, tmp_path / f"x.{ext}"), size=16)
    assert out.shape == (3, 16, 16) and out.dtype == np.uint8


def test_resize_shorter_side_then_center_crop(tmp_path):
    # 40x20 image: left quarter red, middle half green, right quarter blue
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :10] = (255, 0, 0)
    arr[:, 10:30] = (0, 255, 0)
    arr[:, 30:] = (0, 0, 255)
    out = load_image(_save(Image.fromarray(arr), tmp_path / "x.png"), size=10)
    assert out.shape == (3, 10, 10)
    assert (out[1] > 200).all() and (out[0] < 50).all()  # only the green centre survives


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red, right half blue
    arr[:, 20:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display: red ends up on top
    path = _save(img, tmp_path / "x.jpg", exif=exif, quality=95)
    out = load_image(path, size=20)
    assert out[0, :5].mean() > 200 and out[2, -5:].mean() > 200


def test_transparent_png_is_composited_on_white(tmp_path):
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    out = load_image(_save(img, tmp_path / "x.png"), size=8)
    assert (out == 255).all()


def test_corrupt_images(tmp_path):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = (_save(img, tmp_path / "ok.jpg")).read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.png").write_bytes(b"not an image")
    for name in ("trunc.jpg", "junk.png", "missing.png"):
        with pytest.raises(ImageDecodeError):
            load_image(tmp_path / name, size=16)


def test_audio_downmix_resample_pad_and_crop(tmp_path):
    t = np.arange(8000) / 8000
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t)], axis=1) * 0.5
    sf.write(tmp_path / "a.wav", stereo, 8000)
    wave = load_audio(tmp_path / "a.wav", sample_rate=16000, seconds=2.0)
    assert wave.shape == (32000,) and wave.dtype == np.float32
    assert np.abs(wave[16500:]).max() == 0  # zero padding after the 1 s of sound
    spectrum = np.abs(np.fft.rfft(wave[:16000]))
    assert abs(np.argmax(spectrum) * 16000 / 16000 - 440) <= 2  # pitch survives resampling
    assert load_audio(tmp_path / "a.wav", sample_rate=8000, seconds=0.5).shape == (4000,)


@pytest.mark.parametrize("fmt", ["FLAC", "OGG"])
def test_audio_formats(tmp_path, fmt):
    sf.write(tmp_path / f"a.{fmt.lower()}", np.zeros(1600, np.float32) + 0.1, 16000, format=fmt)
    assert load_audio(tmp_path / f"a.{fmt.lower()}", 16000, 0.1).shape == (1600,)


def test_unreadable_audio(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x00junk")
    with pytest.raises(AudioDecodeError):
        load_audio(tmp_path / "bad.wav")
    with pytest.raises(AudioDecodeError, match="file not found"):
        load_audio(tmp_path / "nope.wav")


def test_the_file_contract_knows_every_tokenizer_and_its_vocabulary():
    from mmcli.data.text import TOKENIZERS
    from mmcli.formats.layout import TOKENIZER_VOCAB

    assert {name: cls.vocab_size for name, cls in TOKENIZERS.items()} == TOKENIZER_VOCAB


def test_like_settings_and_explicit_flags():
    from mmcli.data.image import ImageTransform, image_transform_from_spec, preprocess_image_options

    assert ImageTransform(224).spec() == {  # unchanged: earlier runs resume
        "image_size": 224,
        "resize": "shorter-side bicubic antialiased",
        "crop": "center",
        "layout": "NCHW uint8 RGB",
    }
    assert preprocess_image_options(None) == {"image_size": 224}
    same = preprocess_image_options(None, image_size=64, interpolation="bicubic")
    assert same == {"image_size": 64, "interpolation": "bicubic"}  # still mmcli's own resize
    squash = preprocess_image_options(None, resize_mode="squash")
    assert squash["image_backend"] == "torchvision-pil"  # mmcli's one-pass resize only crops
    timm = {"image_size": 224, "resize_size": 235, "resize_mode": "shortest",
            "interpolation": "bicubic", "backend": "torchvision-pil"}  # fmt: skip
    o = preprocess_image_options(timm, image_size=112, interpolation="bilinear")
    assert o["image_size"] == 112 and o["resize_size"] == 117  # the model's crop fraction kept
    assert o["interpolation"] == "bilinear" and o["image_backend"] == "torchvision-pil"
    t = ImageTransform(112, resize_size=117, interpolation="bilinear", backend="torchvision-pil")
    assert image_transform_from_spec(t.spec()) == t


def test_like_transforms_resize_as_torchvision_does(tmp_path):
    import numpy as np
    import torch
    import torchvision.transforms as T
    from PIL import Image

    from mmcli.data.image import ImageTransform

    rng = np.random.default_rng(0)
    path = tmp_path / "a.png"
    Image.fromarray(rng.integers(0, 255, (45, 70, 3), dtype=np.uint8)).save(path)
    for mode, ref in [
        ("shortest", T.Compose([T.Resize(40, T.InterpolationMode.BICUBIC), T.CenterCrop(32)])),
        ("squash", T.Resize((32, 32), T.InterpolationMode.BICUBIC)),
    ]:
        t = ImageTransform(32, resize_mode=mode, resize_size=40 if mode == "shortest" else None,
                           backend="torchvision-pil")  # fmt: skip
        want = torch.from_numpy(
            np.asarray(ref(Image.open(path).convert("RGB"))).transpose(2, 0, 1).copy()
        )
        assert torch.equal(torch.from_numpy(t(path)), want)
    longest = ImageTransform(32, resize_mode="longest", fill=7, backend="torchvision-pil")(path)
    assert longest.shape == (3, 32, 32) and (longest[:, 0] == 7).all()  # padded rows


@pytest.mark.parametrize(
    "interpolation", ["bicubic", "bilinear", "nearest", "lanczos", "box", "hamming"]
)
def test_pil_transforms_equal_torchvision_and_open_clip_ops(tmp_path, interpolation):
    """The torchvision-pil backend makes PIL's calls without torch (mmcli.data.image.transform_rgb):
    its pixels equal torchvision's and open_clip's own ops on the same PIL image, for every
    interpolation, an odd crop offset, padding (an image smaller than the crop, and
    open_clip's longest-side resize) and an image already at the target size."""
    import torch
    import torchvision.transforms as T
    from open_clip.transform import CenterCropOrPad, ResizeKeepRatio

    from mmcli.data.image import ImageTransform

    mode = T.InterpolationMode(interpolation)
    rng = np.random.default_rng(1)
    cases = []
    for w, h in [(71, 45), (45, 71), (20, 13), (32, 32)]:
        path = tmp_path / f"{w}x{h}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        cases += [
            (path, dict(resize_size=38), T.Compose([T.Resize(38, mode), T.CenterCrop(32)])),
            (path, dict(resize_mode="squash"), T.Resize((32, 32), mode)),
            (path, dict(resize_mode="longest", fill=9),
             T.Compose([ResizeKeepRatio(32, interpolation=mode, longest=1),
                        CenterCropOrPad(32, fill=9)])),
        ]  # fmt: skip
    for path, options, ref in cases:
        t = ImageTransform(32, interpolation=interpolation, backend="torchvision-pil", **options)
        want = np.asarray(ref(Image.open(path).convert("RGB"))).transpose(2, 0, 1)
        got = t(path)
        assert got.shape == (3, 32, 32) and got.dtype == np.uint8
        assert torch.equal(torch.from_numpy(got), torch.from_numpy(want.copy())), (path, options)


def test_pil_transforms_decode_without_importing_torch(tmp_path):
    """A decode worker of a --like open_clip / timm transform needs no torch (its start-up
    would take the CPU from the model's); transformers' needs it (v2 kernels)."""
    import subprocess
    import sys

    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "a.jpg")
    code = (
        "import sys; from mmcli.data.image import ImageTransform as T; "
        "t = T(32, resize_size=36, backend='torchvision-pil'); "
        "x = t(sys.argv[1]); print(x.shape, 'torch' in sys.modules, t.modules, "
        "T(32, backend='hf').modules[0])"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.jpg")], capture_output=True,
                       text=True, check=True)  # fmt: skip
    assert r.stdout.split() == ["(3,", "32,", "32)", "False", "()", "torch"]
