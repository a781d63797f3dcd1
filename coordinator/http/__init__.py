"""The coordinator's HTTP side (dashboard, JSON API, ``/metrics``); see ``server.py``."""

from coordinator.http.server import make_metrics, start_http

__all__ = ["make_metrics", "start_http"]
