"""Simulation of CeO2 [110] HRTEM training data and in-situ sessions, and the session replayer."""
