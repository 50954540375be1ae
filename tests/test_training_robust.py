"""Training from exit-wave libraries, seed bookkeeping, the corrected and column-level metrics,
per-sample doses and the robustness suite (tiny, real abTEM multislice)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace

import h5py
import numpy as np
import pytest
import torch

from sim_source.microscope import OpticsDraw, intensity
from sim_source.noise import add_poisson_noise
from sim_source.particle import ParticleConfig
from sim_source.structure import MAX_ATOMS, ColumnTable, slice_thicknesses_A, to_atoms
from sim_source.wave_library import (
    LibraryConfig,
    draw_tilt,
    exit_wave,
    is_library,
    simulate_wave,
    tilt_shift_A,
    write_band_limited,
    write_library,
)
from training.device_render import DeviceBatches, DeviceRenderer
from training.inference import turn_scores
from training.labels import TargetConfig
from training.library_data import (
    MicroscopeDataset,
    RenderConfig,
    collate_views,
    load_library,
    render_set,
)
from training.metrics import ColumnMetrics, DepthMetrics, centre_mask
from training.model import load_model
from training.robustness import check_disjoint, roc_auc, suite_files, suite_rows
from training.train import Dist, TrainConfig, _loader, train


@pytest.fixture(scope="module")
def libraries(tmp_path_factory):
    """Two tiny libraries (6.8 Å fields) of different seeds."""
    root = tmp_path_factory.mktemp("libs")
    paths = []
    for name, seed, count in (("train", 21, 3), ("val", 22, 2)):
        path = root / f"{name}.h5"
        write_library(path, LibraryConfig(count=count, gpts=256, seed=seed), progress=False)
        paths.append(path)
    return paths


def test_library_file_records_its_seed_and_resumes_bit_identically(libraries, tmp_path):
    path, _ = libraries
    assert is_library(path)
    cfg = LibraryConfig(count=3, gpts=256, seed=21)
    partial = tmp_path / "partial.h5"
    with pytest.raises(KeyboardInterrupt):  # as Ctrl-C after the second structure
        write_library(partial, cfg, progress=False, interrupted=iter([False, True]).__next__)
    with h5py.File(partial) as f:
        assert int(f.attrs["n_complete"]) == 2
    write_library(partial, cfg, resume=True, progress=False)
    with h5py.File(partial) as a, h5py.File(path) as b:
        assert int(a.attrs["seed"]) == 21
        np.testing.assert_array_equal(a["waves"][:], b["waves"][:])
        np.testing.assert_array_equal(a["columns"][:], b["columns"][:])


def _shift_A(wave: np.ndarray, moved: np.ndarray, sampling_A: float) -> np.ndarray:
    """(x, y) Å by which ``moved``'s scattering |ψ − 1| is shifted against ``wave``'s: the
    peak of their periodic cross-correlation, to the nearest sample."""
    a, b = np.abs(wave - 1), np.abs(moved - 1)
    xc = np.fft.ifft2(np.fft.fft2(b) * np.conj(np.fft.fft2(a))).real
    n = xc.shape[0]
    peak = np.array(np.unravel_index(np.argmax(xc), xc.shape))
    return np.where(peak > n // 2, peak - n, peak) * sampling_A


def test_specimen_tilt_moves_the_images_and_the_labels_alike():
    """A tilted specimen's exit wave (abTEM's tilted propagation) is shifted against the
    untilted one by what the library's labels are shifted by (atom-weighted over its columns);
    a tilt not given to abTEM, labels left in place or a wrong sign each break it."""
    particle = ParticleConfig(carbon_probability=0.0, thermal=False)
    untilted = simulate_wave(
        LibraryConfig(count=1, gpts=384, seed=5, particle=particle, tilt_mrad=(0.0, 0.0)), 0
    )
    tilted = simulate_wave(
        LibraryConfig(count=1, gpts=384, seed=5, particle=particle, tilt_mrad=(40.0, 40.0)), 0
    )
    tilt = np.asarray(tilted.params["tilt_mrad"])
    assert np.hypot(*tilt) == pytest.approx(40.0) and untilted.params["tilt_mrad"] == [0.0, 0.0]
    measured = _shift_A(untilted.wave, tilted.wave, LibraryConfig().sampling_A)
    cols_a, cols_b = untilted.columns, tilted.columns
    atoms = cols_a["atoms"].astype(np.float64)
    labels = np.array(
        [np.sum((cols_b[k] - cols_a[k]) * atoms) / atoms.sum() for k in ("x_A", "y_A")]
    )
    assert np.hypot(*labels) > 0.3  # Å: tens of pixels, far above the check's resolution
    np.testing.assert_allclose(measured, labels, atol=0.06)  # about 2 of 2.65 pm pixels
    np.testing.assert_array_equal(cols_b["atoms"], cols_a["atoms"])


def test_tilt_shift_is_the_propagation_below_each_column():
    """Columns of a few atoms near the entrance face of a 10-cell box are seen shifted by
    tan(tilt)·(thickness − depth), most of the box's tan(tilt)·thickness (the depth itself, or
    half the box, would be far off): abTEM's tilted exit wave against the untilted one."""
    cells = np.zeros((2, MAX_ATOMS), bool)
    cells[:, :3] = True  # three atoms from the entrance face down
    table = ColumnTable(
        np.array([2.5, 6.5]), np.array([3.0, 7.0]), np.array([1, 1]), np.zeros(2), cells
    )
    cfg = LibraryConfig(gpts=384)
    atoms = to_atoms(table, cfg.field_A, cfg.field_A)
    slices = slice_thicknesses_A()
    tilt = np.array([30.0, -20.0])
    waves = [exit_wave(atoms, slices, cfg, t) for t in (np.zeros(2), tilt)]
    measured = _shift_A(*waves, cfg.sampling_A)
    expected = tilt_shift_A(table, tilt, sum(slices)).mean(axis=1)
    assert np.hypot(*expected) > 0.6 * np.hypot(*tilt) / 1e3 * sum(slices)
    np.testing.assert_allclose(measured, expected, atol=0.06)


def test_tilt_draw_and_library_config():
    """Tilts fill the magnitude range in every direction; a range of (0, 0) keeps a library's
    config as written before tilt existed (the suite's files stay valid); a bad range is
    refused."""
    cfg = LibraryConfig(tilt_mrad=(2.0, 5.0))
    rng = np.random.default_rng(0)
    tilts = np.array([draw_tilt(rng, cfg) for _ in range(2000)])
    magnitude = np.hypot(*tilts.T)
    assert magnitude.min() >= 2.0 and magnitude.max() <= 5.0
    assert np.histogram(np.arctan2(*tilts.T[::-1]), bins=4, range=(-np.pi, np.pi))[0].min() > 400
    assert "tilt_mrad" not in json.loads(LibraryConfig(tilt_mrad=(0.0, 0.0)).to_json())
    assert json.loads(LibraryConfig().to_json())["tilt_mrad"] == [0.0, 5.0]
    with pytest.raises(ValueError, match="tilt_mrad"):
        LibraryConfig(tilt_mrad=(3.0, 1.0))


def test_band_limited_copy_renders_the_images_of_the_full_library(
    libraries, tmp_path, segdepth_cmd
):
    """`segdepth band-limit` keeps 1/40 of the bytes; images through any aperture or focal
    spread that cuts below the limit match the full waves to float16 precision; only a
    coherent microscope without aperture sees the cut."""
    small = tmp_path / "band.h5"
    subprocess.run(
        [*segdepth_cmd, "band-limit", str(libraries[0]), str(small), "--k-max-inv-A", "3"],
        check=True,
        capture_output=True,
    )
    with h5py.File(small) as f:
        assert "waves" not in f and f["spectrum"].shape == (3, 41, 41, 2)  # 2·⌊3·6.78⌋ + 1
        assert float(f.attrs["band_limit_inv_A"]) == 3.0
    full, band = load_library(libraries[0]), load_library(small)
    assert band.waves.shape == full.waves.shape and band.sampling_A == full.sampling_A
    for a, b in zip(full.tables, band.tables):
        np.testing.assert_array_equal(a.x_A, b.x_A)
        np.testing.assert_array_equal(a.n_atoms, b.n_atoms)
    for optics in (
        OpticsDraw(aperture_mrad=40.0),
        OpticsDraw(focal_spread_A=30.0, aperture_mrad=None),
    ):
        for s in range(3):
            diff = intensity(full.waves[s], full.sampling_A, optics) - intensity(
                band.waves[s], band.sampling_A, optics
            )
            assert np.abs(diff).max() < 3e-3
    coherent = OpticsDraw(focal_spread_A=0.0, aperture_mrad=None)
    diff = intensity(full.waves[0], full.sampling_A, coherent) - intensity(
        band.waves[0], band.sampling_A, coherent
    )
    assert np.abs(diff).max() > 0.05
    with pytest.raises(ValueError, match="no full waves"):
        write_band_limited(small, tmp_path / "again.h5", 3.0)
    with pytest.raises(ValueError, match="Nyquist"):
        write_band_limited(libraries[0], tmp_path / "wide.h5", 20.0)


def test_render_workers_deliver_the_same_batches(libraries, tmp_path):
    """Samples are seeded by (seed, epoch, structure): worker processes change nothing."""
    batches = []
    for workers in (1, 2):
        cfg = TrainConfig(
            data=str(libraries[0]),
            out=str(tmp_path),
            crop=32,
            batch_size=4,
            views_per_wave=2,
            render_workers=workers,
        )
        ds = MicroscopeDataset(load_library(libraries[0]), cfg.render, TargetConfig(), 0)
        loader, _ = _loader(ds, cfg, Dist())
        assert loader.num_workers == workers
        batches.append([b[0] for b in loader])
    assert len(batches[0]) == len(batches[1]) == 1  # 3 structures, 2 per batch, last dropped
    for a, b in zip(*batches):
        torch.testing.assert_close(a, b)


def tiny_library_run(libraries, tmp_path, **settings) -> TrainConfig:
    """A one-epoch run on the tiny training and validation libraries, 32-px crops, 2 views."""
    return TrainConfig(
        data=str(libraries[0]),
        val=str(libraries[1]),
        out=str(tmp_path / "run"),
        crop=32,
        views_per_wave=2,
        val_count=2,
        epochs=1,
        threads=1,
        **settings,
    )


def test_rendering_on_the_device_equals_the_cpu_path(libraries, tmp_path):
    """--render-on-device (torch, here on the CPU) renders what the DataLoader path renders:
    same draws, images to float32 rounding, identical labels, species, weights and doses; its
    batches take the structures in a shuffled order, each once per epoch; a run trains with it."""
    library = load_library(libraries[0])
    cfg = tiny_library_run(libraries, tmp_path, batch_size=2)
    cpu = MicroscopeDataset(library, cfg.render, TargetConfig(), 0)
    device = DeviceRenderer(library, cfg.render, TargetConfig(), 0, torch.device("cpu"))
    for epoch in (0, 1):
        cpu.set_epoch(epoch)
        device.set_epoch(epoch)
        for i in range(len(library)):
            a, b = cpu[i], device.item(i)
            torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=0)
            for k in (1, 2, 4):
                assert torch.equal(a[k], b[k])
            torch.testing.assert_close(a[3], b[3], atol=1e-6, rtol=0)
    batches = _loader(device, cfg, Dist())[0]
    assert isinstance(batches, DeviceBatches) and len(batches) == len(library)
    batches.generator.manual_seed(5)
    order = torch.randperm(len(library), generator=torch.Generator().manual_seed(5)).tolist()
    for i, batch in zip(order, batches):
        assert torch.equal(batch[1], device.item(i)[1])
    assert sorted(order) == list(range(len(library)))
    # fewer structures than a batch holds: one short batch, as the DataLoader path gives
    big = replace(cfg, batch_size=8)
    short = [_loader(ds, big, Dist())[0] for ds in (cpu, device)]
    assert len(short[0]) == len(short[1]) == 1
    assert [len(b[1]) for b in short[1]] == [2 * len(library)]
    model = train(replace(cfg, render_on_device=True), progress=False)
    assert load_model(model)[1]["train_config"]["render_on_device"] is True
    with pytest.raises(ValueError, match="ring_width_pm 0"):
        DeviceRenderer(
            library, cfg.render, TargetConfig(ring_width_pm=16.0), 0, torch.device("cpu")
        )


def test_every_epoch_draws_new_microscopes(libraries):
    library = load_library(libraries[0])
    ds = MicroscopeDataset(library, RenderConfig(crop=32, views_per_wave=2), TargetConfig(), 0)
    first = ds[0]
    assert first[0].shape == (2, 1, 32, 32) and first[4].shape == (2,)
    assert ((first[4] >= 0.5) & (first[4] <= 10)).all()
    again = ds[0]
    torch.testing.assert_close(first[0], again[0])  # reproducible within an epoch
    ds.set_epoch(1)
    assert not torch.allclose(first[0], ds[0][0])
    batch = collate_views([ds[0], ds[1]])
    assert batch[0].shape == (4, 1, 32, 32) and batch[1].shape == (4, 32, 32)


def test_per_sample_dose_noise():
    clean = torch.ones(2, 1, 64, 64)
    noisy = add_poisson_noise(clean, torch.tensor([0.5, 50.0]), torch.Generator().manual_seed(0))
    assert abs(float(noisy[0].mean()) - 1) < 0.1 and abs(float(noisy[1].mean()) - 1) < 0.02
    assert float(noisy[0].var()) > 20 * float(noisy[1].var())  # variance 1/λ per image
    with pytest.raises(ValueError):
        add_poisson_noise(clean, torch.tensor([1.0, 0.0]), torch.Generator())


def test_library_training_records_seeds_and_evaluation_refuses_them(libraries, tmp_path):
    train_path, val_path = libraries
    cfg = tiny_library_run(libraries, tmp_path, batch_size=4, dose_range=(0.5, 10.0))
    _, meta = load_model(train(cfg, progress=False))
    assert [d["seed"] for d in meta["data_files"]] == [21, 22]
    assert meta["dose_range"] == [0.5, 10.0]
    with pytest.raises(ValueError, match="shares seed 22"):
        check_disjoint(meta, [val_path])
    other = tmp_path / "other.h5"
    write_library(other, LibraryConfig(count=1, gpts=256, seed=23), progress=False)
    check_disjoint(meta, [other])  # a file of its own seed passes
    same_seed = replace(cfg, val=str(train_path), out=str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="share seed"):
        train(same_seed, progress=False)


def test_centre_accuracy_scores_column_pixels_only():
    truth = np.zeros((64, 64), np.uint8)
    rows, cols = np.indices(truth.shape)
    truth[(rows - 32) ** 2 + (cols - 32) ** 2 <= 11**2] = 5  # 0.6 Å disk at 5.3 pm
    mask = centre_mask(truth.shape, np.array([[32.0, 32.0]]), np.array([1]), 5.3)  # 16 px
    background_everywhere = np.zeros_like(truth)
    m = DepthMetrics()
    m.update(background_everywhere, truth, mask)
    assert m.summary()["centre_accuracy"] == 0.0  # was ~0.53 when background pixels counted
    m = DepthMetrics()
    m.update(truth, truth, mask)
    assert m.summary()["centre_accuracy"] == 1.0


def test_column_metrics_vote_find_and_flag_false_columns():
    est = np.zeros((64, 64), np.uint8)
    rows, cols = np.indices(est.shape)
    est[(rows - 16) ** 2 + (cols - 16) ** 2 <= 36] = 4  # column 1: exact
    est[(rows - 16) ** 2 + (cols - 48) ** 2 <= 36] = 6  # column 2: off by 1
    est[(rows - 48) ** 2 + (cols - 48) ** 2 <= 36] = 3  # no true column here: false
    m = ColumnMetrics()
    m.update(est, np.array([[16, 16], [16, 48], [48, 16]]), np.array([4, 5, 2]), 5.3)
    s = m.summary()
    assert s["columns"] == 3
    assert s["column_exact"] == pytest.approx(1 / 3)
    assert s["column_within_one"] == pytest.approx(2 / 3)
    assert s["column_found"] == pytest.approx(2 / 3)
    assert s["false_column_rate"] == pytest.approx(1 / 3)
    assert m.majorities == [4, 6, 0]  # the count read per true column, in order
    # another reading of the same frame, compared column by column
    other = ColumnMetrics()
    est[(rows - 16) ** 2 + (cols - 48) ** 2 <= 36] = 5
    other.update(est, np.array([[16, 16], [16, 48], [48, 16]]), np.array([4, 5, 2]), 5.3)
    assert m.read_differently(other) == 1 and m.read_differently(m) == 0
    pooled = m + other
    assert pooled.majorities == [4, 6, 0, 4, 5, 0] and pooled.columns == 6
    with pytest.raises(ValueError, match="not the same columns"):
        pooled.read_differently(m)


def test_ood_score_and_auc():
    probs = np.zeros((2, 11, 8, 8), np.float32)
    probs[:, 3] = 1.0
    turned = probs.copy()
    turned[1, 3], turned[1, 4] = 0.0, 1.0  # the second frame disagrees with its turned self
    scores = turn_scores(probs, turned)
    assert scores[0] == 0.0 and scores[1] == pytest.approx(1.0)
    assert roc_auc([0.1, 0.2], [0.3, 0.4]) == 1.0 and roc_auc([0.3], [0.3]) == 0.5


def test_render_set_is_reproducible_and_labels_match(libraries):
    library = load_library(libraries[1])
    render = RenderConfig(crop=32)
    a, rendered = render_set(library, 3, 5, render, TargetConfig(), with_rendered=True)
    b = render_set(library, 3, 5, render, TargetConfig())
    np.testing.assert_array_equal(a.images, b.images)
    for data_depth, r in zip(a.depth, rendered):
        for (row, col), d in zip(np.round(r.centres).astype(int), r.column_depth):
            assert data_depth[row, col] == d


@pytest.mark.slow
def test_robustness_suite_cli_tiny(tmp_path, segdepth_cmd):
    """The suite end to end on tiny test files: every row, JSON + Markdown + PNG."""
    out = tmp_path / "suite"
    run = subprocess.run(
        [
            *segdepth_cmd,
            "evaluate",
            "--suite",
            "robustness",
            "--suite-dir",
            str(tmp_path / "files"),
            "--suite-scale",
            "0.01",
            "--suite-gpts",
            "384",
            "--suite-crop",
            "64",
            "--limit",
            "2",
            "--out",
            str(out),
            "--threads",
            "1",
            "--tta",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((out / "robustness.json").read_text())
    # the bundled model read with test-time augmentation and plainly, the first against the second
    augmented, plain = (m["model_id"] for m in report["models"])
    assert [m["tta"] for m in report["models"]] == [True, False] and augmented == plain
    (pair,) = report["exact_differences"]
    assert (pair["model"], pair["against"]) == (f"{plain}+TTA", plain)
    labels = {f"{plain}+TTA": True, plain: False}
    names = [r["row"] for r in report["rows"]]
    assert {
        "turned 90°",
        "{111} facets",
        "λ = 0.5",
        "carbon film 3-6 nm",
        "legacy simulate slabs",
    } <= set(names)
    for row in report["rows"]:
        assert set(row["models"]) == set(labels)
        for label, summary in row["models"].items():
            assert 0 <= summary["column_exact"] <= 1 or np.isnan(summary["column_exact"])
            assert np.isfinite(summary["spread_mean"]) == labels[label]
    assert (out / "robustness.png").stat().st_size > 1000
    markdown = (out / "robustness.md").read_text()
    assert "turned 90°" in markdown and f"| {plain}+TTA |" in markdown
    for label, has_spread in labels.items():
        auc = report["auc_outside_training"][label]
        rho = report["scores_against_errors"][label]
        assert all(0 <= auc[s] <= 1 and -1 <= rho[s] <= 1 for s in ("ood", "uncertainty"))
        assert np.isfinite(auc["spread"]) == has_spread == np.isfinite(rho["spread"])
    assert "outside the training ranges" in markdown and "rank correlation" in markdown
    assert markdown.count("TTA spread score") == 2  # its AUC and its rank correlation


def test_suite_rows_outside_training_are_those_beyond_every_training_range():
    """A row is flagged outside (the rows the OOD score is judged on, pooled) exactly when a
    parameter lies beyond what the robust training draws: optics, dose, film, generator."""
    from sim_source.microscope import OpticsRanges
    from training.library_data import RenderConfig

    r = OpticsRanges()

    def beyond(o) -> bool:
        return bool(
            not r.defocus_nm[0] <= o.C10_A / 10 <= r.defocus_nm[1]
            or o.C12_A / 10 > r.astigmatism_nm[1]
            or o.C21_A / 10 > r.coma_nm[1]
            or not r.C3_um[0] <= o.C3_um <= r.C3_um[1]
            or not r.C5_mm[0] <= o.C5_mm <= r.C5_mm[1]
            or o.focal_spread_A > r.focal_spread_A[1]
        )

    files = {f.name: f for f in suite_files()}
    films = {name: f.particle for name, f in files.items()}
    for row in suite_rows():
        expected = (
            (row.optics is not None and beyond(row.optics))
            or row.dose > RenderConfig().dose[1]
            or row.file == "legacy"
            or (
                films[row.file] is not None
                and films[row.file].carbon_probability > 0
                and films[row.file].carbon_thickness_A[0] >= ParticleConfig().carbon_thickness_A[1]
            )
            or (files.get(row.file) and files[row.file].tilt_mrad[0] > LibraryConfig().tilt_mrad[1])
        )
        assert row.outside == expected, row.name
    assert sum(row.outside for row in suite_rows()) == 8


def test_test_time_augmentation_is_equivariant():
    """The 8-fold average maps back every transform: the TTA answer for a turned (or mirrored)
    image is the turned answer of the original, which a wrong inverse would break."""
    from training.inference import predict_batches
    from training.model import SegDepthUNet, UNetConfig

    torch.manual_seed(0)
    model = SegDepthUNet(UNetConfig(base_channels=4, max_channels=8, scales=3)).eval()
    image = np.random.default_rng(0).random((1, 32, 32)).astype(np.float32) + 0.5
    ((_, plain),) = predict_batches(model, image, tta=True)
    for transform in (lambda a: np.rot90(a, 1, axes=(-2, -1)), lambda a: a[..., ::-1]):
        ((_, moved),) = predict_batches(model, np.ascontiguousarray(transform(image)), tta=True)
        np.testing.assert_allclose(moved.probabilities, transform(plain.probabilities), atol=1e-5)
    ((_, single),) = predict_batches(model, image)
    assert not np.allclose(single.probabilities, plain.probabilities, atol=1e-4)


def test_tta_turn_and_spread_scores_are_those_of_its_eight_views():
    """With test-time augmentation each frame's turn score is that of its own unturned and
    quarter-turned passes, and its spread the views' variance about their mean over the called
    column pixels; here each view is computed on its own, with numpy's turns, and compared."""
    from training.inference import DIHEDRAL, forward_padded, predict_batches
    from training.model import SegDepthUNet, UNetConfig

    torch.manual_seed(1)
    model = SegDepthUNet(UNetConfig(base_channels=4, max_channels=8, scales=3)).eval()
    images = np.random.default_rng(1).random((2, 32, 32)).astype(np.float32) + 0.5
    ((_, pred),) = predict_batches(model, images, temperature=0.02, tta=True)
    views = []
    for k, flip in DIHEDRAL:
        x = np.rot90(images[..., ::-1] if flip else images, k, axes=(-2, -1))
        with torch.no_grad():
            logits, _ = forward_padded(model, torch.from_numpy(x.copy())[:, None])
        p = np.rot90(torch.softmax(logits / 0.02, dim=1).numpy(), -k, axes=(-2, -1))
        views.append(p[..., ::-1] if flip else p)
    views_arr = np.stack(views)  # (8, B, 11, H, W)
    mean = views_arr.mean(axis=0)
    np.testing.assert_allclose(pred.probabilities, mean, atol=1e-5)
    np.testing.assert_allclose(pred.turn, turn_scores(views[0], views[1]), atol=1e-5)
    spread = ((views_arr - mean) ** 2).sum(axis=2).mean(axis=0)  # (B, H, W)
    called = mean.argmax(axis=1) > 0
    want = [s[c].mean() if c.any() else s.mean() for s, c in zip(spread, called)]
    assert min(want) > 1e-4  # an untrained model answers its views differently
    np.testing.assert_allclose(pred.spread, want, rtol=1e-4, atol=1e-7)
    ((_, plain),) = predict_batches(model, images, temperature=0.02)
    assert plain.turn is None and plain.spread is None


def test_class_prior_is_the_loss_weighted_label_frequency():
    from training.labels import class_prior

    labels = np.array([[0, 0, 5, 5]])
    weights = np.array([[0.2, 0.2, 1.0, 1.0]])
    prior = class_prior(labels, weights, floor=0.0)
    assert prior[5] == pytest.approx(2 / 2.4) and prior[0] == pytest.approx(0.4 / 2.4)
    assert class_prior(labels, weights).min() > 0
    assert class_prior(labels, weights).sum() == pytest.approx(1)


def test_suite_calibration_on_truth_columns_counts_missed_ones_and_on_called_columns_not():
    """Two true columns: one read right at confidence 0.6, one missed (called background) at
    confidence 0.9. On truth column pixels half are wrong at 0.9 and half right at 0.6, so the
    ECE is (0.9 + 0.4) / 2; on the pixels called a column all are right at 0.6: ECE 0.4."""
    from training.data import LabelledSet
    from training.robustness import RowResult

    truth = np.zeros((1, 48, 48), np.uint8)
    truth[0, 2:16, 2:16] = 5
    truth[0, 26:40, 26:40] = 3
    depth = truth[0].copy()
    depth[26:40, 26:40] = 0  # the second column missed
    confidence = np.full((48, 48), 0.9, np.float32)
    confidence[2:16, 2:16] = 0.6
    data = LabelledSet(
        truth.astype(np.float32),
        truth,
        truth,
        truth,
        np.ones_like(truth, np.float32),
        [np.array([[8.5, 8.5], [32.5, 32.5]])],
        [np.array([2, 2])],
        5.3,
        "",
        "",
    )
    result = RowResult()
    result.add(depth, confidence, data, 0, np.array([5, 3]))
    summary = result.summary()
    assert summary["ece_column_pixels"] == pytest.approx((0.9 + 0.4) / 2, abs=1e-6)
    assert summary["ece_called_column_pixels"] == pytest.approx(0.4, abs=1e-6)
    assert summary["column_found"] == pytest.approx(0.5)
    assert result.errors == [0.5]  # one of the two columns read wrong (missed)
    result.add(truth[0], confidence, data, 0, np.array([5, 3]))
    assert result.errors == [0.5, 0.0]  # per frame, not pooled
    assert result.frame_columns == [2, 2] and result.frame_exact == [1, 2]


def _frames(columns: list[int], exact: list[int]):
    from training.robustness import RowResult

    return RowResult(frame_columns=list(columns), frame_exact=list(exact))


def test_paired_exact_difference_tells_a_steady_gain_from_frame_to_frame_scatter():
    from training.robustness import paired_exact_difference

    rng = np.random.default_rng(0)
    columns = [20] * 30
    base = _frames(columns, [12] * 30)
    # three more columns read exactly on every frame: 0.15, the interval well above zero
    steady = paired_exact_difference(_frames(columns, [15] * 30), base, rng)
    assert steady["difference"] == pytest.approx(0.15) and steady["frames"] == 30
    assert steady["ci95"][0] == pytest.approx(0.15) == steady["ci95"][1]
    # +4 on half the frames, -4 on the other half: no difference, zero inside a wide interval
    scatter = paired_exact_difference(_frames(columns, [16, 8] * 15), base, rng)
    low, high = scatter["ci95"]
    assert scatter["difference"] == pytest.approx(0.0) and low < -0.03 and high > 0.03
    # a gain of 1 column on 1 frame of 30 in 600 columns: +0.0017, zero inside the interval
    one = paired_exact_difference(_frames(columns, [13] + [12] * 29), base, rng)
    assert one["difference"] == pytest.approx(1 / 600) and one["ci95"][0] <= 0
    assert paired_exact_difference(base, base, rng)["ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="different frames"):
        paired_exact_difference(_frames([20] * 29, [12] * 29), base, rng)


def test_paired_exact_difference_resamples_structures_not_their_views():
    """Ten structures seen three times each; the new model gains 4 columns of 20 on every view
    of half the structures and loses 4 on every view of the others. Resampled as 30 independent
    frames the interval would be too narrow; resampled by structure it is wider."""
    from training.robustness import paired_exact_difference

    columns = [20] * 30
    shown = [k % 10 for k in range(30)]
    new = _frames(columns, [16 if s < 5 else 8 for s in shown])
    old = _frames(columns, [12] * 30)
    as_frames = paired_exact_difference(new, old, np.random.default_rng(0))
    new.frame_structures, old.frame_structures = shown, list(shown)
    as_structures = paired_exact_difference(new, old, np.random.default_rng(0))
    assert as_structures["difference"] == pytest.approx(0.0) and as_structures["structures"] == 10
    width = [d["ci95"][1] - d["ci95"][0] for d in (as_frames, as_structures)]
    assert as_frames["structures"] == 30 and width[1] > 1.4 * width[0]
    old.frame_structures = [k % 15 for k in range(30)]
    with pytest.raises(ValueError, match="different frames"):
        paired_exact_difference(new, old, np.random.default_rng(0))


def test_exact_differences_count_rows_above_and_below_zero_and_reach_the_markdown():
    from training.robustness import exact_differences, markdown_table

    rows = suite_rows()[:3]
    columns = [10] * 20
    results = {}
    for row, (new, old) in zip(
        rows, [([8] * 20, [5] * 20), ([5] * 20, [8] * 20), ([6, 4] * 10, [5] * 20)]
    ):
        results[(row.name, "new.pt")] = _frames(columns, new)
        results[(row.name, "old.pt")] = _frames(columns, old)
    (pair,) = exact_differences(results, rows, ["new.pt", "old.pt"], ["new", "old"], seed=1)
    assert (pair["model"], pair["against"]) == ("new", "old")
    assert (pair["higher"], pair["lower"]) == (1, 1)
    assert pair["rows"][rows[0].name]["difference"] == pytest.approx(0.3)
    assert exact_differences(results, rows, ["new.pt"], ["new"], seed=1) == []
    text = markdown_table({"rows": [], "exact_differences": [pair]})
    assert "new minus old" in text and "| +0.300 |" in text
    assert "Above zero on 1 rows, below on 1, zero inside the interval on 1." in text


def test_rank_correlation_of_scores_with_frame_errors():
    from training.robustness import rank_correlation

    errors = [0.1, 0.4, 0.2, float("nan"), 0.9]  # a frame without columns is left out
    assert rank_correlation([1, 3, 2, 100, 4], errors) == pytest.approx(1.0)
    assert rank_correlation([4, 2, 3, -5, 1], errors) == pytest.approx(-1.0)
    assert np.isnan(rank_correlation([1, 2], [0.1, 0.2]))
