"""Power and heat: meters for what the machine draws (RAPL, NVML, sensors) and whether it
throttles (`meter`), and power caps (`cap`). Read by the worker for each request's energy,
by autotune and by the device dashboard."""
