"""Lookup tables (at most 256 entries, RGBA uint8) for the viewer's images and plots."""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg

from streamer.domain import SPECIES_CE, SPECIES_NAME, SPECIES_O

#: one colour per depth 0..10: dark for vacuum, then turbo from few (blue) to many (red) atoms.
DEPTH_COLOURS = (
    "#262626",
    "#424cb7",
    "#438ffe",
    "#1bced6",
    "#3af48f",
    "#9bfe40",
    "#dce036",
    "#fda933",
    "#f15d13",
    "#c52603",
    "#7a0403",
)
#: species code -> (name, marker colour).
SPECIES = {
    SPECIES_CE: (SPECIES_NAME[SPECIES_CE], "#ffd23f"),
    SPECIES_O: (SPECIES_NAME[SPECIES_O], "#ff3df5"),
}
#: colormaps offered for the frame and confidence images (names known to pyqtgraph).
COLORMAPS = ("gray", "viridis", "inferno", "magma", "plasma", "cividis")


def species_name(code: int) -> str:
    return SPECIES.get(int(code), ("?", "#ffffff"))[0]


def depth_lut() -> np.ndarray:
    """The discrete depth LUT (11, 4): entry d is the colour of depth d (use levels (0, 10))."""
    rgb = [pg.mkColor(c).getRgb() for c in DEPTH_COLOURS]
    return np.array(rgb, dtype=np.uint8)


def continuous_lut(name: str, n: int = 256) -> np.ndarray:
    """A continuous LUT (n, 4) of colormap ``name`` (one of :data:`COLORMAPS`)."""
    if name not in COLORMAPS:
        raise ValueError(f"unknown colormap {name!r}; choose one of {', '.join(COLORMAPS)}")
    if name == "gray":
        ramp = np.linspace(0, 255, n).round().astype(np.uint8)
        return np.stack([ramp, ramp, ramp, np.full(n, 255, np.uint8)], axis=1)
    lut = pg.colormap.get(name).getLookupTable(0.0, 1.0, n, alpha=True)
    return np.ascontiguousarray(lut, dtype=np.uint8)
