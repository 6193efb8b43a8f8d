#!/bin/sh
# Roll back step nvtx: rollback/nvtx.sh --target DIR [--mode flag|revert] [--cascade] [--json]
exec xllm-port rollback --step nvtx "$@"
