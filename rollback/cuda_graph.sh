#!/bin/sh
# Roll back step cuda_graph: rollback/cuda_graph.sh --target DIR [--mode flag|revert] [--cascade] [--json]
exec xllm-port rollback --step cuda_graph "$@"
