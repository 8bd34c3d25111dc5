"""The server's counters, and their Prometheus text summed over one or more processes (`--workers`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Metrics:
    requests: Counter = field(default_factory=Counter)  # by endpoint and status
    expert_requests: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_sum: float = 0.0
    routing_sum: float = 0.0
    completed: int = 0

    def finished(self, endpoint: str, new_tokens: int, seconds: float) -> None:
        self.completion_tokens += new_tokens
        self.requests[(endpoint, 200)] += 1
        self.latency_sum += seconds
        self.completed += 1

    def snapshot(self, gauges: dict) -> dict:
        """This process's counters as JSON (what `--workers` sums across processes); gauges: the engine's
        resident_experts, expert_loads and batched_rows."""
        return {"requests": [[e, s, n] for (e, s), n in sorted(self.requests.items())],
                "expert_requests": {str(k): n for k, n in self.expert_requests.items()},
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "latency_sum": self.latency_sum, "routing_sum": self.routing_sum, "completed": self.completed,
                **gauges}


def render_metrics(snapshots: list[dict]) -> str:
    """Prometheus text of the sum of one or more processes' snapshots."""
    requests, experts, totals = Counter(), Counter(), Counter()
    for snap in snapshots:
        requests.update({(e, int(s)): n for e, s, n in snap["requests"]})
        experts.update({int(k): n for k, n in snap["expert_requests"].items()})
        totals.update({k: v for k, v in snap.items() if k not in ("requests", "expert_requests")})
    lines = ["# TYPE smalltalk_requests_total counter"]
    lines += [f'smalltalk_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(requests.items())]
    lines += ["# TYPE smalltalk_expert_requests_total counter"]
    lines += [f'smalltalk_expert_requests_total{{expert="{k}"}} {n}' for k, n in sorted(experts.items())]
    lines += [f"smalltalk_prompt_tokens_total {totals['prompt_tokens']}",
              f"smalltalk_completion_tokens_total {totals['completion_tokens']}",
              f"smalltalk_request_latency_seconds_sum {totals['latency_sum']:.6f}",
              f"smalltalk_request_latency_seconds_count {totals['completed']}",
              f"smalltalk_routing_seconds_sum {totals['routing_sum']:.6f}",
              f"smalltalk_resident_experts {totals['resident_experts']}",
              f"smalltalk_expert_loads_total {totals['expert_loads']}",
              f"smalltalk_batched_rows {totals['batched_rows']}",
              f"smalltalk_workers {len(snapshots)}"]
    return "\n".join(lines) + "\n"
