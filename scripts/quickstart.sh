#!/usr/bin/env bash
# Install webhook-bridge into ./.venv and run it on config/example.yaml: an embedded MQTT
# broker (amqtt) on 127.0.0.1:1883, the queue in config/state/, one webhook to a local
# receiver. Publish to devices/<id>/telemetry and watch it arrive; Ctrl-C stops it.
source "$(dirname "$0")/_common.sh"
make_venv .
exec .venv/bin/webhook-bridge run -c config/example.yaml "$@"
