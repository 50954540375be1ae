"""UNet, losses, training loop, metrics, calibration and reports (SegDepth, sections III-C and
IV)."""
