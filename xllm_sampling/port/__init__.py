"""xllm-port: apply the series to a target git repository one verified, revertible step at a time."""
