"""Pure-function models and their size presets."""

from lmsys.models import llama
from lmsys.models.presets import PRESETS

__all__ = ["llama", "PRESETS"]
