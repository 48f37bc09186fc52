"""The code that runs inside Triton: the GPT-2 step model.

- `contract`: the contract package (wire tensors and dtypes, row statuses, parameters, metadata
  keys, config.pbtxt parameters, the ONNX graph's names), shared with the exporter and the
  gateway (whose image ships it); pure Python.
- `engine`: `StepEngine`, ONNX Runtime + the KV pool + the sequence table; no Triton.
- `triton_model`: the Python-backend glue, copied into every model version as `model.py`.

The exporter copies this package into every model version, so a version carries the exact code
it was exported with. Importing the package itself imports nothing heavy.
"""
