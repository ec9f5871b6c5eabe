"""Calibration: find attention sinks and massive activations, gather quantizer statistics.

    result = calibrate(model, tok, "wiki.train.raw", samples=16, seq_len=512)
    result.sink_map.positional        # e.g. [0]
    result.save("calib/"); CalibrationResult.load("calib/")
"""
from __future__ import annotations

from quantsink.calibration.artifact import CalibrationResult
from quantsink.calibration.calibrate import calibrate
from quantsink.calibration.detect import Thresholds
from quantsink.calibration.sinkmap import SinkMap

__all__ = ["CalibrationResult", "SinkMap", "Thresholds", "calibrate"]
