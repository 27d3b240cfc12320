"""params.yaml section ``train_compressor`` (filled in by the codec issue)."""

from pipeline.schema import Section


class TrainCompressorParams(Section):
    pass
