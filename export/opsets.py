"""ONNX opsets the export stage produces, as plain constants (no torch import: the CLI's --help reads them)."""

MIN_OPSET = 18  # the dynamo exporter's native opset; down-conversion to 17 can fail silently
MAX_OPSET = 23
TRT10_MAX_OPSET = 20  # TensorRT 10.x parsers (JetPack 6/7); TensorRT 11 parses up to 25
DEFAULT_OPSET = 19
