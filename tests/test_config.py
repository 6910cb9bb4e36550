"""Fast tier: run configuration (selfplay/config/run.py): recipes, --set overrides, error messages, resume checks.

Everything here is pure apart from reading small YAML files under tmp_path and the shipped recipes; the
check_passthrough tests import trl/peft once (a few seconds) to compare against their real config classes.
"""

from __future__ import annotations

import random
from pathlib import Path

import pydantic
import pytest

from selfplay.config.backends import EndpointJudgeConfig, TransformersJudgeConfig, TransformersSampleConfig, VllmJudgeConfig
from selfplay.config.resume import flatten, result_differences, result_fields
from selfplay.config.run import (
    ConfigError,
    RunConfig,
    TrainConfig,
    check_passthrough,
    fingerprint,
    load_config,
    parse_overrides,
)

pytestmark = pytest.mark.unit

RECIPES = sorted((Path(__file__).resolve().parents[1] / "deployments" / "recipes").glob("*.yaml"))
JUDGES = sorted((Path(__file__).resolve().parents[1] / "deployments" / "recipes" / "judges").glob("*.yaml"))


# ---------------------------------------------------------------- unknown keys and wrong types

def test_unknown_top_level_key_names_it_and_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["roundz=3"])
    msg = str(err.value)
    assert "roundz: unknown key" in msg
    for key in RunConfig.model_fields:
        assert key in msg


def test_unknown_nested_key_names_the_dotted_key_and_its_section_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["sample.temprature=0.7"])
    msg = str(err.value)
    assert "sample.temprature: unknown key" in msg
    valid = msg.split("valid keys here:", 1)[1]
    assert set(k.strip(" )") for k in valid.split(",")) == set(TransformersSampleConfig.model_fields)


def test_unknown_key_in_a_recipe_file_is_named(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("judge:\n  margn: 0.1\n")
    with pytest.raises(ConfigError, match=r"judge\.margn: unknown key"):
        load_config(recipe)


def test_set_on_a_section_that_does_not_exist_is_an_error():
    with pytest.raises(ConfigError, match=r"nosuch: unknown key"):
        load_config(None, ["nosuch.key=1"])


@pytest.mark.parametrize("override,key", [
    ("sample.temperature=hot", "sample.temperature"),
    ("rounds=many", "rounds"),
    ("rounds=0", "rounds"),
    ("judge.pairing=round_robin", "judge.pairing"),
    ("judge.margin=1.5", "judge.margin"),
    ("filter.drop_truncated=[1]", "filter.drop_truncated"),
    ("name=bad name/", "name"),
])
def test_wrong_type_or_value_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert f"{key}:" in str(err.value)
    assert "got" in str(err.value)


def test_every_error_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["rounds=0", "sample.top_p=2", "evaluate.nope=1"])
    msg = str(err.value)
    assert "rounds:" in msg and "sample.top_p:" in msg and "evaluate.nope: unknown key" in msg


def test_assignment_is_validated_too():
    cfg = load_config(None)
    with pytest.raises(pydantic.ValidationError):
        cfg.sample.num_samples = 1  # ge=2


# ---------------------------------------------------------------- overrides

def test_parse_overrides_parses_yaml_scalars_lists_and_dotted_keys():
    tree = parse_overrides([
        "rounds=3", "sample.temperature=0.7", "filter.drop_truncated=false", "train.lora.target_modules=[q_proj, v_proj]",
        "train.dpo.beta=0.25", "name=my-run", "prompts.messages_column=", "judge.template=null", "a.b.c.d=1",
    ])
    assert tree == {
        "rounds": 3,
        "sample": {"temperature": 0.7},
        "filter": {"drop_truncated": False},
        "train": {"lora": {"target_modules": ["q_proj", "v_proj"]}, "dpo": {"beta": 0.25}},
        "name": "my-run",
        "prompts": {"messages_column": ""},
        "judge": {"template": None},
        "a": {"b": {"c": {"d": 1}}},
    }
    assert isinstance(tree["rounds"], int) and isinstance(tree["sample"]["temperature"], float)


def test_later_overrides_win_and_values_may_contain_equals():
    assert parse_overrides(["rounds=2", "rounds=5"]) == {"rounds": 5}
    assert parse_overrides(["judge.system_prompt=a=b"]) == {"judge": {"system_prompt": "a=b"}}


@pytest.mark.parametrize("bad", ["rounds", "=3", " =3"])
def test_malformed_override_is_an_error(bad):
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_overrides([bad])


def test_a_value_used_as_a_section_is_an_error():
    with pytest.raises(ConfigError, match="rounds is set to a value and used as a section"):
        parse_overrides(["rounds=3", "rounds.x=1"])


def test_parse_overrides_reads_exponent_floats_as_numbers():
    tree = parse_overrides(["train.dpo.learning_rate=1e-5", "sample.temperature=7E-1"])
    assert tree == {"train": {"dpo": {"learning_rate": 1e-5}}, "sample": {"temperature": 0.7}}


def test_overrides_apply_on_top_of_a_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: base\nsample:\n  temperature: 0.9\n  top_p: 0.5\ntrain:\n  dpo: {beta: 0.1}\n")
    cfg = load_config(recipe, ["sample.temperature=0.3", "train.dpo.loss_type=ipo"])
    assert cfg.name == "base"
    assert (cfg.sample.temperature, cfg.sample.top_p) == (0.3, 0.5)
    assert cfg.train.dpo == {"beta": 0.1, "loss_type": "ipo"}
    assert cfg.run_dir == Path("runs") / "base"


def test_defaults_without_a_recipe():
    cfg = load_config(None)
    assert cfg == RunConfig()
    assert cfg.rounds == 2 and cfg.policy.model == "bundled"


# ---------------------------------------------------------------- recipe files

@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_loads(recipe):
    cfg = load_config(recipe)
    assert cfg.name and cfg.rounds >= 1
    assert cfg.train.dpo  # the recipes state their DPO settings explicitly


def test_recipes_are_shipped():
    assert {p.name for p in RECIPES} >= {"cpu-demo.yaml", "gpu-1x-8b.yaml"}


def test_missing_recipe_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe not found: .*nope\.yaml.*deployments/recipes"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text,kind", [("- a\n- b\n", "list"), ("just a string\n", "str"), ("42\n", "int")])
def test_non_mapping_recipe_is_a_clear_error(tmp_path, text, kind):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError, match=rf"must be a mapping of sections, got {kind}"):
        load_config(recipe)


def test_invalid_yaml_is_a_clear_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sample: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(recipe)


def test_an_empty_recipe_is_refused_saying_every_setting_would_be_the_default(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# nothing here\n")
    with pytest.raises(ConfigError, match=r"r.yaml is empty: it sets nothing, so every setting would be its default"):
        load_config(recipe)
    assert load_config(None) == RunConfig()  # no recipe at all: the defaults, as --set alone asks


# ---------------------------------------------------------------- resume checks and fingerprints

def test_result_differences_ignore_non_result_fields():
    old = load_config(None)
    new = load_config(None, ["rounds=9", "name=other", "output_dir=/elsewhere", "train.min_pairs=99"])
    assert not {"rounds", "name", "output_dir", "train.min_pairs"} & set(result_fields(old))
    assert result_differences(old, new) == []


def test_a_resume_may_change_how_the_endpoint_is_reached_but_not_which_judge():
    endpoint = ["judge.backend=endpoint", "judge.endpoint.base_url=http://x/v1", "judge.endpoint.model=m"]
    old = load_config(None, endpoint)
    transport = load_config(None, endpoint + ["judge.endpoint.timeout=300", "judge.endpoint.max_retries=9",
                                              "judge.endpoint.api_key_secret=key", "judge.max_error_rate=0.5"])
    assert result_differences(old, transport) == []
    other_judge = load_config(None, endpoint[:2] + ["judge.endpoint.model=other"])
    assert result_differences(old, other_judge) == ["judge.endpoint.model: 'm' -> 'other'"]


def test_result_differences_report_old_and_new_values():
    old = load_config(None)
    new = load_config(None, ["sample.temperature=0.5", "rounds=9", "judge.margin=0.2"])
    assert result_differences(old, new) == ["judge.margin: 0.1 -> 0.2", "sample.temperature: 0.8 -> 0.5"]


def test_result_differences_see_passthrough_dicts():
    old = load_config(None)
    new = load_config(None, ["train.dpo.beta=0.3", "train.lora.r=8"])
    diffs = result_differences(old, new)
    assert "train.dpo.beta: '<unset>' -> 0.3" in diffs
    assert any(d.startswith("train.lora.r: 16 -> 8") for d in diffs)
    assert result_differences(new, new) == []


def test_fingerprint_is_key_order_independent():
    rng = random.Random(0)
    for _ in range(100):
        items = [(f"k{i}", rng.choice([rng.random(), rng.randint(0, 9), "s", None, [1, 2], {"x": rng.random()}]))
                 for i in range(rng.randint(1, 8))]
        shuffled = items[:]
        rng.shuffle(shuffled)
        assert fingerprint(dict(items)) == fingerprint(dict(shuffled))


def test_fingerprint_changes_when_a_value_changes():
    base = load_config(None).model_dump(mode="json")
    fp = fingerprint(base)
    assert len(fp) == 16 and all(c in "0123456789abcdef" for c in fp)
    changed = load_config(None, ["sample.temperature=0.81"]).model_dump(mode="json")
    assert fingerprint(changed) != fp
    assert fingerprint({"a": 1}) != fingerprint({"a": 2}) != fingerprint({"b": 2})
    assert fingerprint(load_config(None).model_dump(mode="json")) == fp


# ---------------------------------------------------------------- passthrough to trl / peft (imports them)

def test_check_passthrough_accepts_real_dpo_and_lora_fields():
    check_passthrough(TrainConfig(dpo={"beta": 0.2, "loss_type": "ipo", "learning_rate": 1e-5}))
    check_passthrough(TrainConfig(lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}))
    check_passthrough(TrainConfig())


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_passes_the_passthrough_check(recipe):
    check_passthrough(load_config(recipe).train)


def test_check_passthrough_rejects_unknown_dpo_key_naming_it():
    with pytest.raises(ConfigError, match=r"train\.dpo\.betta: not a trl\.DPOConfig field"):
        check_passthrough(TrainConfig(dpo={"beta": 0.1, "betta": 0.1}))


def test_check_passthrough_rejects_the_output_dir_we_manage():
    with pytest.raises(ConfigError, match=r"train\.dpo\.output_dir: set by selfplay itself"):
        check_passthrough(TrainConfig(dpo={"output_dir": "/tmp/elsewhere"}))


def test_check_passthrough_rejects_unknown_lora_key_naming_it():
    with pytest.raises(ConfigError, match=r"train\.lora\.rank: not a peft\.LoraConfig field"):
        check_passthrough(TrainConfig(lora={"rank": 8}))


def test_an_endpoint_sampler_over_several_rounds_needs_adapter_checkpoints():
    endpoint = ["sample.backend=endpoint", "sample.endpoint.base_url=http://x/v1", "sample.endpoint.model=m"]
    with pytest.raises(ConfigError, match=r"keep sampling the base model\. Set train\.merge=false"):
        load_config(None, endpoint + ["rounds=2"])
    assert load_config(None, endpoint + ["rounds=1"]).train.merge  # one round samples the base anyway
    assert not load_config(None, endpoint + ["rounds=3", "train.merge=false"]).train.merge


def test_launcher_options_belong_to_accelerate():
    with pytest.raises(ConfigError, match="apply to kind 'accelerate' only"):
        load_config(None, ["train.launcher.num_processes=4"])
    cfg = load_config(None, ["train.launcher.kind=accelerate", "train.launcher.config_file=deployments/accelerate/zero3.yaml"])
    assert cfg.train.launcher.num_processes is None
    with pytest.raises(ConfigError, match="train.quantization"):
        load_config(None, ["train.quantization=8bit"])


def test_a_resume_may_lower_a_servers_gpu_memory_share():
    served = ["sample.backend=vllm", "judge.backend=vllm"]
    old = load_config(None, served)
    new = load_config(None, served + ["sample.server.gpu_memory_utilization=0.6", "judge.server.gpu_memory_utilization=0.5"])
    assert result_differences(old, new) == []
    assert result_differences(old, load_config(None, served + ["sample.server.max_model_len=2048"])) == [
        "sample.server.max_model_len: None -> 2048"]


def test_a_change_of_backend_is_a_result_difference_and_only_shared_settings_are_compared():
    old = load_config(None)  # transformers sampler and judge
    served = ["judge.backend=vllm"]
    assert result_differences(load_config(None, served), load_config(None, served + ["judge.server.max_model_len=2048"])) == [
        "judge.server.max_model_len: None -> 2048"]
    assert result_differences(old, load_config(None, served)) == ["judge.backend: 'transformers' -> 'vllm'"]
    assert result_differences(old, load_config(None, served + ["judge.model=/judge", "judge.margin=0.3"])) == [
        "judge.backend: 'transformers' -> 'vllm'", "judge.margin: 0.1 -> 0.3", "judge.model: 'reference' -> '/judge'"]


# Which settings a resume may change, as they were before each field declared it (the list NON_RESULT_FIELDS
# that selfplay/config/run.py kept by hand): the fields marked operational must stay exactly these.
OPERATIONAL_BEFORE = {
    "name", "output_dir", "rounds", "isolation", "cluster_gpu_limit", "train.min_pairs", "train.launcher.args",
    "train.share_prompt",  # the same log-probabilities and gradients, within rounding
    "gate.early_stop_after", "judge.max_error_rate", "judge.cache", "judge.batch_size", "judge.max_concurrency",
    "judge.request_timeout",
    "sample.server_scope", "judge.server_scope",  # one kept server or one per stage: the same engine, the same answers
    *(f"{section}.endpoint.{field}" for section in ("judge", "sample") for field in (
        "timeout", "max_concurrency", "max_retries", "api_key_env", "api_key_secret", "price_input_per_mtok", "price_output_per_mtok")),
    *(f"{section}.server.{field}" for section in ("sample", "judge") for field in (
        "command", "host", "port", "container_port", "startup_timeout", "stop_timeout", "gpu_free_timeout", "env", "cwd",
        "gpu_memory_utilization")),
}
EVERY_BACKEND = [
    [],
    ["sample.backend=vllm", "judge.backend=vllm"],
    ["sample.backend=endpoint", "sample.endpoint.base_url=http://x/v1", "sample.endpoint.model=m", "rounds=1",
     "judge.backend=endpoint", "judge.endpoint.base_url=http://y/v1", "judge.endpoint.model=j"],
]


@pytest.mark.parametrize("overrides", EVERY_BACKEND, ids=["transformers", "vllm", "endpoint"])
def test_the_fields_a_resume_may_change_are_declared_on_the_fields_and_unchanged(overrides):
    cfg = load_config(None, overrides)
    keys = set(flatten(cfg.model_dump(mode="json")))
    assert keys - set(result_fields(cfg)) == OPERATIONAL_BEFORE & keys


def test_the_run_form_shows_one_backend_per_section_chosen_by_its_name():
    """Prefect builds the `dpo-round` flow's form from RunConfig's schema: `sample` and `judge` are a choice of
    backend models, tagged by `backend`, each with only its own fields; operational fields say so in the schema."""
    from prefect.utilities.callables import parameter_schema

    from flows.dpo_round import dpo_round

    schema = parameter_schema(dpo_round).model_dump()
    definitions = schema["definitions"]
    for section, prefix in (("sample", "Sample"), ("judge", "Judge")):
        prop = definitions["RunConfig"]["properties"][section]
        choices = prop.get("oneOf") or prop.get("anyOf")
        assert prop["discriminator"]["propertyName"] == "backend"
        assert set(prop["discriminator"]["mapping"]) == {"transformers", "vllm", "endpoint"}
        assert len(choices) == 3
        assert {"server"} <= set(definitions[f"Vllm{prefix}Config"]["properties"]) and "endpoint" not in definitions[f"Vllm{prefix}Config"]["properties"]
        assert {"server", "endpoint"}.isdisjoint(definitions[f"Transformers{prefix}Config"]["properties"])
        assert "server" not in definitions[f"Endpoint{prefix}Config"]["properties"]
    assert "batch_size" in definitions["TransformersJudgeConfig"]["properties"]
    assert {"mode", "max_concurrency"}.isdisjoint(definitions["TransformersJudgeConfig"]["properties"])
    assert definitions["EndpointConfig"]["properties"]["timeout"]["affects_results"] is False
    assert "affects_results" not in definitions["EndpointConfig"]["properties"]["model"]


# ---------------------------------------------------------------- backends: older spellings and misplaced settings

def test_the_judges_old_backend_names_load_as_the_new_ones(tmp_path, caplog):
    recipe = tmp_path / "old.yaml"
    recipe.write_text("judge:\n  backend: local\n  batch_size: 16\n")
    with caplog.at_level("WARNING", logger="selfplay.config.backends"):
        cfg = load_config(recipe)
    assert isinstance(cfg.judge, TransformersJudgeConfig) and cfg.judge.batch_size == 16
    assert "judge.backend 'local' is now spelled 'transformers'" in caplog.text
    cfg = load_config(None, ["judge.backend=openai", "judge.endpoint.base_url=http://x/v1", "judge.endpoint.model=m"])
    assert isinstance(cfg.judge, EndpointJudgeConfig) and cfg.judge.backend == "endpoint"


@pytest.mark.parametrize("overrides,message", [
    (["judge.server.max_model_len=2048"], "judge.server: read only with judge.backend: vllm, and this judge has backend 'transformers'"),
    (["judge.mode=text"], "judge.mode: read only with judge.backend: vllm or judge.backend: endpoint"),
    (["judge.backend=vllm", "judge.batch_size=4"], "judge.batch_size: read only with judge.backend: transformers, and this judge has backend 'vllm'"),
    (["sample.server.tensor_parallel_size=4"], "sample.server: read only with sample.backend: vllm"),
    (["judge.backend=openai", "judge.endpoint.base_url=http://x/v1", "judge.endpoint.model=m", "judge.max_concurrency=8"],
     "judge.max_concurrency: read only with judge.backend: vllm, and this judge has backend 'endpoint'"),
    (["judge.backend=gpt"], "judge.backend: 'gpt' is not a backend (choose one of transformers, vllm, endpoint)"),
])
def test_a_setting_of_another_backend_fails_naming_the_backend_that_reads_it(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(f"invalid configuration: {message}")
    assert "\n" not in str(err.value)


def test_another_backends_setting_left_at_its_default_is_dropped():
    """What older versions wrote for every backend (run.json recorded all of them)."""
    judge = {"backend": "local", "model": "reference", "endpoint": None, "mode": "auto", "max_concurrency": 64,
             "server": VllmJudgeConfig().server.model_dump(mode="json"), "cache": True}
    cfg = RunConfig.model_validate({"judge": judge, "sample": {"backend": "transformers", "endpoint": None}})
    assert cfg == RunConfig()


def test_a_recorded_run_from_before_the_split_resumes_whatever_it_set_for_unused_backends():
    old = {"judge": {"backend": "local", "endpoint": None, "max_concurrency": 8, "server": {"max_model_len": 2048}},
           "sample": {"backend": "transformers", "server": {"tensor_parallel_size": 4}}}
    with pytest.raises(ValueError, match="judge.max_concurrency: read only with judge.backend: vllm"):
        RunConfig.model_validate(old)
    recorded = RunConfig.model_validate(old, context={"recorded": True})  # as rundir.open_run reads run.json
    assert result_differences(recorded, load_config(None)) == []


@pytest.mark.parametrize("judge", JUDGES, ids=[p.name for p in JUDGES])
@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_a_judge_overlay_replaces_the_recipes_judge_backend(recipe, judge):
    cfg = load_config([recipe, judge])
    assert isinstance(cfg.judge, EndpointJudgeConfig)
    assert cfg.judge.margin == load_config(judge).judge.margin  # the overlay's own settings win


def test_switching_a_backend_with_set_leaves_the_old_backends_settings_behind():
    gpu = RECIPES[[p.name for p in RECIPES].index("gpu-1x-8b.yaml")]
    cfg = load_config(gpu, ["judge.backend=vllm"])
    assert isinstance(cfg.judge, VllmJudgeConfig) and cfg.judge.model == "reference" and cfg.judge.margin == 0.1
    assert load_config(gpu, ["judge.backend=local"]).judge.batch_size == 16  # the same backend, old spelling: kept


# ---------------------------------------------------------------- train.lora values PEFT takes now and refuses later

@pytest.mark.parametrize("override,key", [
    ("train.lora.r=-1", "train.lora.r"),
    ("train.lora.r=0", "train.lora.r"),
    ("train.lora.r=1.5", "train.lora.r"),
    ("train.lora.lora_alpha=0", "train.lora.lora_alpha"),
    ("train.lora.lora_alpha=-8", "train.lora.lora_alpha"),
    ("train.lora.lora_dropout=1", "train.lora.lora_dropout"),
    ("train.lora.lora_dropout=-0.1", "train.lora.lora_dropout"),
    ("train.lora.target_modules=[]", "train.lora.target_modules"),
])
def test_lora_values_peft_would_refuse_in_the_train_stage_fail_at_load(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert msg.startswith(f"invalid configuration: {key}: ") and "got" in msg
    assert "\n" not in msg  # one error, one line


def test_lora_settings_pass_through_as_written():
    cfg = load_config(None, ["train.lora.lora_alpha=16", "train.lora.lora_dropout=0", "train.lora.use_rslora=true"])
    assert cfg.train.lora == {"lora_alpha": 16, "lora_dropout": 0, "use_rslora": True}
    assert type(cfg.train.lora["lora_alpha"]) is int  # not turned into 16.0: a resume compares the saved config
    assert load_config(None, ["train.lora.target_modules=[q_proj]"]).train.lora["target_modules"] == ["q_proj"]
    assert TrainConfig(lora={"r": 8}).lora == {"r": 8}  # nothing filled in that the recipe did not set


def test_the_flows_judge_endpoint_parameters_switch_the_recipes_judge_to_an_endpoint():
    from flows.self_play import typed_updates

    updates = typed_updates(judge_base_url="http://judge:8000/v1", judge_model="j", judge_api_key_secret="key")
    cfg = load_config(RECIPES[[p.name for p in RECIPES].index("cpu-demo.yaml")], updates=updates)
    assert isinstance(cfg.judge, EndpointJudgeConfig)
    assert (cfg.judge.endpoint.base_url, cfg.judge.endpoint.model, cfg.judge.endpoint.api_key_secret) == ("http://judge:8000/v1", "j", "key")
    assert cfg.judge.margin == 0.01  # the recipe's settings every judge reads are kept
