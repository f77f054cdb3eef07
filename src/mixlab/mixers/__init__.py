"""Domain mixers: one module per method, all registered in ``mixlab.mixers.base.MIXERS``."""

from mixlab.mixers import static  # noqa: F401 - registers the static mixers
from mixlab.mixers.base import MIXERS, Mixer, MixerContext, Plan, Signals, build_mixer, register

__all__ = ["MIXERS", "Mixer", "MixerContext", "Plan", "Signals", "build_mixer", "register"]
