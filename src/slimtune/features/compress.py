"""The ``compress`` recipe section: compression during fine-tuning (quantisation-aware training
for ``slimtune export --int8``; the machinery: :mod:`slimtune.compress.quantize`)."""

from __future__ import annotations

from pydantic import Field

from slimtune.compress.qat import QATConfig, QATHook
from slimtune.core.features import Feature, register_feature
from slimtune.core.hooks import Hook
from slimtune.errors import SlimtuneError
from slimtune.methods.base import all_methods


@register_feature
class CompressSection(Feature):
    """Compression during fine-tuning. ``qat``: quantisation-aware training for int8 export."""

    section = "compress"
    refuses_restructuring = "would replace the fake-quantised layers mid-run"

    qat: QATConfig = Field(description="fake-quantise Linear weights (int8 per channel) and inputs while fine-tuning, then `slimtune export --int8`; `qat: {}` takes the defaults")

    def check_methods(self, delta) -> None:
        """QAT trains for ``slimtune export --int8``, which needs the delta merged into plain
        Linears: a method that cannot merge is refused now, not after training."""
        super().check_methods(delta)
        for method in delta.methods:
            if not (method.mergeable or method.in_place):
                usable = sorted(n for n, cls in all_methods().items() if cls.mergeable or cls.in_place)
                raise SlimtuneError(
                    f"compress.qat: method '{method.name}' cannot be merged into plain Linears, which `slimtune export --int8` "
                    f"needs, so QAT would train for an export that is refused; QAT works with {', '.join(usable)}"
                )

    def build_hook(self, *, recipe, model, delta, task, models=None) -> Hook:
        return QATHook(self.qat)
