"""gradwatch's aggregator service: rule specs, PromQL, alerting and remediation. Imports without torch."""
