"""Tools that drive a LatentSync deployment end to end: the demo, benchmarks, soak, locust and perf_analyzer runs,
and the prepared GPU script."""
