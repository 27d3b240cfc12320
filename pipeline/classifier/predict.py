"""``python -m pipeline.classifier.predict IMAGE...``: top-5 CIFAR-10 classes of any image.

Each image is turned upright as its EXIF orientation says (as image viewers do), converted to RGB and
resized to 32x32 (the network's input). ``--model`` takes a
``model.pt`` written by the train_classifier stage (default) or an MLflow model URI
(``models:/cifar10-classifier/1``, ``runs:/<id>/model``). A missing, corrupt or non-image file ends
the command with one ``error:`` line and exit status 1; nothing is printed for the other images.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from pipeline.errors import run_cli

DEFAULT_MODEL = "data/classifier/model.pt"
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def load_image(path: str | os.PathLike, size: int = 32) -> np.ndarray:
    """RGB uint8 (size, size, 3), upright (``pipeline.images.read_image``), resized to the network's input;
    PipelineError for a missing, unreadable or non-image file."""
    from PIL import Image

    from pipeline.images import read_image

    img = read_image(path)
    if img.shape[:2] != (size, size):
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0))
    return img


def load_model(spec: str):
    """A model.pt path, or an MLflow model URI (needs the tracking server/DB it lives in): the checkpoint
    logged there (``pipeline.tracking_models.logged_checkpoint``), read as weights, never unpickled."""
    from pipeline import tracking_models
    from pipeline.classifier.model import load_classifier

    if tracking_models.is_model_uri(spec):
        with tracking_models.logged_checkpoint(spec, "cifar10-classifier", "a CIFAR-10 classifier") as path:
            return load_classifier(path, source=f"model {spec}")
    return load_classifier(spec)


def top_k(model, images: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
    """Top-k (class, probability) for uint8 (N, 32, 32, 3) images."""
    import torch

    names = list(getattr(model, "label_names", None) or CIFAR10)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    with torch.no_grad():
        probs = model(x).float().softmax(1)
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    return [[(names[i], float(v)) for v, i in zip(vs.tolist(), ix.tolist())] for vs, ix in zip(values, indices)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.classifier.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any size/format Pillow reads)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"model.pt or MLflow model URI (default {DEFAULT_MODEL})")
    parser.add_argument("-k", "--top", type=int, default=5, help="classes to print per image (default 5)")
    args = parser.parse_args(argv)
    def predict() -> None:
        images = np.stack([load_image(p) for p in args.images])
        results = top_k(load_model(args.model), images, args.top)
        for path, top in zip(args.images, results):
            print(path)
            for name, p in top:
                print(f"  {name:<12s} {100 * p:6.2f}%")
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit flush

    try:
        return run_cli(predict)
    except BrokenPipeError:  # `predict ... | head -3`: the reader left; stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it


if __name__ == "__main__":
    sys.exit(main())
