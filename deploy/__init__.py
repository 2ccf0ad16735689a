"""deploy/'s Prometheus and Alertmanager configs, shipped in the package so the demo and the tests
derive their loopback configs from the files users deploy (see `gradwatch.demo.stack`)."""
