"""INT8 calibration (calibration sets from images/prompts, Q/DQ quantization, accuracy/acceptance report).

Not implemented yet: no issue has asked for it so far. The scene generator (dream_export.scenes) is meant
to provide calibration data; the arrows are calibration -> runtime, never runtime -> calibration.
"""
