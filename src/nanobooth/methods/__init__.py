"""Training methods behind one interface (base.Method); `METHODS` is keyed by the config's `method` value."""

from .base import Method
from .dora import DoRA
from .full import Full
from .loha import LoHa
from .lokr import LoKr
from .lora import LoRA
from .textual_inversion import TextualInversion

METHODS: dict[str, type[Method]] = {"full": Full, "lora": LoRA, "dora": DoRA, "lokr": LoKr, "loha": LoHa,
                                  "textual_inversion": TextualInversion}

__all__ = ["METHODS", "Method", "Full", "LoRA", "DoRA", "LoKr", "LoHa", "TextualInversion"]
