"""Grafana dashboards as code: built with grafana-foundation-sdk, exported to the committed JSON in json/."""
