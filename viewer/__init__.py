"""Live pyqtgraph / PyQt6 viewer of frames, depth, confidence and column occupancy."""
