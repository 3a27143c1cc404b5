"""What users save: TorchScript files of custom modules and torch.export programs lowered from their operator
graphs, safetensors checkpoints, the float32 reproduction check, and the refusals (unsupported operators, unsafe
archive parts)."""

from __future__ import annotations

import json
import os
import pickle
import random
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustkit.errors import ModelLoadError, UnreadableModelError, UnsupportedLayerError
from robustkit.models import build_model, load_model
from robustkit.models.reproduce import check_lowering, error_bound
from robustkit.nn import Normalize, Opaque
from robustkit.verifiers import verify

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPE = (1, 12, 12)  # small images keep the verifiers fast


class ResidualPoolNet(nn.Module):
    """A custom module (not a Sequential): normalisation constants, conv + batch norm, a residual add, leaky ReLU,
    max pooling, ``x.view(x.size(0), -1)`` and an affine output."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = Normalize([0.1307], [0.3081])
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 3 * 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv1(self.norm(x))))
        h = F.leaky_relu(h + self.conv2(h), 0.1)
        h = self.pool(F.max_pool2d(h, 2))
        return self.fc(h.view(h.size(0), -1)) * 0.5 + 0.25


class Unsupported(nn.Module):
    """GELU twice and a softmax: operators the engine has no relaxation for."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(SHAPE[1] * SHAPE[2] // 4, 16)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(self.pool(x).flatten(1)))
        return torch.softmax(self.fc2(self.act(h)), dim=1)


class Block(nn.Module):
    """A ResNet basic block with an optional downsampling skip (``if self.downsample is not None``)."""

    def __init__(self, channels_in: int, channels_out: int, down: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, stride=2 if down else 1, padding=1),
                                  nn.BatchNorm2d(channels_out), nn.ReLU(), nn.Conv2d(channels_out, channels_out, 3,
                                                                                     padding=1))
        self.downsample = nn.Conv2d(channels_in, channels_out, 1, stride=2) if down else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        if self.downsample is not None:
            identity = self.downsample(x)
        out = self.body(x)
        out += identity
        return F.relu(out)


class PooledResNet(nn.Module):
    """Constants made in forward, tanh, two blocks, dropout and three spellings of global average pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.blocks = nn.Sequential(Block(4, 4, False), Block(4, 8, True))
        self.drop = nn.Dropout(0.3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.avg = nn.AvgPool2d(2)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - torch.tensor([0.4]).view(1, 1, 1, 1)) / torch.tensor([0.2]).view(1, 1, 1, 1)
        h = self.blocks(torch.tanh(self.stem(x)))
        a = self.pool(h).reshape(h.shape[0], -1)
        b = h.mean((2, 3))
        c = torch.flatten(self.avg(h).mean(dim=[-1, -2], keepdim=True), 1)
        return self.fc(self.drop(a + b - c)).sigmoid()


@pytest.mark.parametrize("how", ["script", "trace", "export"])
def test_resnet_blocks_optional_skips_and_global_pooling_are_lowered(tmp_path, how):
    torch.manual_seed(4)
    source = PooledResNet()
    for module in source.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    source.eval()
    path = export(source, tmp_path / "net.pt2") if how == "export" else \
        save_torchscript(source, tmp_path / "net.pt", how)
    lowered = load_model(path, input_shape=SHAPE)
    assert isinstance(lowered, torch.fx.GraphModule)
    assert sum(isinstance(m, nn.AdaptiveAvgPool2d) for m in lowered.modules()) == 3
    assert_same_function(lowered, source)


def residual_net() -> nn.Module:
    torch.manual_seed(0)
    net = ResidualPoolNet()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def inputs(n: int = 8) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(1))


def assert_same_function(lowered: nn.Module, source: nn.Module) -> None:
    """The lowered float32 model and the source are both within the float32 rounding bound of the exact function
    (the lowered model in float64), and the bound is tight: 1e-4 of the outputs' scale."""
    x = inputs()
    with torch.no_grad():
        value, bound = error_bound(lowered, x)  # type: ignore[arg-type]
        got, expected = lowered(x).double(), source(x).double()
    assert float(bound.max()) < 1e-4 * float(value.abs().max())
    assert torch.all((got - value).abs() <= bound) and torch.all((expected - value).abs() <= bound)


def assert_same_verification(lowered: nn.Module, source: nn.Module, eps: float = 0.002) -> None:
    x = inputs()
    with torch.no_grad():
        y = source(x).argmax(1)
    for method in ("interval", "crown"):
        ours, theirs = verify(lowered, x, y, eps, method=method), verify(source, x, y, eps, method=method)
        assert ours.status == theirs.status
        assert torch.allclose(ours.margins_lower, theirs.margins_lower, rtol=1e-4, atol=1e-4)
    assert 0 < int(verify(lowered, x, y, eps, method="crown").verified.sum()) <= len(y)


def save_torchscript(model: nn.Module, path: Path, how: str) -> Path:
    scripted = torch.jit.script(model) if how == "script" else torch.jit.trace(model, inputs(1))
    torch.jit.save(scripted, str(path))
    return path


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_custom_module_is_lowered_and_verified_like_the_eager_network(tmp_path, how):
    source = residual_net()
    path = save_torchscript(source, tmp_path / f"{how}.pt", how)
    lowered = load_model(path, input_shape=SHAPE, num_classes=10)
    assert isinstance(lowered, torch.fx.GraphModule)
    kinds = {type(m) for m in lowered.modules()}
    assert {nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.LeakyReLU, nn.Linear} <= kinds
    assert not any(isinstance(m, torch.jit.ScriptModule) for m in lowered.modules())
    assert_same_function(lowered, source)
    assert_same_verification(lowered, source)


def test_torchscript_without_an_input_shape_stays_runnable_but_opaque(tmp_path):
    source = residual_net()
    path = save_torchscript(source, tmp_path / "net.pt", "script")
    loaded = load_model(path)
    assert isinstance(loaded, Opaque) and "does not record its input shape" in loaded.reason
    with torch.no_grad():
        assert torch.equal(loaded(inputs()), source(inputs()))


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_unsupported_operators_are_all_named_at_once(tmp_path, how):
    source = Unsupported().eval()
    path = save_torchscript(source, tmp_path / "bad.pt", how)
    loaded = load_model(path, input_shape=SHAPE)
    assert isinstance(loaded, Opaque)
    with torch.no_grad():  # the file still runs, so the gradient attacks work on it
        assert torch.equal(loaded(inputs()), source(inputs()))
    with pytest.raises(UnreadableModelError) as info:
        verify(loaded, inputs(2), torch.tensor([0, 1]), 0.1, method="interval")
    message = str(info.value)
    assert message.startswith(f"unsupported operators in {path}: aten::gelu (2x), aten::softmax. robustkit reads ")
    assert "aten::conv2d" in message and "aten::linear" in message


def export(model: nn.Module, path: Path, *, dynamic: bool = True, decompose: bool = False) -> Path:
    shapes = {"x": {0: torch.export.Dim("batch")}} if dynamic else None
    program = torch.export.export(model, (inputs(2 if dynamic else 1),), dynamic_shapes=shapes)
    if decompose:
        program = program.run_decompositions()
    torch.export.save(program, str(path))
    return path


@pytest.mark.parametrize(("dynamic", "decompose"), [(True, False), (False, True)])
def test_export_program_is_lowered_and_verified_like_the_eager_network(tmp_path, dynamic, decompose):
    source = residual_net()
    path = export(source, tmp_path / "net.pt2", dynamic=dynamic, decompose=decompose)
    lowered = load_model(path, input_shape=SHAPE, num_classes=10)
    assert isinstance(lowered, torch.fx.GraphModule)
    assert_same_function(lowered, source)
    assert_same_verification(lowered, source)


def test_export_unsupported_operators_are_all_named_at_once(tmp_path):
    path = export(Unsupported().eval(), tmp_path / "bad.pt2")
    with pytest.raises(ModelLoadError, match=r"^unsupported operators in .*bad\.pt2: aten::gelu \(2x\), "
                                             r"aten::softmax\. robustkit reads "):
        load_model(path, input_shape=SHAPE)
    with pytest.raises(ModelLoadError, match=r"exported for inputs of shape \(N, 1, 12, 12\), not \(N, 3, 32, 32\)"):
        load_model(export(residual_net(), tmp_path / "net.pt2"), input_shape=(3, 32, 32))


class Evil:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def rewrite(source: Path, target: Path, change) -> Path:
    """A copy of the archive ``source`` with ``change(name, data) -> data | None`` applied (None drops a file)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for name in old.namelist():
            data = change(name, old.read(name))
            if data is not None:
                new.writestr(name, data)
    return target


def test_export_archive_is_read_without_unpickling_anything(tmp_path):
    marker = tmp_path / "pwned"
    Evil.marker = str(marker)
    good = export(residual_net(), tmp_path / "net.pt2")
    evil = pickle.dumps((Evil(), {}))
    # torch.export.load unpickles the sample inputs (with weights_only=False as a fallback); robustkit never reads them
    poisoned = rewrite(good, tmp_path / "poisoned.pt2",
                       lambda name, data: evil if "sample_inputs" in name else data)
    assert_same_function(load_model(poisoned, input_shape=SHAPE), residual_net())

    def pickled_weights(name, data):
        if not name.endswith("_weights_config.json"):
            return data
        config = json.loads(data)
        next(iter(config["config"].values()))["use_pickle"] = True
        return json.dumps(config).encode()

    with pytest.raises(ModelLoadError, match="stored as a pickle"):
        load_model(rewrite(good, tmp_path / "pickled.pt2", pickled_weights))
    compiled = rewrite(good, tmp_path / "compiled.pt2", lambda name, data: data)
    with zipfile.ZipFile(compiled, "a") as archive:
        archive.writestr("net/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(ModelLoadError, match="AOTInductor-compiled code"):
        load_model(compiled)
    assert not marker.exists()


def test_damaged_export_archives_fail_with_a_clear_error(tmp_path):
    good = export(residual_net(), tmp_path / "net.pt2")
    no_graph = rewrite(good, tmp_path / "no_graph.pt2", lambda name, data: None if name.endswith(".json") else data)
    with pytest.raises(ModelLoadError, match="holds no program"):
        load_model(no_graph)
    short = rewrite(good, tmp_path / "short.pt2", lambda name, data: data[:8] if "/weights/weight_" in name else data)
    with pytest.raises(ModelLoadError, match="needs .* values but its file holds|do not fit together"):
        load_model(short)
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"PK\x03\x04" + b"\x00" * 50)
    with pytest.raises(ModelLoadError):
        load_model(garbage)
    # random damage anywhere (bytes of the JSON, the configs, the weights) loads or fails as a ModelLoadError
    rng = random.Random(0)
    data = good.read_bytes()
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(20):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        garbage.write_bytes(bytes(damaged) if rng.random() < 0.8 else bytes(damaged[: rng.randrange(len(data))]))
        try:
            load_model(garbage, input_shape=SHAPE)
            outcomes["loaded"] += 1
        except ModelLoadError:
            outcomes["refused"] += 1
    assert outcomes["refused"] >= 5, outcomes


def test_the_reproduction_check_catches_a_misreading_and_accepts_rounding(tmp_path):
    source = residual_net()
    lowered = load_model(export(source, tmp_path / "net.pt2"), input_shape=SHAPE)
    check_lowering(lowered, source, SHAPE, "net")  # passes: the same function, to float32 rounding
    with pytest.raises(ModelLoadError, match="robustkit's reading of off does not reproduce its outputs: they differ "
                                             "by up to 0.001"):
        check_lowering(lowered, lambda x: source(x) + 1e-3, SHAPE, "off")


def test_safetensors_checkpoints_load_with_the_state_dict_checks(tmp_path):
    from safetensors.torch import save_file

    source = build_model("mnist_small", seed=3).eval()
    path = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), str(path))
    loaded = load_model("mnist_small", checkpoint=path, input_shape=(1, 28, 28), num_classes=10)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))
    state = source.state_dict()
    state["0.weight"] = state["0.weight"].clone()
    state["0.weight"][0, 0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ModelLoadError, match=r"NaN or infinite values in \['0.weight'\]"):
        load_model("mnist_small", checkpoint=tmp_path / "nan.safetensors")
    save_file({k: v for k, v in source.state_dict().items() if k != "7.bias"}, str(tmp_path / "part.safetensors"))
    with pytest.raises(ModelLoadError, match=r"missing 1 key\(s\) \['7.bias'\]"):
        load_model("mnist_small", checkpoint=tmp_path / "part.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ModelLoadError, match="cannot read safetensors file .*damaged"):
        load_model("mnist_small", checkpoint=tmp_path / "bad.safetensors")
    with pytest.raises(ModelLoadError, match="is a weights checkpoint, not a model"):
        load_model(path)


def test_trainers_with_bounds_refuse_an_unreadable_model_before_training(tmp_path):
    from robustkit.data import Split, load_dataset
    from robustkit.trainers import TrainConfig, get_trainer

    data = load_dataset("mnist5k")
    train, test = (Split(s.x[..., :12, :12].contiguous(), s.y) for s in (data.train.subset(0, 40), data.test))
    config = TrainConfig(epochs=1, batch_size=20, eps=0.1, val_size=10)
    for name in ("verifiable", "mixtrain"):
        with pytest.raises(UnsupportedLayerError, match="nn.GELU") as info:
            get_trainer(name).fit(Unsupported(), train, test, config, checkpoint=tmp_path / "c.pt")
        assert not isinstance(info.value, UnreadableModelError)
        assert not (tmp_path / "c.pt").exists()
    result = get_trainer("standard").fit(Unsupported(), train, test, config)
    assert result.history[0].verified_acc != result.history[0].verified_acc  # NaN: not monitored
    assert 0 <= result.history[0].clean_acc <= 1
