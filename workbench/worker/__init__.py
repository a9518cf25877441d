"""The engine's worker-process side: the request loop (`main`), the one module that owns
llama.cpp's objects (`runtime`), continuous batching, the dry-run probe, chat templates,
the thread governor and the loader of llama.cpp's shared libraries (`libs`).

Only the worker process and other children import these modules; the kernel starts them
by name through `workbench._child`."""
