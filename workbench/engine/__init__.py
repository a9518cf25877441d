"""The engine, kernel side: the client that supervises the worker, token streams, the
protocol both sides speak, and the status file the JupyterLab panel reads."""
