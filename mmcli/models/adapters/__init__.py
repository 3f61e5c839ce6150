"""Encoders backed by the libraries that define them: open_clip, transformers, timm.

Registered like the built-in encoders (``image/open_clip``, ``text/hf``, ``image/timm``,
...) and spelled ``LIBRARY:NAME`` (``--encoder image=open_clip:ViT-B-32``,
``--encoder text=hf:DIR``, ``--encoder image=timm:resnet50``). Importing this package
imports none of the libraries: each is imported when an encoder is built, and a missing
one is one line naming ``pip install "mmcli[EXTRA]"``. Whole models:
:func:`mmcli.models.pretrained.load_model`.
"""

from mmcli.models.adapters import hf, open_clip, timm  # noqa: F401  (register the adapters)
