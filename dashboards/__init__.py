"""Grafana dashboards as code: built with grafana-foundation-sdk, exported to the committed JSON in json/.

Importing this package needs neither the SDK nor grafana-client (the aggregator's CLI imports it)."""

from pathlib import Path

JSON_DIR = Path(__file__).with_name("json")  # the packaged dashboards: provisioning and `push` read them
