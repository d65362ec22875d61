"""Prometheus metrics of a real TorchServe: after known traffic, the counts match what was sent.

TorchServe's own per-model counters (requests, summed latency and queue time) and the handler's
(answers by top-1 label, refused inputs by kind) are read from the metrics endpoint and parsed with
prometheus_client's text parser, as a Prometheus server would.
"""

from __future__ import annotations

import time
from collections import Counter

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.images import encode, sample

MODEL = "efficientnet_lite0"
SETTLE_S = 30.0  # worker metrics reach the frontend as log lines, shortly after the answer


def scrape(server) -> dict[str, dict[tuple, float]]:
    """{metric family: {sorted label items: value}} of the metrics endpoint (no key needed: read-only).

    The parser names a counter family without its "_total" (ts_inference_requests_total is family
    ts_inference_requests) and gives every counter sample a "_total" name, so families are the keys.
    """
    response = requests.get(server.metrics_url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k.lower() != "hostname"))
            samples.setdefault(family.name, {})[labels] = s.value
    return samples


def by(samples: dict, name: str, *keys: str) -> dict[tuple, float]:
    """A metric's values keyed by the given label values (other labels summed over)."""
    totals: dict[tuple, float] = Counter()
    for labels, value in samples.get(name, {}).items():
        as_dict = dict(labels)
        totals[tuple(as_dict.get(k) for k in keys)] += value
    return dict(totals)


def test_counts_match_known_traffic(torchserve_factory, efficientnet_archive):
    server = torchserve_factory([efficientnet_archive], models=f"{MODEL}={efficientnet_archive.name}")
    good = [encode(sample(name), "JPEG", quality=90) for name in ("coffee.png", "chelsea.png", "rocket.jpg")]
    truncated = good[0][: len(good[0]) // 3]
    bad = {"empty": [b"", b""], "not_an_image": [b"%PDF-1.4 definitely not a photo"], "corrupt": [truncated]}

    top1 = Counter()
    sent = Counter()  # by version as TorchServe labels it: the URL's version, "default" without one
    for index in range(5):
        version = "1.0" if index % 2 else None
        response = server.predict(MODEL, good[index % len(good)], version=version)
        assert response.status_code == 200, response.text
        top1[response.json()[0]["label"]] += 1
        sent[version or "default"] += 1
    for kind, bodies in bad.items():
        for body in bodies:
            response = server.predict(MODEL, body)
            assert 400 <= response.status_code < 500, (kind, response.status_code)
            sent["default"] += 1

    expected_bad = {(MODEL, "1.0", kind): float(len(bodies)) for kind, bodies in bad.items()}
    expected_top1 = {(MODEL, "1.0", label): float(n) for label, n in top1.items()}
    deadline = time.monotonic() + SETTLE_S
    while True:  # bounded: the counters only ever grow, so wait until they reach the traffic sent
        samples = scrape(server)
        handler_seen = (by(samples, "PredictionsByLabel", "ModelName", "ModelVersion", "Label"),
                        by(samples, "BadInputs", "ModelName", "ModelVersion", "Kind"))
        if handler_seen == (expected_top1, expected_bad) or time.monotonic() > deadline:
            break
        time.sleep(0.5)

    # The handler's own counters: the real archive version, one series per top-1 label and bad kind.
    assert handler_seen[0] == expected_top1
    assert handler_seen[1] == expected_bad
    # TorchServe's per model and version: every request (bad ones too), latency and queue time sums.
    requests_total = by(samples, "ts_inference_requests", "model_name", "model_version")
    assert requests_total == {(MODEL, version): float(n) for version, n in sent.items()}
    for name in ("ts_inference_latency_microseconds", "ts_queue_latency_microseconds"):
        totals = by(samples, name, "model_name", "model_version")
        assert set(totals) == set(requests_total), name
        assert all(value > 0 for value in totals.values()), (name, totals)
    latency = by(samples, "ts_inference_latency_microseconds", "model_name", "model_version")
    # A mean latency between 1 ms and 60 s per request: the sums are in microseconds, as named.
    for key, count in requests_total.items():
        assert 1e3 < latency[key] / count < 60e6, (key, latency[key], count)
