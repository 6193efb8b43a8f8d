#!/bin/sh
# Roll back step beam_search: rollback/beam_search.sh --target DIR [--mode flag|revert] [--cascade] [--json]
exec xllm-port rollback --step beam_search "$@"
