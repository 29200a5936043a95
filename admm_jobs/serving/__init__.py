"""Serving a trained model: batch prediction from IDX, PNG or Parquet (:mod:`.predict`) and the ONNX export
(:mod:`.onnx_export`)."""
