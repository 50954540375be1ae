"""A synthetic CeO2-like scene that speaks the result protocol: for the viewer's benchmark,
tests and a demo without engine. Not physics: columns on a lattice, depth growing downwards,
oxygen columns that lose and regain an atom now and then.

``K`` states are precomputed (maps and tables), so producing a message costs only encoding and
a 100 Hz publisher stays cheap at 1024².
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from streamer.domain import N_DEPTHS, SPECIES_CE, SPECIES_O
from streamer.protocol import encode, encode_frame, make_header


@dataclass(frozen=True)
class SceneConfig:
    """``shape`` (H, W) px; ``spacing_px`` between Ce columns; ``states``: distinct precomputed
    occupancy states, each held for ``hold`` results; ``pixel_size_pm`` of the frames."""

    shape: tuple[int, int] = (256, 256)
    spacing_px: int = 40
    states: int = 8
    hold: int = 5
    pixel_size_pm: float = 5.3
    seed: int = 0


class SyntheticScene:
    """Columns, their maps and noisy frames; :meth:`result_parts` / :meth:`frame_parts` encode
    message ``seq`` of the scene."""

    def __init__(self, config: SceneConfig = SceneConfig()):
        self.config = c = config
        rng = np.random.default_rng(c.seed)
        h, w = c.shape
        s = c.spacing_px
        ys, xs = np.mgrid[s // 2 : h - s // 4 : s, s // 2 : w - s // 4 : s]
        ce = np.stack([xs.ravel(), ys.ravel()], 1).astype(float)
        o = ce + [s / 2, s / 4]
        o = o[(o[:, 0] < w - 4) & (o[:, 1] < h - 4)]
        self.x_px = np.concatenate([ce[:, 0], o[:, 0]])
        self.y_px = np.concatenate([ce[:, 1], o[:, 1]])
        self.species = np.concatenate([np.full(len(ce), SPECIES_CE), np.full(len(o), SPECIES_O)])
        self.ids = np.arange(self.species.size)
        n = self.ids.size
        base = np.clip(np.rint(2 + 8 * self.y_px / h), 1, N_DEPTHS - 1).astype(int)
        # state k: every O column is either full or missing one atom
        flips = rng.random((c.states, n)) < 0.3
        flips[:, self.species != SPECIES_O] = False
        self.depths = np.clip(base[None, :] - flips, 0, N_DEPTHS - 1)
        # label image: column index within a disk of radius spacing/6, -1 elsewhere
        yy, xx = np.mgrid[0:h, 0:w]
        label = np.full((h, w), -1, np.int64)
        r2 = (s / 6) ** 2
        for k in range(n):
            y0, x0 = int(self.y_px[k]), int(self.x_px[k])
            sl = (slice(max(0, y0 - s // 4), y0 + s // 4), slice(max(0, x0 - s // 4), x0 + s // 4))
            disk = (yy[sl] - self.y_px[k]) ** 2 + (xx[sl] - self.x_px[k]) ** 2 <= r2
            label[sl][disk] = k
        inside = label >= 0
        self.probabilities = []
        self.maps: list[dict[str, np.ndarray]] = []
        for k in range(c.states):
            probs = self._probabilities(self.depths[k], rng)
            depth = np.where(inside, self.depths[k][label], 0).astype(np.uint8)
            conf = np.where(inside, probs.max(1)[label], 0.97).astype(np.float32)
            species = np.where(inside, self.species[label], 0).astype(np.uint8)
            self.probabilities.append(probs)
            self.maps.append({"depth": depth, "confidence": conf, "species": species})
        clean = 1.0 - 0.04 * np.where(inside, self.depths[0][label], 0)
        self.frames = [rng.poisson(100 * clean).astype(np.uint16) for _ in range(4)]

    @staticmethod
    def _probabilities(depths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        logits = -0.8 * (np.arange(N_DEPTHS)[None, :] - depths[:, None]) ** 2
        logits += rng.normal(0, 0.4, logits.shape)
        p = np.exp(logits - logits.max(1, keepdims=True))
        return (p / p.sum(1, keepdims=True)).astype(np.float32)

    def state(self, seq: int) -> int:
        return (seq // self.config.hold) % self.config.states

    def result_parts(
        self,
        seq: int,
        session: str = "synthetic",
        latency_ms: float = 5.0,
        t_acq: float | None = None,
    ) -> list:
        """Encoded result ``seq`` (header with the column table, maps, probabilities)."""
        k = self.state(seq)
        probs = self.probabilities[k]
        filtered = self.probabilities[(k - 1) % self.config.states] * 0.3 + probs * 0.7
        depths = np.arange(N_DEPTHS, dtype=np.float32)
        table = {
            "id": self.ids.tolist(),
            "x_px": self.x_px.tolist(),
            "y_px": self.y_px.tolist(),
            "species": self.species.tolist(),
            "depth": probs.argmax(1).tolist(),
            "expected_depth": (probs @ depths).tolist(),
            "confidence": probs.max(1).tolist(),
            "depth_filtered": filtered.argmax(1).tolist(),
            "expected_filtered": (filtered @ depths).tolist(),
        }
        head = make_header(
            "result",
            session=session,
            seq=seq,
            source="synthetic",
            t_acq=time.time() if t_acq is None else t_acq,
            model_id="synthetic",
            backend="none",
            batch_size=1,
            latency_ms=latency_ms,
            frame_seq=seq,
            skipped=0,
            pixel_size_pm=self.config.pixel_size_pm,
            columns=table,
        )
        return encode(
            head,
            {
                **self.maps[k],
                "column_probabilities": probs,
                "column_probabilities_filtered": filtered.astype(np.float32),
            },
        )

    def frame_parts(self, seq: int, session: str = "synthetic", t_acq: float | None = None) -> list:
        return encode_frame(
            self.frames[seq % len(self.frames)],
            session=session,
            seq=seq,
            source="synthetic",
            pixel_size_pm=self.config.pixel_size_pm,
            t_acq=t_acq,
            mode="live",
        )
