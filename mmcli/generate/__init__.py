"""Generation from the joint space: captions (image) and transcripts (audio).

:mod:`mmcli.generate.search` decodes a :class:`~mmcli.models.decoder.CaptionDecoder`
(greedy, beam search, KV cache); :mod:`mmcli.generate.captioner` is ``mmcli caption``
over tensor shards and files.
"""

from mmcli.generate.captioner import Captioner, parse_source_line
from mmcli.generate.search import DecodeOptions, Generated, beam_search, generate, greedy

__all__ = [
    "Captioner",
    "DecodeOptions",
    "Generated",
    "beam_search",
    "generate",
    "greedy",
    "parse_source_line",
]
