"""Inference engine: model export, backends, camera-rate batching, columns and occupancy."""
