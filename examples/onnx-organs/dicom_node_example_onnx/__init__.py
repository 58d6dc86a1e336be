"""dicom-node example: a small real ONNX model (tissue classes of a CT) run with onnxruntime in a warm worker.

The plugin lives in :mod:`dicom_node_example_onnx.plugin`; the model's fixed weights in
:mod:`dicom_node_example_onnx.model`, the ONNX graph built from them in :mod:`.make_model`, and the
same computation in plain numpy in :mod:`.reference`. This module stays empty on purpose, so
``reference`` and ``model`` import with numpy alone (the tests use them in another environment).
"""

__version__ = "1.0.0"
