"""Stats per key and model and their Prometheus rendering."""

from __future__ import annotations

from simulator.model.stats import mask_key, render_prometheus
from tests.simulator.model.sim_model_helpers import admitted, chat, provider


def test_stats_and_prometheus_text() -> None:
    p = provider("""
name: t
models: {m: {input_usd_per_mtok: 1.0, output_usd_per_mtok: 1.0}}
keys: {sk-tenant-0001: {balance_usd: 1.0}}
limits: {rpm: 1}
count_refused: false
responder: {output_tokens: 10}
""")
    adm = admitted(p.chat(0.0, "sk-tenant-0001", chat()))
    p.chat(0.0, "sk-tenant-0001", chat())  # 429
    assert adm.plan is not None
    p.finish(1.0, adm, 10)
    stats = p.stats()
    entry = stats["keys"]["sk-tenant-0001"]
    assert entry["models"]["m"] == {"requests": {"200": 1, "429": 1}, "prompt_tokens": 8,
                                    "completion_tokens": 10, "usd": 0.000018}
    assert entry["balance_usd"] == 1.0 - 0.000018
    text = render_prometheus([stats])
    base = 'provider="t",key="sk-...0001",model="m"'
    assert f'ratelab_requests_total{{{base},status="429"}} 1' in text
    assert f'ratelab_tokens_total{{{base},kind="completion"}} 10' in text
    assert 'ratelab_gpu_queue{provider="t"} 0' in text
    assert "sk-tenant-0001" not in text
    assert text.count("# TYPE") == 6
    assert mask_key("short") == "short"
