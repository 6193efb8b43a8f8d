#!/bin/sh
# Roll back step sampler: rollback/sampler.sh --target DIR [--mode flag|revert] [--cascade] [--json]
exec xllm-port rollback --step sampler "$@"
