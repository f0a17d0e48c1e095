"""Interoperability: ONNX graphs for deployment, hloc files for structure-from-motion pipelines.

Nothing heavy is imported here: ``vprhub.export.onnx`` needs the ``export`` extra
(onnx, onnxscript, onnxruntime), ``vprhub.export.hloc`` needs h5py.
"""
