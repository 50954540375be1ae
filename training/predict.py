"""``segdepth predict``: depth, confidence and species maps for every image of an HDF5 file."""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from streamer.domain import N_DEPTHS, pixel_size_mismatch
from training.inference import predict_batches
from training.model import bundled_model_path, load_model

log = logging.getLogger(__name__)


def predict_file(
    input_path: str | Path,
    output_path: str | Path,
    model_path: str | Path | None = None,
    probabilities: bool = False,
    batch_size: int = 4,
    temperature: float | None = None,
    tta: bool = False,
) -> int:
    """Write `depth`, `confidence`, `species` (and `probabilities`) for IN's `images` to OUT;
    returns the number of images. ``temperature`` None: the model's fitted value (meta), else 1;
    ``tta``: average over the 8 flips and quarter turns."""
    model_path = Path(model_path) if model_path else bundled_model_path()
    if not model_path.exists():
        raise FileNotFoundError(f"model file {model_path} does not exist")
    model, meta = load_model(model_path)
    if temperature is None:
        temperature = float(meta.get("temperature", 1.0))
    try:
        fin_file = h5py.File(input_path, "r")
    except OSError as exc:
        raise ValueError(
            f"{input_path} is not an HDF5 file ({exc}): give the images file of `segdepth simulate`"
        ) from exc
    with fin_file as fin:
        if "images" not in fin or fin["images"].ndim != 3:
            raise ValueError(f"{input_path}: needs an `images` dataset of shape (N, H, W)")
        images = fin["images"]
        n, h, w = images.shape
        pixel_size = fin.attrs.get("pixel_size_pm")
        trained = meta.get("pixel_size_pm")
        if pixel_size is None:
            log.warning("%s has no pixel_size_pm attribute; assuming the model's", input_path)
        elif trained and pixel_size_mismatch(float(pixel_size), float(trained)):
            log.warning(
                "input pixel size %.2f pm differs from the model's %.2f pm: resample "
                "the images for reliable depths",
                float(pixel_size),
                float(trained),
            )
        with h5py.File(output_path, "w") as fout:
            chunk = (1, h, w)
            depth = fout.create_dataset("depth", (n, h, w), "u1", chunks=chunk)
            conf = fout.create_dataset("confidence", (n, h, w), "f4", chunks=chunk)
            species = fout.create_dataset("species", (n, h, w), "u1", chunks=chunk)
            probs = (
                fout.create_dataset(
                    "probabilities", (n, N_DEPTHS, h, w), "f4", chunks=(1, N_DEPTHS, h, w)
                )
                if probabilities
                else None
            )
            depth.attrs["units"] = "atoms (argmax, eq. 4)"
            conf.attrs["units"] = "probability of the estimated depth (eq. 5)"
            species.attrs["units"] = "0 background, 1 Ce, 2 O"
            fout.attrs.update(
                {
                    "model_id": meta.get("model_id", ""),
                    "model_path": str(model_path),
                    "temperature": temperature,
                    "source": str(input_path),
                    "test_time_augmentation": tta,
                }
            )
            if pixel_size is not None:
                fout.attrs["pixel_size_pm"] = float(pixel_size)
            with tqdm(total=n, unit="img", desc="predict") as bar:
                for start in range(0, n, batch_size):
                    block = np.asarray(images[start : start + batch_size], np.float32)
                    for sl, p in predict_batches(model, block, batch_size, temperature, tta=tta):
                        out = slice(start + sl.start, start + sl.stop)
                        depth[out], conf[out], species[out] = p.depth, p.confidence, p.species
                        if probs is not None:
                            probs[out] = p.probabilities
                    bar.update(len(block))
    return n
