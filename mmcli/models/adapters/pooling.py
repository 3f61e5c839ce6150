"""sentence-transformers' pooling of token states, for ``text=hf:DIR`` sentence encoders.

modes = poolings("auto", json.load(open("1_Pooling/config.json")))   # ["mean"]
pooled = pool(states, attention_mask, modes)                          # [B, H * len(modes)]
"""

from __future__ import annotations

from typing import Any

import torch

from mmcli.errors import BadInput

#: sentence-transformers' 1_Pooling/config.json keys, in the order it concatenates them
POOLING_KEYS = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}
POOLINGS = tuple(m for m in POOLING_KEYS if m != "weightedmean")  # implemented here


def poolings(choice: str, cfg: dict[str, Any]) -> list[str]:
    """The pooling modes: ``choice``, else those of ``1_Pooling/config.json`` (legacy
    ``pooling_mode_*`` flags or sentence-transformers 5's ``pooling_mode``), else mean."""
    if choice != "auto":
        return [choice]
    if "pooling_mode" in cfg:
        given = cfg["pooling_mode"]
        modes = [given] if isinstance(given, str) else list(given)
        modes = [m.replace("mean_sqrt_len_tokens", "mean_sqrt_len") for m in modes]
    else:
        modes = [m for m, key in POOLING_KEYS.items() if cfg.get(key)]
    unknown = [m for m in modes if m not in POOLINGS]
    if unknown:
        raise BadInput(
            f"1_Pooling: {unknown[0]} pooling is not supported", hint="pass hf:DIR,pooling=mean"
        )
    return modes or ["mean"]  # sentence-transformers' default for a plain model


def pool(states: torch.Tensor, mask: torch.Tensor, modes: list[str]) -> torch.Tensor:
    """sentence-transformers' pooling of token states [B, L, H] -> [B, H * len(modes)]."""
    m = mask.unsqueeze(-1).to(states.dtype)  # (B, L, 1)
    count = m.sum(1).clamp_min(1e-9)
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(states[:, 0])
        elif mode == "mean":
            out.append((states * m).sum(1) / count)
        elif mode == "mean_sqrt_len":
            out.append((states * m).sum(1) / count.sqrt())
        elif mode == "max":
            out.append(states.masked_fill(m == 0, float("-inf")).amax(1))
        else:  # lasttoken: the last valid position
            last = mask.long().sum(1).clamp_min(1) - 1
            out.append(states[torch.arange(states.shape[0], device=states.device), last])
    return torch.cat(out, dim=-1)
