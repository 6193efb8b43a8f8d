#!/bin/sh
# Roll back step spec_decode: rollback/spec_decode.sh --target DIR [--mode flag|revert] [--cascade] [--json]
exec xllm-port rollback --step spec_decode "$@"
