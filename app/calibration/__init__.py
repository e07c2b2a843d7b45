"""Calibration: metrics with their estimators named, and report rendering."""
