"""Video: sampling the expected frames, bad files skipped and listed, the video table, the
frames encoders, and video end to end (fuse-train, eval, retrieve --video)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("av")

from video_files import all_frame_times, frame_numbers, numbered_frames, write_video  # noqa: E402

from mmcli.data.image import ImageTransform  # noqa: E402
from mmcli.data.video import (  # noqa: E402
    VideoDecodeError,
    VideoTransform,
    load_video_audio,
    sample_times,
)


def _nearest(times: list[float], targets: list[float]) -> list[int]:
    """The reference: the index of the frame nearest each target (ties to the earlier)."""
    t = np.asarray(times)
    return [int(np.argmin(np.abs(t - x))) for x in targets]


@pytest.mark.parametrize(
    ("name", "codec", "gop"),
    [
        ("a.mp4", "libx264", 8),
        ("b.webm", "libvpx", 16),
        ("c.mkv", "mpeg4", 16),
        ("d.avi", "mpeg4", 12),
    ],
)
def test_sampled_frames_are_the_nearest_to_each_segment_centre(tmp_path, name, codec, gop):
    """80 frames at 8 fps (10 s, a keyframe every ``gop``): far-apart sample times are
    reached by seeking, and still land on the frame a full decode finds nearest."""
    path = write_video(tmp_path / name, numbered_frames(80), fps=8, codec=codec, gop=gop)
    times = all_frame_times(path)
    assert len(times) == 80
    for frames in (1, 3, 7, 16):
        video = VideoTransform(frames, image=ImageTransform(16))(path)
        assert video.shape == (frames, 3, 16, 16) and video.dtype == np.uint8
        expected = _nearest(times, sample_times(times[0], 10.0, frames, None))
        assert frame_numbers(video) == expected, (frames, codec)
    assert frame_numbers(VideoTransform(3, image=ImageTransform(16))(path)) == [13, 40, 67]


def test_fps_sampling_is_centred_and_clamps_to_the_clip(tmp_path):
    path = write_video(tmp_path / "a.mp4", numbered_frames(16), fps=8)  # 2 s
    four = VideoTransform(4, fps=4.0, image=ImageTransform(16))(path)
    assert frame_numbers(four) == [5, 7, 9, 11]  # 0.625, 0.875, 1.125, 1.375 s
    wide = VideoTransform(6, fps=2.0, image=ImageTransform(16))(path)  # -0.25 .. 2.25 s
    assert frame_numbers(wide) == [0, 2, 6, 10, 14, 15]


def test_a_short_clip_repeats_frames(tmp_path):
    path = write_video(tmp_path / "a.mp4", numbered_frames(3), fps=3)
    video = VideoTransform(6, image=ImageTransform(16))(path)
    assert frame_numbers(video) == [0, 1, 1, 2, 2, 2]  # frames at 0, 1/3, 2/3 s


def test_frames_are_resized_and_cropped_like_images(tmp_path):
    """A frame goes through exactly the image transform (here of the same picture as PNG)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    frame = np.kron(rng.integers(0, 255, (6, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    path = write_video(tmp_path / "a.mkv", [frame] * 4, fps=4, codec="ffv1")
    video = VideoTransform(2, image=ImageTransform(24))(path)
    import av

    with av.open(str(path)) as c:  # the decoded frame (ffv1 in yuv420p is not lossless)
        decoded = next(c.decode(c.streams.video[0])).to_image()
    decoded.save(tmp_path / "frame.png")
    assert np.array_equal(video[0], ImageTransform(24)(tmp_path / "frame.png"))
    assert Image.open(tmp_path / "frame.png").size == (64, 48)


def test_bad_videos_raise_decode_errors(tmp_path):
    good = write_video(tmp_path / "a.mp4", numbered_frames(16), fps=8)
    truncated = tmp_path / "t.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "n.mp4"
    text.write_text("not a video at all\n")
    transform = VideoTransform(4, image=ImageTransform(16))
    for bad in (truncated, text, tmp_path / "missing.mp4"):
        with pytest.raises(VideoDecodeError):
            transform(bad)
    silent = write_video(tmp_path / "s.mp4", numbered_frames(4), fps=4)
    with pytest.raises(VideoDecodeError, match="no audio track"):
        load_video_audio(silent, 16000, 1.0)


def test_the_audio_track(tmp_path):
    """The track decoded, resampled to the asked rate, mono, cropped / padded."""
    sr = 16000
    t = np.arange(sr) / sr
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    path = write_video(tmp_path / "a.mp4", numbered_frames(8), fps=8, audio=tone, sample_rate=sr)
    wave = load_video_audio(path, 8000, 2.0)
    assert wave.shape == (16000,) and wave.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(wave[1000:7000]))
    assert abs(np.argmax(spectrum) * 8000 / 6000 - 440) < 5  # the tone, at the new rate
    assert np.abs(wave[9000:]).max() < 1e-3  # 1 s of sound, then zero padding


# ----------------------------------------------------------------------- preprocess


def _clips(tmp_path: Path, n: int = 4) -> Path:
    folder = tmp_path / "clips"
    folder.mkdir()
    rows = []
    for i in range(n):
        path = write_video(
            folder / f"c{i}.mp4", numbered_frames(16)[i:] + numbered_frames(i), fps=8
        )
        rows.append({"id": f"c{i}", "video": f"clips/{path.name}", "text": f"clip number {i}"})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def test_preprocess_writes_the_video_table_and_lists_bad_files(tmp_path, cli):
    from mmcli.formats.tensorfile import TensorSet

    manifest = _clips(tmp_path)
    (tmp_path / "clips" / "c3.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 broken")  # corrupt
    (tmp_path / "clips" / "c2.mp4").write_bytes(
        (tmp_path / "clips" / "c1.mp4").read_bytes()[:1500]
    )  # truncated
    out = tmp_path / "t"
    r = cli("preprocess", manifest, "-o", out, "--image-size", "16", "--frames", "4")
    assert r.exit_code == 0, r.stderr
    ts = TensorSet([str(out)])
    assert ts.ids() == ["c0", "c1"]
    video = ts.table("video")[0].numpy()
    assert video.shape == (2, 4, 3, 16, 16) and video.dtype == np.uint8
    assert frame_numbers(video[0]) == [2, 6, 10, 14]  # at 0.25, 0.75, 1.25, 1.75 s
    spec = ts.specs["video"]
    assert spec["frames"] == 4 and spec["image_size"] == 16 and spec["fps"] is None
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in errors) == ["c2", "c3"]
    assert all(e["field"] == "video" for e in errors)
    info = cli("info", out)
    assert "video" in info.stdout and "frames=4" in info.stdout


def test_audio_from_video_and_a_video_folder(tmp_path, cli):
    from mmcli.formats.tensorfile import TensorSet

    root = tmp_path / "clips"
    for label in ("up", "down"):
        (root / label).mkdir(parents=True)
        for i in range(2):
            tone = np.sin(np.arange(8000) / 8000 * 2 * np.pi * 300).astype(np.float32) * 0.3
            write_video(root / label / f"{i}.webm", numbered_frames(8), fps=8, codec="libvpx",
                        audio=tone, sample_rate=8000)  # fmt: skip
    out = tmp_path / "t"
    r = cli("preprocess", root, "-o", out, "--image-size", "16", "--frames", "2",
            "--audio-from-video", "--sample-rate", "8000", "--audio-seconds", "1")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert "detected format: videofolder" in r.stderr
    ts = TensorSet([str(out)])
    assert ts.label_names == ["down", "up"] and len(ts.ids()) == 4
    audio = ts.table("audio")[0].float().numpy()
    assert audio.shape == (4, 8000) and np.abs(audio).max() > 0.1


def test_a_csv_video_column(tmp_path, cli):
    write_video(tmp_path / "x.mp4", numbered_frames(8), fps=8)
    (tmp_path / "t.csv").write_text("video,caption\nx.mp4,a clip\nx.mp4,the same clip\n")
    r = cli("preprocess", tmp_path / "t.csv", "-o", tmp_path / "t", "--image-size", "16")
    assert r.exit_code == 0, r.stderr
    assert "1 of 1 items (2 text, 1 video)" in r.stderr


def test_a_parquet_video_column(tmp_path, cli):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    for name in ("a", "b"):
        write_video(tmp_path / f"{name}.mp4", numbered_frames(8), fps=8)
    table = pa.table({"clip_file": ["a.mp4", "b.mp4"], "caption": ["first clip", "second clip"]})
    pq.write_table(table, tmp_path / "t.parquet")
    r = cli("preprocess", tmp_path / "t.parquet", "-o", tmp_path / "t", "--image-size", "16",
            "--video-col", "clip_file", "--frames", "2")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert "2 of 2 items (2 text, 2 video)" in r.stderr


# ------------------------------------------------------------------------- encoders


def test_mean_pooling_ignores_frame_order_and_attention_does_not():
    from mmcli import models

    x = torch.randint(0, 256, (2, 5, 3, 24, 24), dtype=torch.uint8)
    reverse = x.flip(1)
    torch.manual_seed(0)
    mean = models.create("video/frames", image="convnet:width=8").eval()
    torch.manual_seed(0)
    attention = models.create("video/frames", image="convnet:width=8", pool="attention").eval()
    with torch.no_grad():
        torch.testing.assert_close(mean(x), mean(reverse))
        assert not torch.allclose(attention(x), attention(reverse), atol=1e-4)
        frames = mean.image(x.flatten(0, 1)).view(2, 5, -1)
        torch.testing.assert_close(mean(x), frames.mean(1))
        pooled, tokens, mask = attention.forward_tokens(x)
    image_tokens = mean.image.forward_tokens(x[:, 0])[1].shape[1]
    assert tokens.shape == (2, 5 * image_tokens, attention.token_dim) and mask.all()
    torch.testing.assert_close(pooled, attention(x), rtol=1e-5, atol=1e-5)


def test_frames_spec_parsing_and_bad_options():
    from mmcli.errors import BadInput
    from mmcli.models.registry import create, parse_encoder_spec

    assert parse_encoder_spec("frames:convnet:width=16,grid=4:pool=attention", "video") == (
        "frames",
        {"image": "convnet:width=16,grid=4", "pool": "attention"},
    )
    assert parse_encoder_spec("frames:open_clip:ViT-B-32", "video")[1] == {
        "image": "open_clip:ViT-B-32"
    }
    with pytest.raises(BadInput, match="pool must be one of"):
        create("frames", "video", pool="max")
    with pytest.raises(BadInput, match="unknown image encoder"):
        create("frames", "video", image="melcnn")
    enc = create("frames", "video", image="tiny", pool="attention", max_frames=4)
    with pytest.raises(ValueError, match="max_frames=4"):
        enc(torch.zeros(1, 5, 3, 8, 8, dtype=torch.uint8))


def test_an_open_clip_frame_encoder_equals_open_clip_on_each_frame(tmp_path):
    """frames:open_clip:ARCH with pool=mean is the mean of open_clip's encode_image of
    every frame (the CLIP4Clip baseline), through mmcli's own normalisation."""
    pytest.importorskip("open_clip")
    import open_clip
    from pretrained_models import open_clip_model

    from mmcli import models
    from mmcli.models.weights import load_weights

    cfg, weights = open_clip_model(tmp_path)
    enc = models.create("video/frames", image=f"open_clip:{cfg}").eval()
    load_weights(enc, weights)
    ref = open_clip.create_model(str(cfg.stem))
    ref.load_state_dict(__import__("safetensors.torch").torch.load_file(str(weights)))
    ref.eval()
    size = ref.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    x = torch.randint(0, 256, (2, 3, 3, size, size), dtype=torch.uint8)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        frames = ref.encode_image((x.flatten(0, 1).float() / 255 - mean) / std)
        expected = frames.view(2, 3, -1).mean(1)
        got = enc(x)
    cos = torch.nn.functional.cosine_similarity(got, expected)
    assert cos.min() > 0.9999


# ----------------------------------------------------------------------- end to end


def test_toy_videos_train_evaluate_and_answer_video_queries(tmp_path, cli):
    """Toy videos -> shards -> fuse-train (video-text) -> extract -> eval (video as query
    and target) -> retrieve --video (the clip itself ranks first, score 1)."""
    from toyvideo import generate_videos

    manifest = generate_videos(tmp_path / "toy", items=40, seed=0, image_size=(32, 32), frames=8)
    first = json.loads(manifest.read_text().splitlines()[0])
    assert first["video"].endswith(".mp4") and first["motion"] in first["text"][0]
    tensors, run, feats = tmp_path / "t", tmp_path / "run", tmp_path / "f"
    r = cli("preprocess", manifest, "-o", tensors, "--image-size", "32", "--frames", "4",
            "--audio-from-video", "--audio-seconds", "1")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    r = cli("fuse-train", tensors, "-o", run, "--pairs", "video-text,video-audio", "--epochs",
            "1", "--batch-size", "16", "--fusion", "attention")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    from mmcli.formats.checkpoint import read_checkpoint_meta

    config = read_checkpoint_meta(run / "model.safetensors").config
    assert config["encoders"]["video"]["name"] == "frames"
    assert config["encoders"]["video"]["config"]["pool"] == "attention"
    r = cli("extract", tensors, "--model", run / "model.safetensors", "-o", feats)
    assert r.exit_code == 0, r.stderr
    r = cli("eval", feats, "--query", "text", "--target", "video")
    assert r.exit_code == 0, r.stderr
    metrics = json.loads(r.stdout)["metrics"]
    assert 0 <= metrics["video_retrieval_recall@1"] <= 1 and "text_retrieval_recall@1" in metrics
    clip = manifest.parent / first["video"]
    r = cli("retrieve", "--index", feats, "--target", "video", "--video", clip, "-k", "2")
    assert r.exit_code == 0, r.stderr
    hits = json.loads(r.stdout)["hits"]
    assert hits[0]["id"] == first["id"] and hits[0]["score"] > 0.9999
    bad = tmp_path / "bad.mp4"
    bad.write_text("no video here")
    r = cli("retrieve", "--index", feats, "--target", "video", "--video", bad)
    assert r.exit_code == 2 and "cannot open video" in r.stderr and r.stdout == ""


def test_the_gallery_shows_a_video_hit_as_an_animated_gif(tmp_path):
    import base64
    import io
    import re

    from PIL import Image

    from mmcli.search.gallery import gallery_html

    clip = write_video(tmp_path / "a.mp4", numbered_frames(24, size=(64, 48)), fps=8)
    line = {"query": {"video": str(clip)}, "hits": [{"rank": 1, "id": "a", "score": 1.0,
            "item": {"id": "a", "video": str(clip), "text": ["a clip"]}}]}  # fmt: skip
    page = gallery_html([line], target="video")
    gifs = re.findall(r'src="data:image/gif;base64,([^"]+)"', page)
    assert len(gifs) == 2  # the query and the hit
    with Image.open(io.BytesIO(base64.b64decode(gifs[1]))) as gif:
        assert gif.n_frames == 6 and max(gif.size) <= 160
    broken = dict(
        line, hits=[dict(line["hits"][0], item={"id": "a", "video": str(tmp_path / "x.mp4")})]
    )
    assert "unreadable video" in gallery_html([broken], target="video")


def test_toy_clips_come_in_reverse_pairs_that_share_their_frames(tmp_path):
    """A clip's partner (``swap_id``) does the opposite motion in the same split, and the
    frames uniform sampling takes (N dividing T) are the same set for both, in the opposite
    order: a mean over them cannot tell the two apart, the order can."""
    from toyvideo import REVERSE, generate_videos, plan_videos

    clips = plan_videos(9, seed=3)
    paired = [c for c in clips if c["partner"] is not None]
    assert len(paired) == 8 and sum(c["partner"] is None for c in clips) == 1
    for c in paired:
        p = clips[c["partner"]]
        assert p["partner"] is not None and clips[p["partner"]] is c
        assert p["split"] == c["split"] and REVERSE[c["combo"][2]] == p["combo"][2]
        assert c["combo"][:2] == p["combo"][:2] and c["combo"][3] == p["combo"][3]

    manifest = generate_videos(tmp_path / "toy", items=4, seed=1, image_size=(32, 32), frames=16)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    a = rows[0]
    b = next(r for r in rows if r["id"] == a["swap_id"])
    for n in (2, 4, 8):
        t = VideoTransform(n, image=ImageTransform(32))
        va, vb = t(manifest.parent / a["video"]), t(manifest.parent / b["video"])
        same = np.abs(va.astype(int) - vb[::-1].astype(int)).mean()  # H.264's error only
        moved = np.abs(va[0].astype(int) - va[-1].astype(int)).mean()
        assert same < 2.0 and moved > 5 * same, (n, same, moved)


def test_a_rotated_clip_is_turned_upright(tmp_path):
    """A display rotation (phones' portrait video) is applied, like an image's EXIF
    orientation: 90 degrees counterclockwise turns the top-left corner to the bottom-left."""
    import av

    from mmcli.data.video import sampled_frames

    frame = np.full((32, 64, 3), 200, dtype=np.uint8)
    frame[:8, :8] = (255, 0, 0)
    path = tmp_path / "r.mp4"
    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=4)
        v.width, v.height, v.pix_fmt = 64, 32, "yuv420p"
        v.set_display_rotation(90)
        for _ in range(4):
            for p in v.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(p)
        for p in v.encode():
            out.mux(p)
    (im,) = sampled_frames(path, 1)
    a = np.asarray(im)
    assert im.size == (32, 64)  # portrait
    assert a[-4, 4, 0] > 230 and a[-4, 4, 1] < 60  # the red corner, now bottom left
    assert a[4, 4, 1] > 150


def test_webdataset_video_members(tmp_path, cli):
    """A tar of KEY.mp4 + KEY.txt (webdataset's layout): the clips decode from the tar."""
    import tarfile

    tar = tmp_path / "00000.tar"
    with tarfile.open(tar, "w") as t:
        for key in ("a", "b"):
            clip = write_video(tmp_path / f"{key}.mp4", numbered_frames(8), fps=8)
            t.add(clip, arcname=f"{key}.mp4")
            (tmp_path / f"{key}.txt").write_text(f"clip {key}\n")
            t.add(tmp_path / f"{key}.txt", arcname=f"{key}.txt")
    r = cli("preprocess", tar, "-o", tmp_path / "t", "--image-size", "16", "--frames", "4")
    assert r.exit_code == 0, r.stderr
    assert "2 of 2 items (2 text, 2 video)" in r.stderr
