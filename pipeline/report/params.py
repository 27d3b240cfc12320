"""params.yaml section ``report``: what the generated report checks and shows."""

from pydantic import Field, field_validator

from pipeline.evaluation.specs import SPECS
from pipeline.schema import Section, Source


class ReportParams(Section):
    title: str = "RNN image compression and CIFAR-10 classification: reproduction report"  # HTML/MD title
    claim_accuracy: float = Field(0.90, gt=0, le=1)  # coursework claim: classifier test accuracy
    claim_jpeg_below_bpp: float = Field(0.4, gt=0)  # coursework claim: RNN beats JPEG below this bpp
    claim_behind: list[str] = ["webp", "jpeg2000"]  # coursework claim: RNN is behind these codecs
    claim_grid: int = Field(64, ge=2)  # bpp grid points on which curves are compared for the claims
    # the record of the coursework recipe's 300-epoch run (python -m tools.release_classifier): its claim, Figures
    # 1.1 and 1.2; scored against data/raw/cifar-10-batches-py's test labels. null: no such section
    coursework_run: Source | None = "models/coursework-run.json"
    mlflow_runs: bool = True  # look the stages' MLflow runs up (ids, durations) for the provenance

    @field_validator("claim_behind")
    @classmethod
    def _known_codecs(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in SPECS]
        if unknown:
            raise ValueError(f"claim_behind: {', '.join(unknown)} is not a codec ({', '.join(SPECS)})")
        return names


#: the params.yaml sections this module defines: name -> schema (pipeline.config finds it: pipeline/stage.py)
PARAMS_SECTIONS = {"report": ReportParams}
