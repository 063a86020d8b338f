"""Kling's model catalogue, limits and price table (reference §5, §6, §8, §13): the one place they live.

The client validates requests against it and the planner (kling_tasks.jobs) prices and checks plans with it,
so a model added here is known to both at once.
"""

from __future__ import annotations

__all__ = [
    "EXTENDABLE_MODELS",
    "I2V_MODELS",
    "IMAGE_SUFFIXES",
    "MASTER_MODELS",
    "MAX_EXTENDED_SECONDS",
    "MAX_IMAGE_BYTES",
    "MAX_SECONDS_PER_EXTENSION",
    "PROMPT_MAX",
    "SOUND_MODES",
    "T2V_MODELS",
    "extension_credits",
    "generation_credits",
]

PROMPT_MAX = 2500  # characters, for prompt and negative_prompt (§5)
MAX_IMAGE_BYTES = 10 * 1024 * 1024  # image2video input, as decoded from base64 (§5.2)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

T2V_MODELS = frozenset(
    {"kling-v1", "kling-v1-6", "kling-v2-master", "kling-v2-1-master", "kling-v2-5-turbo", "kling-v2-6", "kling-v3"}
)
I2V_MODELS = T2V_MODELS | {"kling-v1-5", "kling-v2-1"}
# Master models have no std/pro split: one price per duration (§6, §13).
MASTER_MODELS = frozenset({"kling-v2-master", "kling-v2-1-master"})

# Native audio (`sound: on`, §5.1, §6): kling-v2-6 renders sound in pro mode only; kling-v3 in both.
SOUND_MODES = frozenset({("kling-v2-6", "pro"), ("kling-v3", "std"), ("kling-v3", "pro")})

# video-extend (§8): sources from these models only, 4-5 s per call, the whole video at most 180 s.
EXTENDABLE_MODELS = frozenset({"kling-v1", "kling-v1-5", "kling-v1-6"})
MAX_EXTENDED_SECONDS = 180.0
MAX_SECONDS_PER_EXTENSION = 5.0  # plans are checked against the worst case so they can never overrun

# Units per clip (§13): (std 5 s, std 10 s, pro 5 s, pro 10 s). v3 is priced per second (0.6 / 0.8 per s).
_PRICES: dict[str, tuple[float, float, float, float]] = {
    "kling-v1": (1, 2, 3.5, 7),
    "kling-v1-5": (2, 4, 3.5, 7),
    "kling-v1-6": (2, 4, 3.5, 7),
    "kling-v2-master": (10, 20, 10, 20),
    "kling-v2-1-master": (10, 20, 10, 20),
    "kling-v2-1": (2, 4, 3.5, 7),
    "kling-v2-5-turbo": (1.5, 3, 2.5, 5),
    "kling-v2-6": (1.5, 3, 2.5, 5),
    "kling-v3": (3, 6, 4, 8),
}
# An extension costs a 5 s clip of the source model and mode (§8): (std, pro).
_EXTENSION_PRICES: dict[str, tuple[float, float]] = {
    "kling-v1": (1, 3.5),
    "kling-v1-5": (2, 3.5),
    "kling-v1-6": (2, 3.5),
}


def generation_credits(model_name: str, mode: str, duration: str) -> float:
    """Units of one text2video/image2video clip."""
    std5, std10, pro5, pro10 = _PRICES[model_name]
    if mode == "pro" and model_name not in MASTER_MODELS:
        return pro5 if duration == "5" else pro10
    return std5 if duration == "5" else std10


def extension_credits(model_name: str, mode: str) -> float:
    """Units of one video-extend call on a video made by `model_name` in `mode`."""
    std, pro = _EXTENSION_PRICES[model_name]
    return pro if mode == "pro" else std
