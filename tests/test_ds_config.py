"""The DeepSpeed config: generated from ours; ``train.deepspeed`` may add keys but not set ours twice."""
import pytest

from hpdm.config import ConfigError, load_config
from hpdm.ds_config import deepspeed_config


def test_generated_from_our_fields_with_nested_pass_through():
    cfg = load_config("configs/tiny.yaml", ["train.batch_size=8", "train.micro_batch=2", "train.optimizer=adamw",
                                            "train.zero_stage=2", "train.deepspeed={zero_optimization: {overlap_comm: true}}"])
    ds = deepspeed_config(cfg, world=2)
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}


@pytest.mark.parametrize("override,field", [
    ("{zero_optimization: {stage: 3}}", "train.zero_stage"),  # would run ZeRO-3 and be recorded as 0
    ("{train_batch_size: 64}", "train.batch_size"),
    ("{bf16: {enabled: true}}", "train.precision"),
    ("{bfloat16: {enabled: true}}", "train.precision"),  # taken, recorded in deepspeed.json, and the run was fp32
    ("{optimizer: {type: Adam}}", "train.optimizer"),
    ("{torch_autocast: {enabled: true, dtype: bfloat16}}", "train.precision"),  # changed the losses of an fp32 run
])
def test_keys_that_hpdm_sets_are_refused_with_the_field_to_use(override, field):
    cfg = load_config("configs/tiny.yaml", [f"train.deepspeed={override}"])
    with pytest.raises(ConfigError, match=f"set by hpdm from {field}") as e:
        deepspeed_config(cfg, world=1)
    assert e.value.key.startswith("train.deepspeed.")


def test_batch_not_divisible_names_the_key():
    cfg = load_config("configs/tiny.yaml", ["train.batch_size=6", "train.micro_batch=4"])
    with pytest.raises(ConfigError, match="train.batch_size: 6 is not a multiple"):
        deepspeed_config(cfg, world=1)


@pytest.mark.parametrize("override,said", [
    ("{zero_optimization: true}", "zero_optimization: must be a mapping"),  # DeepSpeed read it as stage 1, recorded 0
    ("{zero_optimization: {offload_optimizer: {device: cpu}}}", "zero_optimization.offload_optimizer: not supported"),  # a traceback
    # DeepSpeed's section configures deepspeed.checkpointing, which the model never calls: it did nothing
    ("{activation_checkpointing: {partition_activations: true}}",
     "activation_checkpointing: not supported: .* set train.activation_checkpointing: true"),
])
def test_what_would_change_the_run_behind_our_back_is_refused(override, said):
    cfg = load_config("configs/tiny.yaml", ["train.zero_stage=2", f"train.deepspeed={override}"])
    with pytest.raises(ConfigError, match=f"^train.deepspeed.{said}"):
        deepspeed_config(cfg, world=1)


def test_an_indivisible_batch_says_what_the_user_set():
    cfg = load_config("configs/tiny.yaml", ["train.batch_size=5"])
    with pytest.raises(ConfigError, match=r"not a multiple of the 2 processes \(train.micro_batch is unset"):
        deepspeed_config(cfg, world=2)


@pytest.mark.parametrize("override,said", [
    ("{zero_optimisation: {overlap_comm: true}}", "zero_optimisation: not a key of DeepSpeed .*did you mean "
                                                  "zero_optimization"),  # ignored by DeepSpeed: ZeRO's defaults ran
    ("{wall_clock_breakdwon: true}", "wall_clock_breakdwon: .*did you mean wall_clock_breakdown"),
    ("{no_such_thing: 1}", "no_such_thing: not a key of DeepSpeed .*configuration docs"),
    # a section that DeepSpeed parses without refusing unknown keys: the profiler silently never ran
    ("{flops_profiler: {enabeld: true}}", "flops_profiler.enabeld: .*did you mean flops_profiler.enabled"),
])
def test_a_top_level_key_that_deepspeed_ignores_is_refused(override, said):
    cfg = load_config("configs/tiny.yaml", [f"train.deepspeed={override}"])
    with pytest.raises(ConfigError, match=f"^train.deepspeed.{said}"):
        deepspeed_config(cfg, world=1)


def test_the_keys_deepspeed_reads_are_recorded_from_deepspeed_itself():
    from hpdm.ds_config import deepspeed_keys

    keys = deepspeed_keys()  # what the installed DeepSpeed reads, so a newer one's keys pass without a list here
    assert {"zero_optimization", "activation_checkpointing", "flops_profiler", "wandb", "steps_per_print",
            "wall_clock_breakdown", "comms_logger", "optimizer", "data_efficiency"} <= keys
    assert "zero_optimisation" not in keys
    assert {"flops_profiler.enabled", "flops_profiler.profile_step", "checkpoint.tag_validation",
            "aio.block_size", "timers.throughput"} <= keys  # lenient sections' own keys
    cfg = load_config("configs/tiny.yaml", ["train.deepspeed={flops_profiler: {enabled: false}, steps_per_print: 5}"])
    assert deepspeed_config(cfg, world=1)["steps_per_print"] == 5
