#!/bin/sh
# Roll back step logit_softmax: rollback/logit_softmax.sh --target DIR [--mode flag|revert] [--cascade] [--json]
exec xllm-port rollback --step logit_softmax "$@"
