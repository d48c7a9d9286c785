"""A model that cannot fit in memory is refused in one line before anything is allocated (otherwise the weights'
initialisation fills the memory and the kernel's out-of-memory killer ends this or another process)."""
from __future__ import annotations

import pytest
from test_cli_model import _one_line_error, invoke
from test_training import synthetic_pack

from nfed.common import memory
from nfed.common.errors import CheckpointError, ConfigError
from nfed.model import wnet
from nfed.model.checkpoint import save_checkpoint
from nfed.training import trainer
from nfed.training.trainer import TrainConfig, build_model, model_from_checkpoint, require_memory

GIB = 2 ** 30


@pytest.fixture
def machine_of(monkeypatch):
    """Pretend this machine allows `limit` bytes; WNetCD must not be built past a refusal."""
    def set_limit(limit):
        monkeypatch.setattr(trainer, "memory_limit_bytes", lambda: limit)
    return set_limit


def test_the_limit_is_the_ram_or_a_lower_container_limit(tmp_path, monkeypatch):
    ram = memory.memory_limit_bytes()
    assert ram is not None and ram > 0
    v2 = tmp_path / "memory.max"
    monkeypatch.setattr(memory, "CGROUP_LIMITS", (str(v2), str(tmp_path / "absent")))
    v2.write_text("max\n")
    assert memory.memory_limit_bytes() == ram
    v2.write_text(f"{GIB}\n")
    assert memory.memory_limit_bytes() == min(ram, GIB)
    v2.write_text(f"{ram * 1000}\n")   # cgroup v1's "unlimited" is a huge number
    assert memory.memory_limit_bytes() == ram


def test_training_needs_four_copies_of_the_parameters(machine_of):
    need = 4 * 4 * wnet.parameter_count(64, 2)   # weights, gradients, Adam's two moments in float32
    machine_of(need + 1)
    trainer.require_memory_for(64, 2, 4)
    machine_of(need - 1)
    with pytest.raises(ConfigError, match=r"width 64 has 0\.1 G parameters: at least 1\.0 GiB for its weights, "
                                         r"gradients and optimiser state, more than the 1\.0 GiB"):
        trainer.require_memory_for(64, 2, 4)
    trainer.require_memory_for(64, 2, 1)          # the weights alone fit
    machine_of(None)                           # unknown: nothing is refused
    trainer.require_memory_for(1024, 5, 4)


def test_sgd_keeps_one_buffer_fewer_than_adam(machine_of):
    machine_of(3 * 4 * wnet.parameter_count(64, 2))   # weights, gradients, momentum: SGD fits, Adam does not
    require_memory(TrainConfig(width=64, optimizer="sgd"), "cpu")
    with pytest.raises(ConfigError, match="optimiser state"):
        require_memory(TrainConfig(width=64, optimizer="adam"), "cpu")


def test_build_model_refuses_before_allocating(machine_of, monkeypatch):
    machine_of(64 * 2 ** 20)
    monkeypatch.setattr(wnet.WNetCD, "__init__", lambda *a, **k: pytest.fail("built a model that cannot fit"))
    with pytest.raises(ConfigError, match="width 64 .* more than the 0.1 GiB of memory this machine allows"):
        build_model(TrainConfig(width=64))


def test_a_checkpoint_claiming_a_huge_width_is_refused_naming_the_file(tmp_path, machine_of):
    small = build_model(TrainConfig(width=2))
    path = save_checkpoint(tmp_path / "huge.h5", small.state_dict(), config={"width": 1024, "classes": 2})
    machine_of(24 * GIB)
    with pytest.raises(CheckpointError, match=r"huge\.h5: W-Net-CD at width 1024 has 17\.2 G parameters"):
        model_from_checkpoint(path)


def test_cli_refusals_are_one_line(tmp_path, machine_of):
    machine_of(GIB)
    _one_line_error(invoke("model-info", "--width", 200), "width 200", "choose a smaller width")
    pack = synthetic_pack(tmp_path / "Jung-gu.h5", "Jung-gu", counts=(4, 2, 2), tile=16, seed=0)
    for command in ("train-local", "federate", "train-central"):   # refused before a run folder is made
        _one_line_error(invoke(command, "--data", pack if command == "train-local" else tmp_path, "--out",
                               tmp_path / command, "--width", 200, "--quiet"), "width 200", "more than the 1.0 GiB")
        assert not (tmp_path / command).exists()
