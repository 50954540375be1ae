"""The three linked image views (raw frame, depth map, confidence map) with colour bars and the
overlay of detected columns coloured by species.

Images are ``ImageItem(axisOrder='row-major', autoLevels=False)`` with explicit levels and
LUTs of at most 256 entries; each pixel's centre sits at integer coordinates, so a column at
(x_px, y_px) from the result table is drawn exactly there (origin: centre of the top-left pixel).
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PyQt6 import QtCore

from streamer.domain import N_DEPTHS
from viewer.colormaps import SPECIES, continuous_lut, depth_lut
from viewer.history import column_table

#: percentiles of the frame's counts used by auto-levels.
AUTO_LEVELS_PERCENTILES = (0.5, 99.5)


def auto_levels(image: np.ndarray) -> tuple[float, float]:
    """Display levels (low, high) of ``image`` from its 0.5 and 99.5 percentiles (sampled)."""
    sample = np.asarray(image)[::4, ::4].astype(np.float32, copy=False)
    lo, hi = np.percentile(sample, AUTO_LEVELS_PERCENTILES)
    return float(lo), float(hi if hi > lo else lo + 1.0)


class ColorBar(pg.PlotItem):
    """A vertical colour bar: the LUT as an image spanning ``levels``, labelled on the right."""

    def __init__(
        self,
        lut: np.ndarray,
        levels: tuple[float, float],
        label: str,
        ticks: list[tuple[float, str]] | None = None,
        discrete: bool = False,
    ):
        super().__init__()
        self.discrete = discrete
        self.setMouseEnabled(x=False, y=False)
        self.setMenuEnabled(False)
        self.hideButtons()
        self.hideAxis("bottom")
        self.hideAxis("left")
        self.showAxis("right")
        self.getAxis("right").setLabel(label)
        self.getAxis("right").setWidth(48)
        self.setFixedWidth(78)
        self.ramp = pg.ImageItem(axisOrder="row-major", autoLevels=False)
        self.addItem(self.ramp)
        self._ticks = ticks
        self.set_lut(lut, levels)

    def set_lut(self, lut: np.ndarray, levels: tuple[float, float]) -> None:
        lo, hi = levels
        n = lut.shape[0]
        ramp = np.arange(n, dtype=np.uint8 if n <= 256 else np.uint16)[:, None]
        self.ramp.setImage(ramp, autoLevels=False, levels=(0, n - 1), lut=lut)
        if self.discrete:  # one band per value lo..hi, centred on it
            self.ramp.setRect(QtCore.QRectF(0, lo - 0.5, 1, hi - lo + 1))
            self.setYRange(lo - 0.5, hi + 0.5, padding=0)
        else:
            self.ramp.setRect(QtCore.QRectF(0, lo, 1, hi - lo))
            self.setYRange(lo, hi, padding=0)
        self.setXRange(0, 1, padding=0)
        if self._ticks is not None:
            self.getAxis("right").setTicks([self._ticks, []])


def _image_view(title: str) -> tuple[pg.PlotItem, pg.ImageItem]:
    plot = pg.PlotItem(title=title)
    plot.hideAxis("left")
    plot.hideAxis("bottom")
    plot.setAspectLocked(True)
    plot.invertY(True)
    plot.setMenuEnabled(False)
    image = pg.ImageItem(axisOrder="row-major", autoLevels=False)
    plot.addItem(image)
    return plot, image


class ImagePanels(pg.GraphicsLayoutWidget):
    """Raw frame | depth map | confidence map, panned and zoomed together.

    ``columnClicked(x_px, y_px)`` is emitted for a left click in any of the three views.
    """

    columnClicked = QtCore.pyqtSignal(float, float)

    def __init__(self, frame_cmap: str = "gray", confidence_cmap: str = "viridis"):
        super().__init__()
        self.setBackground("#101010")
        self.frame_plot, self.frame_image = _image_view("Raw frame (counts)")
        self.depth_plot, self.depth_image = _image_view("Depth (atoms per column)")
        self.conf_plot, self.conf_image = _image_view("Confidence")
        self.frame_levels = (0.0, 1.0)
        self.frame_lut = continuous_lut(frame_cmap)
        self.conf_lut = continuous_lut(confidence_cmap)
        self.depth_lut = depth_lut()
        self.frame_bar = ColorBar(self.frame_lut, self.frame_levels, "counts")
        self.depth_bar = ColorBar(
            self.depth_lut,
            (0, N_DEPTHS - 1),
            "atoms",
            ticks=[(d, str(d)) for d in range(N_DEPTHS)],
            discrete=True,
        )
        self.conf_bar = ColorBar(
            self.conf_lut,
            (0.0, 1.0),
            "confidence",
            ticks=[(v, f"{v:.1f}") for v in np.linspace(0, 1, 6)],
        )
        for col, item in enumerate(
            (
                self.frame_plot,
                self.frame_bar,
                self.depth_plot,
                self.depth_bar,
                self.conf_plot,
                self.conf_bar,
            )
        ):
            self.addItem(item, row=0, col=col)
        for plot in (self.depth_plot, self.conf_plot):
            plot.setXLink(self.frame_plot)
            plot.setYLink(self.frame_plot)
        # column overlay on the raw frame: one scatter per species (uniform pens: cheap setData)
        self.overlays: list[tuple[int, pg.ScatterPlotItem]] = []
        for code, (_, colour) in SPECIES.items():
            scatter = pg.ScatterPlotItem(
                size=6, pen=pg.mkPen(colour, width=1), brush=None, pxMode=True
            )
            self.frame_plot.addItem(scatter)
            self.overlays.append((code, scatter))
        self.pin_markers: list[pg.ScatterPlotItem] = []
        for plot in (self.frame_plot, self.depth_plot, self.conf_plot):
            marker = pg.ScatterPlotItem(
                size=16, pen=pg.mkPen("w", width=2), brush=None, symbol="s", pxMode=True
            )
            plot.addItem(marker)
            self.pin_markers.append(marker)
        self.pin_labels: list[tuple[pg.PlotItem, pg.TextItem]] = []
        self._pin_key: list[tuple[int, float, float]] | None = None
        self._overlay_key: np.ndarray | None = None
        self.shape: tuple[int, int] | None = None
        self.scene().sigMouseClicked.connect(self._on_click)

    # --- data ----------------------------------------------------------------------------
    def _fit(self, shape: tuple[int, int]) -> None:
        """Show the whole image when its shape changes."""
        if shape != self.shape:
            self.shape = shape
            self.frame_plot.setRange(
                xRange=(-0.5, shape[1] - 0.5), yRange=(-0.5, shape[0] - 0.5), padding=0
            )

    @staticmethod
    def _show(item: pg.ImageItem, data: np.ndarray, levels, lut: np.ndarray) -> None:
        """Set an image; pixel (r, c) covers [c - 0.5, c + 0.5] x [r - 0.5, r + 0.5]."""
        reshaped = item.image is None or item.image.shape != data.shape
        item.setImage(data, autoLevels=False, levels=levels, lut=lut)
        if reshaped:
            item.setRect(QtCore.QRectF(-0.5, -0.5, data.shape[1], data.shape[0]))

    def set_frame(self, frame: np.ndarray | None) -> None:
        """Show a raw frame (H, W) at the current fixed levels."""
        if frame is None:
            return
        self._fit(frame.shape)
        self._show(self.frame_image, frame, self.frame_levels, self.frame_lut)

    def set_frame_levels(self, levels: tuple[float, float]) -> None:
        self.frame_levels = (float(levels[0]), float(levels[1]))
        self.frame_image.setLevels(self.frame_levels)
        self.frame_bar.set_lut(self.frame_lut, self.frame_levels)

    def auto_levels(self) -> tuple[float, float] | None:
        """Set the frame's levels from the frame shown now (contrast on demand)."""
        frame = self.frame_image.image
        if frame is None:
            return None
        self.set_frame_levels(auto_levels(frame))
        return self.frame_levels

    def set_frame_colormap(self, name: str) -> None:
        self.frame_lut = continuous_lut(name)
        self.frame_image.setLookupTable(self.frame_lut)
        self.frame_bar.set_lut(self.frame_lut, self.frame_levels)

    def set_confidence_colormap(self, name: str) -> None:
        self.conf_lut = continuous_lut(name)
        self.conf_image.setLookupTable(self.conf_lut)
        self.conf_bar.set_lut(self.conf_lut, (0.0, 1.0))

    def set_result(self, arrays: dict[str, np.ndarray], header: dict) -> None:
        """Show a result's depth and confidence maps and its columns."""
        depth = arrays.get("depth")
        if depth is not None:
            self._fit(depth.shape)
            self._show(self.depth_image, depth, (0, N_DEPTHS - 1), self.depth_lut)
        conf = arrays.get("confidence")
        if conf is not None:
            self._show(self.conf_image, conf, (0.0, 1.0), self.conf_lut)
        self.set_columns(header)

    def clear_result(self) -> None:
        """Blank the depth and confidence views and the column overlay (a frame without result)."""
        self.depth_image.clear()
        self.conf_image.clear()
        self.set_columns({})

    def set_columns(self, header: dict) -> None:
        """Overlay the result's columns; redrawn only when a position moved by >= 1/4 px."""
        table = column_table(header)
        key = np.concatenate(
            [np.rint(4 * table["x_px"]), np.rint(4 * table["y_px"]), table["species"]]
        )
        if self._overlay_key is not None and np.array_equal(key, self._overlay_key):
            return
        self._overlay_key = key
        for code, scatter in self.overlays:
            keep = table["species"] == code
            scatter.setData(x=table["x_px"][keep], y=table["y_px"][keep])

    def show_columns(self, visible: bool) -> None:
        for _, scatter in self.overlays:
            scatter.setVisible(visible)

    def set_pins(self, pins: list[tuple[int, float, float]]) -> None:
        """Mark pinned columns: (id, x_px, y_px) each, labelled with their id."""
        if pins == self._pin_key:
            return
        x = np.array([p[1] for p in pins], dtype=float)
        y = np.array([p[2] for p in pins], dtype=float)
        for marker in self.pin_markers:
            marker.setData(x=x, y=y)
        if [p[0] for p in pins] != [p[0] for p in self._pin_key or []]:
            for plot, label in self.pin_labels:
                plot.removeItem(label)
            self.pin_labels = []
            for cid, _, _ in pins:
                for plot in (self.frame_plot, self.depth_plot, self.conf_plot):
                    label = pg.TextItem(f"#{cid}", color="w", anchor=(0, 1))
                    plot.addItem(label)
                    self.pin_labels.append((plot, label))
        for k, (_, label) in enumerate(self.pin_labels):
            _, px, py = pins[k // 3]
            label.setPos(px + 3, py - 3)
        self._pin_key = list(pins)

    # --- interaction ---------------------------------------------------------------------
    def _on_click(self, event) -> None:
        if event.button() != QtCore.Qt.MouseButton.LeftButton:
            return
        pos = event.scenePos()
        for plot in (self.frame_plot, self.depth_plot, self.conf_plot):
            vb = plot.getViewBox()
            if vb.sceneBoundingRect().contains(pos):
                point = vb.mapSceneToView(pos)
                self.columnClicked.emit(point.x(), point.y())
                return

    def widget_pos(self, x_px: float, y_px: float, view: str = "depth") -> QtCore.QPoint:
        """Widget coordinates of image point (x_px, y_px) in ``view`` (frame|depth|confidence)."""
        plot = {"frame": self.frame_plot, "depth": self.depth_plot, "confidence": self.conf_plot}[
            view
        ]
        scene = plot.getViewBox().mapViewToScene(QtCore.QPointF(x_px, y_px))
        return self.mapFromScene(scene)
