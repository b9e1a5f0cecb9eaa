"""Serving benchmark: seeded multi-variant workloads, open-loop replay over gRPC, and latency metrics."""
