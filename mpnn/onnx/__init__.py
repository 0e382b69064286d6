"""mpnn.onnx: export a model in eval mode to an ONNX file that onnxruntime (or any ONNX runtime) runs.

    mpnn.onnx.export(model, example_input, "model.onnx")          # opset 17; the batch axis stays dynamic

Built with the `onnx` package's helper API (pip install 'mpnn[onnx]'; imported only when export is called). The
forward pass is traced: known layers become one ONNX node each, and the tensor ops a custom forward() runs between
them (residual adds, reshape/view, transpose, split, indexing, scaled_dot_product_attention, ...) become theirs.
Anything else is refused naming the op and the layer it ran in (see exporter.py).
"""

from mpnn.onnx.exporter import DEFAULT_OPSET, ExportError, export

__all__ = ["export", "ExportError", "DEFAULT_OPSET"]
