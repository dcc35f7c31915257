"""Prometheus metrics in the text exposition format, named as vLLM names them (prefix `nemotron:`,
label `model_name`), so existing dashboards work with the prefix swapped."""

from __future__ import annotations

import threading

# vLLM's latency buckets (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                    for k, v in labels.items())
    return "{" + body + "}"


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1
        self.sum += value
        self.count += 1


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.labels = {"model_name": model_name}
        self.lock = threading.Lock()
        self.counters: dict[str, float] = {}
        self.labelled: dict[tuple[str, str], float] = {}   # (name, finished_reason) -> count
        self.hist = {"time_to_first_token_seconds": Histogram(TTFT_BUCKETS),
                     "inter_token_latency_seconds": Histogram(ITL_BUCKETS),
                     "e2e_request_latency_seconds": Histogram(E2E_BUCKETS),
                     "request_queue_time_seconds": Histogram(E2E_BUCKETS)}

    def inc(self, name: str, value: float = 1.0) -> None:
        with self.lock:
            self.counters[name] = self.counters.get(name, 0.0) + value

    def finished(self, reason: str) -> None:
        with self.lock:
            key = ("request_success_total", reason)
            self.labelled[key] = self.labelled.get(key, 0.0) + 1

    def observe(self, name: str, value: float) -> None:
        with self.lock:
            self.hist[name].observe(value)

    def render(self, gauges: dict[str, float], counters: dict[str, float] | None = None) -> str:
        """The exposition text; `gauges` and `counters` are read at scrape time from the engine."""
        lab = _labels(self.labels)
        lines: list[str] = []
        with self.lock:
            for name, value in sorted(gauges.items()):
                lines += [f"# TYPE nemotron:{name} gauge", f"nemotron:{name}{lab} {value}"]
            for name, value in sorted({**self.counters, **(counters or {})}.items()):
                lines += [f"# TYPE nemotron:{name} counter", f"nemotron:{name}{lab} {value}"]
            if self.labelled:
                lines.append("# TYPE nemotron:request_success_total counter")
                for (name, reason), value in sorted(self.labelled.items()):
                    lines.append(f"nemotron:{name}{_labels({**self.labels, 'finished_reason': reason})} {value}")
            for name, h in self.hist.items():
                lines.append(f"# TYPE nemotron:{name} histogram")
                for edge, count in zip(h.buckets, h.counts):
                    lines.append(f"nemotron:{name}_bucket{_labels({**self.labels, 'le': repr(float(edge))})} {count}")
                lines.append(f"nemotron:{name}_bucket{_labels({**self.labels, 'le': '+Inf'})} {h.count}")
                lines.append(f"nemotron:{name}_sum{lab} {h.sum}")
                lines.append(f"nemotron:{name}_count{lab} {h.count}")
        return "\n".join(lines) + "\n"
