"""The coordinator's Prometheus metrics: the swarm as the ledger sees it, and how long each RPC takes.

The swarm's figures are read from the ledger at scrape time (a custom collector), so they are the
same numbers the dashboard and ``hivefold status`` show; the RPC latency histogram is filled by a
gRPC server interceptor. Each coordinator has its own registry, so several can live in one process.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# An RPC takes milliseconds (a lease) to minutes (a shard streamed over a slow link).
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)


class CoordinatorMetrics:
    """The registry behind ``/metrics``; ``interceptor()`` times the gRPC service into it."""

    def __init__(self, status: Callable[[], dict], counters: Callable[[], dict]):
        self.registry = CollectorRegistry()
        self.rpc_seconds = Histogram("hivefold_rpc_duration_seconds", "Time the coordinator took to answer an RPC "
                                     "(a streamed RPC: until its last message was handed to gRPC)", ["method"],
                                     buckets=RPC_BUCKETS, registry=self.registry)
        self.registry.register(_SwarmCollector(status, counters))

    def interceptor(self) -> grpc.ServerInterceptor:
        return _RpcTimer(self.rpc_seconds)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


class _SwarmCollector(Collector):
    def __init__(self, status: Callable[[], dict], counters: Callable[[], dict]):
        self._status, self._counters = status, counters

    def collect(self):
        s, totals = self._status(), self._counters()

        def gauge(name: str, doc: str, value, labels: dict | None = None):
            g = GaugeMetricFamily(name, doc, labels=list(labels or {}))
            if value is not None:
                g.add_metric(list((labels or {}).values()), float(value))
            return g

        yield gauge("hivefold_peers_online", "Peers heard from recently that have not left", s["peers_online"])
        yield gauge("hivefold_peers_registered", "Peers that ever registered with this run", len(s["peers"]))
        yield gauge("hivefold_peers_banned", "Peers banned from this run (by the operator, or on poisoning reports)",
                    sum(p.get("banned", False) for p in s["peers"]))
        yield gauge("hivefold_peers_reported", "Peers that at least one other peer caught poisoning the averaging",
                    sum(p.get("poison_reports", 0) > 0 for p in s["peers"]))
        v = s.get("verification")
        if v:
            checks = GaugeMetricFamily("hivefold_verifications", "Results sampled for a proof-of-training check, by "
                                       "state (awaiting_proof, queued, valid, invalid)", labels=["state"])
            for state in ("awaiting_proof", "queued", "valid", "invalid"):
                checks.add_metric([state], v[state])
            yield checks
            yield gauge("hivefold_verification_share", "Share of results checked by the keeper", v["share_checked"])
            yield gauge("hivefold_verification_keeper_seconds", "The keeper's mean time to check one result",
                        v["keeper_seconds_per_check"])
        shards = GaugeMetricFamily("hivefold_shards", "Work units of the current data pass by state", labels=["state"])
        for state, n in s["shards"].items():
            if state != "total":
                shards.add_metric([state], n)
        yield shards
        yield gauge("hivefold_global_step", "The swarm's step (outer step in diloco, optimizer step in sync)",
                    s["global_step"])
        yield gauge("hivefold_data_pass", "Data passes started over the run's shards", s["data_pass"])
        tokens = CounterMetricFamily("hivefold_tokens_trained", "Tokens in accepted results")
        tokens.add_metric([], s["tokens_trained"])
        yield tokens
        yield gauge("hivefold_samples_per_second", "Sequences per second the online peers report training",
                    s["samples_per_second"])
        yield gauge("hivefold_utilization", "Compute utilization of the swarm (online peers, weighted by throughput)",
                    s.get("utilization"))
        # No sample until there is a value: an absent series reads better in Grafana than a fake zero.
        yield gauge("hivefold_train_loss", "Mean training loss of the latest steps", s["train_loss"])
        yield gauge("hivefold_val_loss", "The keeper's latest validation loss", s["val_loss"])
        ckpt = s.get("checkpoint")
        yield gauge("hivefold_checkpoint_step", "Step of the latest checkpoint", ckpt["step"] if ckpt else None)
        eta = (s.get("data_pass_progress") or {}).get("eta_seconds")
        yield gauge("hivefold_data_pass_eta_seconds", "Seconds until the current data pass is trained, at this rate",
                    eta)
        budget = s.get("token_budget")
        yield gauge("hivefold_token_budget_tokens", "The operator's token budget (absent: none)",
                    budget["tokens"] if budget else None)
        yield gauge("hivefold_run_complete", "1 once the run is complete (token budget or data passes spent)",
                    1 if s.get("run_complete") else 0)
        expired = CounterMetricFamily("hivefold_leases_expired", "Leases whose deadline passed before a result")
        expired.add_metric([], totals["leases"].get("expired", 0))
        yield expired
        leases = CounterMetricFamily("hivefold_leases", "Leases issued, by state now", labels=["state"])
        for state, n in sorted(totals["leases"].items()):
            leases.add_metric([state], n)
        yield leases
        results = CounterMetricFamily("hivefold_results", "Results submitted, by verdict", labels=["verdict"])
        for verdict, n in sorted(totals["results"].items()):
            results.add_metric([verdict], n)
        yield results


class _RpcTimer(grpc.ServerInterceptor):
    def __init__(self, histogram: Histogram):
        self._histogram = histogram

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        observe = self._histogram.labels(method=method).observe
        if handler.unary_unary:
            inner = handler.unary_unary

            def unary(request, context):
                t0 = time.perf_counter()
                try:
                    return inner(request, context)
                finally:
                    observe(time.perf_counter() - t0)

            return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=handler.request_deserializer,
                                                       response_serializer=handler.response_serializer)
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            def stream(request, context):
                t0 = time.perf_counter()
                try:
                    yield from inner_stream(request, context)
                finally:
                    observe(time.perf_counter() - t0)

            return grpc.unary_stream_rpc_method_handler(stream, request_deserializer=handler.request_deserializer,
                                                        response_serializer=handler.response_serializer)
        return handler  # no streaming-request RPCs in this service
