#!/usr/bin/env bash
# Install webhook-bridge into ./.venv and run it on config/example.yaml: an embedded MQTT
# broker (amqtt) on 127.0.0.1:1883, the queue in config/state/, one webhook to a local
# receiver. Publish to devices/<id>/telemetry and watch it arrive; Ctrl-C stops it.
source "$(dirname "$0")/_common.sh"
make_venv ".[broker]"  # the embedded broker the example config uses
# The other commands (status, test, dead, ...) find this config through the environment.
cat >&2 <<EOF

Quick start config: $PWD/config/example.yaml
In another terminal, for the other commands:
  export WEBHOOK_BRIDGE_CONFIG=$PWD/config/example.yaml
  $PWD/.venv/bin/webhook-bridge status

EOF
exec .venv/bin/webhook-bridge run -c config/example.yaml "$@"
