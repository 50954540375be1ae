"""The UNet of the Model contract: shapes, options, padding, median filter, save/load identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.inference import forward_padded, predict_batches
from training.model import (
    SegDepthUNet,
    UNetConfig,
    bundled_model_path,
    load_model,
    median_filter2d,
    pad_to_multiple,
    save_model,
)

SMALL = UNetConfig(base_channels=4, max_channels=16)


def test_contract_shapes_channels_and_size_multiple():
    cfg = UNetConfig(base_channels=16, max_channels=128)
    assert cfg.channels() == [16, 32, 64, 128, 128, 128]  # doubling with a cap, 6 scales
    model = SegDepthUNet(SMALL).eval()
    assert model.size_multiple == 32
    depth, species = model(torch.ones(2, 1, 64, 96))
    assert depth.shape == (2, 11, 64, 96) and species.shape == (2, 3, 64, 96)
    with pytest.raises(ValueError, match="multiple of 32"):
        model(torch.ones(1, 1, 50, 64))


def test_options_transposed_extra_blocks_median():
    cfg = UNetConfig(
        base_channels=4, max_channels=8, upsampling="transposed", extra_blocks=True, median_kernel=4
    )
    model = SegDepthUNet(cfg).eval()
    assert any(isinstance(m, torch.nn.ConvTranspose2d) for m in model.modules())
    depth, _ = model(torch.rand(1, 1, 32, 64) + 0.5)
    assert depth.shape == (1, 11, 32, 64)
    with pytest.raises(ValueError):
        UNetConfig(upsampling="nearest")


def test_median_filter_kernel_4_matches_numpy():
    x = torch.arange(36, dtype=torch.float32).reshape(1, 1, 6, 6) ** 1.5
    out = median_filter2d(x, 4)[0, 0].numpy()
    padded = np.pad(x[0, 0].numpy(), ((1, 2), (1, 2)), mode="edge")
    for r in range(6):
        for c in range(6):
            window = np.sort(padded[r : r + 4, c : c + 4].ravel())
            assert out[r, c] == window[7]  # torch's median of an even count: the lower middle


def test_padding_and_any_size_forward():
    x = torch.rand(1, 1, 37, 70)
    padded, (h, w) = pad_to_multiple(x, 32)
    assert padded.shape[-2:] == (64, 96) and (h, w) == (37, 70)
    assert torch.equal(padded[..., :37, :70], x) and torch.equal(padded[0, 0, 40, :70], x[0, 0, -1])
    depth, species = forward_padded(SegDepthUNet(SMALL).eval(), x)
    assert depth.shape == (1, 11, 37, 70) and species.shape == (1, 3, 37, 70)


def test_saved_model_reloads_to_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = SegDepthUNet(SMALL)
    model.train()
    model(torch.rand(2, 1, 32, 32) + 0.5)  # move batch-norm running stats off their defaults
    model.eval()
    x = torch.rand(2, 1, 64, 64) + 0.5
    meta = save_model(tmp_path / "full.pt", model, {"data_sha256": "abc"}, half=False)
    loaded, meta2 = load_model(tmp_path / "full.pt")
    assert not loaded.training and meta2["model_id"] == meta["model_id"]
    assert meta2["data_sha256"] == "abc" and meta2["config"]["base_channels"] == 4
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0]) and torch.equal(loaded(x)[1], model(x)[1])
        # float16 storage: identical to the model with its weights rounded to float16
        save_model(tmp_path / "half.pt", model)
        half, _ = load_model(tmp_path / "half.pt")
        rounded = SegDepthUNet(SMALL)
        rounded.load_state_dict(
            {
                k: v.half().float() if v.is_floating_point() else v
                for k, v in model.state_dict().items()
            }
        )
        rounded.eval()
        assert torch.equal(half(x)[0], rounded(x)[0])
        again, _ = load_model(tmp_path / "half.pt")
        assert torch.equal(half(x)[0], again(x)[0])
    assert (tmp_path / "half.pt").stat().st_size < (tmp_path / "full.pt").stat().st_size


def test_load_rejects_foreign_files(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a SegDepth model"):
        load_model(tmp_path / "other.pt")


def test_prediction_outputs_are_consistent():
    model = SegDepthUNet(SMALL).eval()
    images = np.random.default_rng(0).uniform(0.5, 1.5, (3, 40, 33)).astype(np.float32)
    parts = list(predict_batches(model, images, batch_size=2))
    assert [sl for sl, _ in parts] == [slice(0, 2), slice(2, 3)]
    p = parts[0][1]
    assert p.depth.dtype == np.uint8 and p.confidence.dtype == np.float32
    assert np.allclose(p.probabilities.sum(axis=1), 1, atol=1e-5)
    assert np.array_equal(p.depth, p.probabilities.argmax(axis=1))
    assert np.allclose(p.confidence, p.probabilities.max(axis=1))


def test_bundled_model_path_and_file():
    path = bundled_model_path()
    assert path.name == "segdepth_base16.pt" and path.parent.name == "models"
    if path.exists():  # shipped once trained
        model, meta = load_model(path)
        assert meta["config"]["base_channels"] == 16 and meta["model_id"]
        assert path.stat().st_size < 8e6
