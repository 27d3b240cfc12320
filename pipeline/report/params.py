"""params.yaml section ``report`` (filled in by the evaluation issue)."""

from pipeline.schema import Section


class ReportParams(Section):
    pass
