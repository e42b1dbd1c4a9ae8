"""Sources: MQTT subscriptions (``mqtt``), topic templates (``topics``) and the payload
decoders that turn one MQTT message into events (``decode``, ``senml``, ``lwm2m``)."""
