"""Config validation: defaults give the embedded setup; bad files name the key and the reason."""

from __future__ import annotations

import subprocess
import sys

import pytest

from orchestrator.config import ConciliumConfig, ConfigError, load_config, parse_config


def test_no_file_gives_the_two_bundled_experts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CONCILIUM_CONFIG", raising=False)
    cfg = load_config()
    assert [(e.name, e.backend, e.source) for e in cfg.experts] == [
        ("smollm2", "transformers", "smollm2-135m-instruct"),
        ("gemma3", "transformers", "gemma3-270m"),
    ]
    assert cfg.ray.address is None


def test_a_full_expert_entry_parses():
    cfg = parse_config(
        {
            "pool": {"memory_budget_gb": {"cpu": 1.5}},
            "experts": [
                {
                    "name": "a", "backend": "transformers", "source": "smollm2-135m-instruct",
                    "dtype": "bfloat16", "device": "cpu", "num_gpus": 0.5, "max_batch_size": 8,
                    "generation": {"max_new_tokens": 32, "temperature": 0.7},
                    "cost_per_1k_tokens": 0.002, "tags": ["math"],
                },
                {"name": "b", "backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"},
                {"name": "c", "backend": "replay", "path": "/tmp/x", "model": "gpt"},
            ],
        }
    )
    a = cfg.expert("a")
    assert (a.dtype, a.num_gpus, a.generation.max_new_tokens, a.tags) == ("bfloat16", 0.5, 32, ["math"])
    assert cfg.pool.memory_budget_gb == {"cpu": 1.5}
    assert cfg.expert("c").num_cpus == 0.0


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"experts": [{"name": "a", "source": "x", "colour": 1}]}, "experts[0].colour: Extra inputs"),
        ({"experts": [{"name": "a", "source": "x", "max_batch_size": 0}]}, "experts[0].max_batch_size"),
        ({"experts": [{"name": "a", "backend": "tgi", "source": "x"}]}, "experts[0]: an expert must be a mapping whose 'backend' is one of transformers, vllm, openai, replay, simulated"),
        ({"experts": [{"name": "a", "backend": "vllm", "source": "x", "engine": {"tensor_parallel_size": 4}}]},
         "experts[0]: Value error, engine.tensor_parallel_size is 4: set num_gpus to 4"),
        ({"experts": [{"name": "a", "source": "x"}, {"name": "a", "source": "y"}]}, "expert name 'a' is used twice"),
        ({"experts": [{"name": "a", "source": "x", "num_gpus": 1.5}]}, "whole number of GPUs"),
        ({"experts": [{"name": "a", "source": "x", "dtype": "int3"}]}, "experts[0].dtype"),
        ({"experts": [{"name": "bad name!", "source": "x"}]}, "experts[0].name"),
        ({"experts": [{"name": "a", "backend": "openai", "model": "m"}]}, "experts[0].base_url: Field required"),
        ({"experts": []}, "experts: List should have at least 1 item"),
        ({"pool": {"memory_budget_gb": {"cpu": 0}}}, "budget for 'cpu' must be positive"),
        ({"rayy": {}}, "rayy: Extra inputs are not permitted"),
        ({"routing": {"aggregator": "gpt-9"}}, "routing.aggregator 'gpt-9' is not a configured expert"),
        ({"routing": {"aggregation": "median"}}, "routing.aggregation"),
        ({"routing": {"moa_layers": 0}}, "routing.moa_layers"),
    ],
)
def test_bad_config_names_key_and_reason(data, expected):
    with pytest.raises(ConfigError) as info:
        parse_config(data, "t.yaml")
    assert expected in str(info.value)
    assert str(info.value).startswith("t.yaml is not a valid Concilium config")


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("experts: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == ConciliumConfig()


def test_unknown_expert_lookup_lists_the_configured_ones():
    with pytest.raises(ConfigError, match="unknown expert 'zz'; configured experts: smollm2, gemma3"):
        ConciliumConfig().expert("zz")


def test_cli_rejects_a_malformed_config_without_traceback(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("experts:\n  - name: a\n    source: x\n    temperature: hot\n")
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "check-config", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "experts[0].temperature: Extra inputs are not permitted" in proc.stderr
    assert "Traceback" not in proc.stderr
    good = tmp_path / "g.yaml"
    good.write_text("experts:\n  - name: a\n    source: x\n")
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "check-config", str(good)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "1 experts (a)" in proc.stdout


def test_the_shipped_example_config_is_valid_and_matches_the_defaults():
    from pathlib import Path

    example = load_config(Path(__file__).resolve().parents[1] / "deploy" / "concilium.example.yaml")
    defaults = ConciliumConfig()
    assert [e.model_dump() for e in example.experts] == [e.model_dump() for e in defaults.experts]
    assert example.ray == defaults.ray and example.pool == defaults.pool and example.routing == defaults.routing
    assert example.server == defaults.server and example.cache == defaults.cache


def test_aggregator_preference_from_config_or_profile_ranking(tmp_path):
    from orchestrator import artifacts

    def preference(cfg):  # noqa: ANN001, ANN202
        folder = artifacts.latest(cfg.routing.profiles)
        return artifacts.aggregators(cfg, folder, artifacts.summary(folder) if folder else {})

    cfg = parse_config({"routing": {"profiles": str(tmp_path)}})
    assert preference(cfg) == ((), None)  # no profiles yet: the router's top-scored expert
    (tmp_path / "v1").mkdir()
    (tmp_path / "LATEST").write_text("v1\n")
    (tmp_path / "v1" / "summary.json").write_text('{"aggregator_ranking": ["gone", "gemma3", "smollm2"]}')
    ranking, source = preference(cfg)
    assert ranking == ("gemma3", "smollm2") and "aggregator ranking" in source  # unconfigured names dropped
    fixed = parse_config({"routing": {"profiles": str(tmp_path), "aggregator": "smollm2"}})
    assert preference(fixed) == (("smollm2",), "fixed in config (routing.aggregator)")


def test_an_expert_priced_per_1m_input_and_output_tokens():
    sim = {"name": "s", "backend": "simulated", "memory_gb": 0.1, "load_s": 0, "step_s": 0.01}
    priced = parse_config({"experts": [{**sim, "prices": {"input": 3.0, "output": 15.0}}]}).experts[0]
    assert (priced.price.input, priced.price.output) == (3e-6, 15e-6)
    assert priced.price.cost(1000, 100) == pytest.approx(0.0045)
    flat = parse_config({"experts": [{**sim, "cost_per_1k_tokens": 0.5}]}).experts[0]
    assert flat.price.input == flat.price.output == 0.0005
    with pytest.raises(ConfigError, match="set prices .* or cost_per_1k_tokens, not both"):
        parse_config({"experts": [{**sim, "cost_per_1k_tokens": 0.5, "prices": {"input": 1, "output": 1}}]})
