"""ONNX export: graph wrappers, graph specs (I/O declared once), validation, bundle writer."""
