"""params.yaml section ``evaluate`` (filled in by the evaluation issue)."""

from pipeline.schema import Section


class EvaluateParams(Section):
    pass
