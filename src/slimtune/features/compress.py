"""The ``compress`` recipe section: compression during fine-tuning (quantisation-aware training
for ``slimtune export --int8``; the machinery: :mod:`slimtune.compress.quantize`)."""

from __future__ import annotations

from pydantic import Field

from slimtune.compress.qat import QATConfig, QATHook
from slimtune.core.features import Feature, register_feature
from slimtune.core.hooks import Hook


@register_feature
class CompressSection(Feature):
    """Compression during fine-tuning. ``qat``: quantisation-aware training for int8 export."""

    section = "compress"

    qat: QATConfig = Field(description="fake-quantise Linear weights (int8 per channel) and inputs while fine-tuning, then `slimtune export --int8`; `qat: {}` takes the defaults")

    def build_hook(self, *, recipe, model, delta, task) -> Hook:
        return QATHook(self.qat)
