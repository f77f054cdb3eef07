"""Domain mixers: one module per method, all registered in ``mixlab.mixers.base.MIXERS``."""

from mixlab.mixers import (  # noqa: F401 - importing a module registers its mixers
    aioli,
    dga,
    doge,
    doremi,
    importance,
    odm,
    skillit,
    static,
)
from mixlab.mixers.base import MIXERS, Mixer, MixerContext, Plan, Signals, build_mixer, register

__all__ = ["MIXERS", "Mixer", "MixerContext", "Plan", "Signals", "build_mixer", "register"]
