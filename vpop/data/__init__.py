"""Data shipped with vpop: published calibration targets and the calibrated default posterior."""
