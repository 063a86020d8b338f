"""What the emulated Kling accepts and charges, from the API reference (§5, §6, §7, §8, §13).

Written independently of the client's tables on purpose: the emulator checks the client.
"""

from __future__ import annotations

KINDS = ("text2video", "image2video", "video-extend")

TEXT2VIDEO_MODELS = {"kling-v1", "kling-v1-6", "kling-v2-master", "kling-v2-1-master", "kling-v2-5-turbo",
                     "kling-v2-6", "kling-v3"}
IMAGE2VIDEO_MODELS = TEXT2VIDEO_MODELS | {"kling-v1-5", "kling-v2-1"}
ALL_MODELS = IMAGE2VIDEO_MODELS
EXTENDABLE_MODELS = {"kling-v1", "kling-v1-5", "kling-v1-6"}
ASPECT_RATIOS = {"16:9", "9:16", "1:1"}
SOUND = {("kling-v2-6", "pro"), ("kling-v3", "std"), ("kling-v3", "pro")}  # (model, mode) that render audio
PROMPT_LIMIT = 2500
MAX_TOTAL_SECONDS = 180.0

# Capability map (reference §6): the (mode, duration) combinations that accept an option. A model missing from
# a table has no documented support; None means the reference says nothing either way, so it is accepted.
CAMERA_TYPES = {"simple", "down_back", "forward_up", "right_turn_forward", "left_turn_forward"}
CAMERA_AXES = ("horizontal", "vertical", "pan", "tilt", "roll", "zoom")
T2V_CAMERA = {"kling-v1": {("std", "5")}}
I2V_CAMERA = {"kling-v1-5": {("pro", "5")}}  # `simple` only
_PRO_5_10 = {("pro", "5"), ("pro", "10")}
I2V_TAIL: dict[str, set[tuple[str, str]] | None] = {
    "kling-v1": {("std", "5"), ("pro", "5")}, "kling-v1-5": _PRO_5_10, "kling-v1-6": _PRO_5_10,
    "kling-v2-1": _PRO_5_10, "kling-v2-5-turbo": _PRO_5_10, "kling-v2-6": None, "kling-v3": None,
}

# Typical latencies in seconds (reference §7), before --time-scale.
LATENCY = {"text2video": 319.0, "image2video": 164.0, "video-extend": 320.0}
QUEUED_SHARE = 0.1  # part of the latency a task spends in `submitted`

# Units per clip: (std 5 s, std 10 s, pro 5 s, pro 10 s); v3 is priced per second.
_CLIP_PRICES = {
    "kling-v1": (1, 2, 3.5, 7), "kling-v1-5": (2, 4, 3.5, 7), "kling-v1-6": (2, 4, 3.5, 7),
    "kling-v2-master": (10, 20, 10, 20), "kling-v2-1-master": (10, 20, 10, 20), "kling-v2-1": (2, 4, 3.5, 7),
    "kling-v2-5-turbo": (1.5, 3, 2.5, 5), "kling-v2-6": (1.5, 3, 2.5, 5),
}
_V3_PER_SECOND = {"std": 0.6, "pro": 0.8}
_EXTENSION_PRICES = {"kling-v1": (1, 3.5), "kling-v1-5": (2, 3.5), "kling-v1-6": (2, 3.5)}


def durations_for(model: str) -> set[str]:
    return {str(s) for s in range(3, 16)} if model == "kling-v3" else {"5", "10"}


def generation_price(model: str, mode: str, duration: str) -> float:
    if model == "kling-v3":
        return round(_V3_PER_SECOND[mode] * int(duration), 3)
    std5, std10, pro5, pro10 = _CLIP_PRICES[model]
    if mode == "pro":
        return pro5 if duration == "5" else pro10
    return std5 if duration == "5" else std10


def extension_price(model: str, mode: str) -> float:
    std, pro = _EXTENSION_PRICES[model]
    return pro if mode == "pro" else std
