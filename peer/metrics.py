"""A peer's own Prometheus metrics (``hivefold peer --metrics-port``): what this machine contributes.

Read from the trainer at scrape time, so scraping costs the training loop nothing. Bytes moved by
the all-reduce are an estimate from the compressed payload and the group size (hivemind's libp2p
daemon keeps no counters we can read); bytes from the coordinator (shards) are exact.
"""

from __future__ import annotations

import os
from http.server import ThreadingHTTPServer

import torch
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from hivefold.netaddr import parse_host_port


class _PeerCollector(Collector):
    def __init__(self, trainer, traffic: dict):
        self.trainer, self.traffic = trainer, traffic

    def collect(self):
        t = self.trainer
        m, stats = t.meter, t.averaging.stats()

        def gauge(name: str, doc: str, value: float, labels: dict | None = None) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=list(labels or {}))
            g.add_metric(list((labels or {}).values()), float(value))
            return g

        def counter(name: str, doc: str, values: dict | float, label: str | None = None) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=[label] if label else None)
            for key, value in (values.items() if isinstance(values, dict) else [(None, values)]):
                c.add_metric([key] if label else [], float(value))
            return c

        yield gauge("hivefold_peer_samples_per_second", "Sequences per second this peer trains (moving average)",
                    m.samples_per_second)
        yield gauge("hivefold_peer_compute_utilization", "Share of wall time spent in forward, backward and the "
                    "optimizer since training started", m.utilization)
        yield counter("hivefold_peer_samples_trained", "Sequences this peer trained", m.samples_total)
        yield counter("hivefold_peer_compute_seconds", "Seconds spent computing", m.busy_seconds)
        yield gauge("hivefold_peer_step_seconds", "Seconds per micro-batch (forward, backward, optimizer), "
                    "moving average", t.micro_batch / m.samples_per_second if m.samples_per_second else 0.0)
        yield gauge("hivefold_peer_train_loss", "Training loss (moving average over micro-batches)", m.loss)
        yield gauge("hivefold_peer_global_step", "The swarm's step as this peer knows it", t.global_step)
        yield gauge("hivefold_peer_micro_batch", "Sequences per forward/backward pass on this device", t.micro_batch)
        if "last_round_seconds" in stats:  # diloco
            yield gauge("hivefold_peer_averaging_seconds", "The latest all-reduce round, matchmaking included",
                        stats["last_round_seconds"])
            yield counter("hivefold_peer_averaging_wait_seconds", "Seconds the device waited for an all-reduce",
                          stats["wait_seconds"])
            yield counter("hivefold_peer_averaging_rounds", "Outer rounds by outcome",
                          {"averaged": stats["rounds_ok"], "alone": stats["rounds_alone"]}, "outcome")
            yield counter("hivefold_peer_allreduce_bytes", "Bytes of all-reduce payload (estimated from the "
                          "compressed pseudo-gradient and the group size)",
                          {"sent": stats.get("bytes_sent", 0), "received": stats.get("bytes_received", 0)},
                          "direction")
        yield gauge("hivefold_peer_poisoners_caught", "Members this peer's guarded all-reduces caught poisoning "
                    "(reported to the coordinator)", stats.get("flagged", 0))
        yield counter("hivefold_peer_coordinator_bytes", "Bytes exchanged with the coordinator (shards, results)",
                      dict(self.traffic), "direction")
        yield gauge("hivefold_peer_device_memory_bytes", "Memory in use: the CUDA allocator's on a GPU, the "
                    "process's resident set on a CPU", _memory(t.device), {"device": t.device})


def _memory(device: str) -> float:
    if device.startswith("cuda") and torch.cuda.is_available():
        return float(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/statm") as f:
            return float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return 0.0


def start_metrics(listen: str, trainer, traffic: dict) -> tuple[ThreadingHTTPServer, int]:
    """Serve ``/metrics`` on ``listen`` (PORT or HOST:PORT; a bare port listens on every interface).

    ``traffic``: ``{"sent": bytes, "received": bytes}`` with the coordinator, kept up to date by the caller.
    """
    host, port = parse_host_port(listen if ":" in listen else f"0.0.0.0:{listen}", flag="--metrics-port")
    registry = CollectorRegistry()
    registry.register(_PeerCollector(trainer, traffic))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, server.server_address[1]
