"""INT8 calibration: calibration inputs recorded from real prompts, ONNX Runtime's static QDQ quantization,
checks against FP32 (``calibration.int8``). The arrows are calibration -> runtime, never runtime -> calibration."""
