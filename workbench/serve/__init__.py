"""The inference service: `workbench deploy` writes a service folder (`deploy.py`),
`workbench serve` runs it (`run.py`): an OpenAI-compatible HTTP API (`app.py`; each
request read within bounds in `request.py`) over the workbench engine with continuous
batching, admission control (`admission.py`) and Prometheus metrics (`metrics.py`)."""
