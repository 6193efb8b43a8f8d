#!/bin/sh
# Roll back step air_topk: rollback/air_topk.sh --target DIR [--mode flag|revert] [--cascade] [--json]
exec xllm-port rollback --step air_topk "$@"
