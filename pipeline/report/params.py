"""params.yaml section ``report``: what the generated report checks and shows."""

from pydantic import Field

from pipeline.schema import Section


class ReportParams(Section):
    title: str = "RNN image compression and CIFAR-10 classification: reproduction report"  # HTML/MD title
    claim_accuracy: float = Field(0.90, gt=0, le=1)  # coursework claim: classifier test accuracy
    claim_jpeg_below_bpp: float = Field(0.4, gt=0)  # coursework claim: RNN beats JPEG below this bpp
    claim_behind: list[str] = ["webp", "jpeg2000"]  # coursework claim: RNN is behind these codecs
    claim_grid: int = Field(64, ge=2)  # bpp grid points on which curves are compared for the claims
    mlflow_runs: bool = True  # look the stages' MLflow runs up (ids, durations) for the provenance
