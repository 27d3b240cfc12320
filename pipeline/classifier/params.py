"""params.yaml section ``train_classifier`` (filled in by the classifier issue)."""

from pipeline.schema import Section


class TrainClassifierParams(Section):
    pass
