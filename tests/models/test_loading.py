"""Model loading: zoo + checkpoints in every torch format, TorchScript, ONNX, factories, and refusals."""

from __future__ import annotations

import os
import pickle
import random
from collections import OrderedDict

import pytest
import torch
from torch import nn

from robustkit.errors import InputError, ModelLoadError, UnknownNameError, UnsafeCheckpointError
from robustkit.models import build_model, load_model, spec_kind
from robustkit.models.loading import extract_state_dict
from robustkit.nn import Normalize, Residual


def outputs_equal(a: nn.Module, b: nn.Module, shape, atol=1e-5) -> bool:
    x = torch.rand(5, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=atol)


def trained_like(name: str) -> nn.Module:
    return build_model(name, seed=11).eval()


def test_zoo_name_gives_ready_model_in_eval_mode():
    model = load_model("mnist_small")
    assert not model.training and next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("wrap", ["plain", "legacy", "state_dict", "model", "nested", "list", "ddp"])
def test_checkpoint_formats(tmp_path, wrap):
    source = trained_like("mnist_small")
    state = source.state_dict()
    path = tmp_path / "weights.pt"
    if wrap == "plain":
        torch.save(state, path)
    elif wrap == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    elif wrap == "state_dict":
        torch.save({"state_dict": state, "epoch": 3, "optimizer": {"lr": 0.1}}, path)
    elif wrap == "model":
        torch.save({"model": state, "note": "x"}, path)
    elif wrap == "nested":
        torch.save({"checkpoint": 1, "model": {"state_dict": state}}, path)
    elif wrap == "list":
        torch.save({"state_dict": [state]}, path)
    else:
        torch.save(OrderedDict((f"module.{k}", v) for k, v in state.items()), path)
    loaded = load_model("mnist_small", checkpoint=path, input_shape=(1, 28, 28), num_classes=10)
    assert outputs_equal(loaded, source, (1, 28, 28), atol=0)


class Evil:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, writer):
    marker = tmp_path / "pwned"
    Evil.marker = str(marker)
    path = tmp_path / "evil.pt"
    payload = {"weight": Evil()}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(UnsafeCheckpointError, match=r"refused to load .*system.*could run code"):
        load_model("mnist_small", checkpoint=path)
    assert not marker.exists()


def test_whole_pickled_model_is_refused_with_advice(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(build_model("toy2d"), path)
    with pytest.raises(UnsafeCheckpointError, match="state_dict"):
        load_model("toy2d", checkpoint=path)
    with pytest.raises(ModelLoadError, match="not a model"):
        load_model(path)


def test_corrupt_missing_and_mismatched_checkpoints(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(random.Random(0).randbytes(200))
    with pytest.raises(ModelLoadError, match="cannot read checkpoint"):
        load_model("toy2d", checkpoint=corrupt)
    truncated = tmp_path / "truncated.pt"
    torch.save(build_model("toy2d").state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:150])
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_model("toy2d", checkpoint=truncated)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("toy2d", checkpoint=tmp_path / "nope.pt")
    other = tmp_path / "other.pt"
    torch.save(build_model("mnist_fc_small").state_dict(), other)
    with pytest.raises(ModelLoadError, match="shape mismatch.*1.weight"):
        load_model("mnist_fc", checkpoint=other)
    with pytest.raises(ModelLoadError, match="missing"):
        load_model("mnist_small", checkpoint=other)
    notes = tmp_path / "notes.pt"
    torch.save({"epoch": 3, "lr": 0.1}, notes)
    with pytest.raises(ModelLoadError, match="not a state_dict"):
        load_model("toy2d", checkpoint=notes)


def _damaged(rng: random.Random, data: bytes) -> bytes:
    """``data`` with a few random bytes overwritten, cut short, or replaced by random bytes."""
    kind = rng.randrange(3)
    if kind == 0:
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 5)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        return bytes(damaged)
    if kind == 1:
        return data[: rng.randrange(len(data))]
    return rng.randbytes(rng.randint(1, 400))


@pytest.mark.parametrize("fmt", ["zip", "legacy", "torchscript", "onnx"])
def test_damaged_files_load_or_fail_with_a_clear_error(tmp_path, fmt):
    # Garbage reaches torch's unpickler and zip reader as KeyError, IndexError, NotImplementedError,
    # UnicodeDecodeError, ...: every one must come out as a ModelLoadError (or the file still loads).
    net = build_model("toy2d", seed=0)
    good = tmp_path / "good"
    if fmt == "torchscript":
        torch.jit.save(torch.jit.script(net), good)
    elif fmt == "onnx":
        pytest.importorskip("onnx")
        torch.onnx.export(net, (torch.zeros(1, 1, 1, 2),), str(good), dynamo=False)
    else:
        torch.save(net.state_dict(), good, _use_new_zipfile_serialization=fmt == "zip")
    data = good.read_bytes()
    rng = random.Random(fmt)
    path = tmp_path / ("bad.ts" if fmt == "torchscript" else "bad.onnx" if fmt == "onnx" else "bad.pt")
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(150):
        path.write_bytes(_damaged(rng, data))
        try:
            if fmt in ("torchscript", "onnx"):
                load_model(str(path))
            else:
                load_model("toy2d", checkpoint=path)
            outcomes["loaded"] += 1
        except (ModelLoadError, InputError):
            outcomes["refused"] += 1
    assert outcomes["refused"] >= 50, outcomes


def test_nan_weights_are_refused(tmp_path):
    state = build_model("toy2d").state_dict()
    state["1.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match="NaN"):
        load_model("toy2d", checkpoint=path)


def test_extract_state_dict_reports_keys():
    with pytest.raises(ModelLoadError, match=r"keys \['a', 'b'\]"):
        extract_state_dict({"a": 1, "b": [1, 2]})


@pytest.mark.parametrize("name", ["mnist_small", "cifar_resnet"])
@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_is_rebuilt_as_eager_layers(tmp_path, name, how):
    source = trained_like(name)
    shape = (1, 28, 28) if name.startswith("mnist") else (3, 32, 32)
    scripted = torch.jit.script(source) if how == "script" else torch.jit.trace(source, torch.rand(1, *shape))
    path = tmp_path / "net.ts"
    torch.jit.save(scripted, str(path))
    assert spec_kind(path) == "torchscript"
    loaded = load_model(path, input_shape=shape)
    assert not isinstance(loaded, torch.jit.ScriptModule)
    assert all(not isinstance(m, torch.jit.ScriptModule) for m in loaded.modules())
    assert any(isinstance(m, Residual) for m in loaded.modules()) == (name == "cifar_resnet")
    assert outputs_equal(loaded, source, shape)


class Doubling(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        return 2 * self.linear(x.flatten(1))


def test_custom_torchscript_is_lowered_to_standard_layers(tmp_path):
    source = Doubling().eval()
    path = tmp_path / "custom.pt"
    torch.jit.save(torch.jit.script(source), str(path))
    loaded = load_model(path, input_shape=(1, 2, 2))
    assert not any(isinstance(m, torch.jit.ScriptModule) for m in loaded.modules())
    assert outputs_equal(loaded, source, (1, 2, 2), atol=0)


def export_onnx(model: nn.Module, shape, path, flat_input=False):
    pytest.importorskip("onnx")
    example = torch.rand(1, *shape)
    if flat_input:
        example = example.flatten(1)
    torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})


@pytest.mark.parametrize("name", ["mnist_small", "cifar_small", "cifar_resnet"])
def test_onnx_export_round_trip(tmp_path, name):
    source = trained_like(name)
    shape = (1, 28, 28) if name.startswith("mnist") else (3, 32, 32)
    path = tmp_path / "net.onnx"
    export_onnx(source, shape, path)
    loaded = load_model(path, input_shape=shape, num_classes=10)
    allowed = (nn.Sequential, nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, Normalize, Residual)
    assert all(isinstance(m, allowed) for m in loaded.modules())
    assert outputs_equal(loaded, source, shape, atol=1e-4)


class FlatMLP(nn.Module):
    """An MLP on flat inputs with batch norm, average pooling-free affine steps and a skip connection."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 32)
        self.fc2 = nn.Linear(32, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.fc1((x - 0.1307) / 0.3081))
        h = torch.relu(self.fc2(h) + h)
        return self.out(h)


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(4 * 14 * 14, 10)

    def forward(self, x):
        h = self.pool(torch.relu(self.bn(self.conv(x))))
        return self.fc(h.reshape(h.shape[0], -1))


def test_onnx_flat_input_affine_ops_and_identity_skip(tmp_path):
    source = FlatMLP().eval()
    path = tmp_path / "mlp.onnx"
    export_onnx(source, (1, 28, 28), path, flat_input=True)
    loaded = load_model(path, input_shape=(1, 28, 28))
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(loaded(x), source(x.flatten(1)), atol=1e-4)
    assert any(isinstance(m, Residual) and m.skip is None for m in loaded.modules())


def test_onnx_batchnorm_and_pooling(tmp_path):
    source = ConvBN()
    with torch.no_grad():
        source.bn.running_mean.uniform_(-0.5, 0.5)
        source.bn.running_var.uniform_(0.5, 2.0)
    source.eval()
    path = tmp_path / "convbn.onnx"
    export_onnx(source, (1, 28, 28), path)
    loaded = load_model(path, input_shape=(1, 28, 28))
    assert outputs_equal(loaded, source, (1, 28, 28), atol=1e-4)


class PooledActivations(nn.Module):
    """Conv layers with every registered non-ReLU activation and max pooling in several settings."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.pool1 = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.conv2 = nn.Conv2d(3, 4, 2)
        self.pool2 = nn.MaxPool2d(2, stride=1, dilation=2)
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        h = self.pool1(nn.functional.leaky_relu(self.conv1(x), 0.2))
        h = self.pool2(torch.tanh(self.conv2(h)))
        return self.fc(torch.sigmoid(h).flatten(1))


def test_onnx_leaky_relu_sigmoid_tanh_and_max_pooling_round_trip(tmp_path):
    from robustkit.verifiers import bounds, verify

    torch.manual_seed(2)
    source = PooledActivations().eval()
    path = tmp_path / "pooled.onnx"
    export_onnx(source, (1, 10, 10), path)
    loaded = load_model(path, input_shape=(1, 10, 10))
    kinds = [type(m) for m in loaded.modules()]
    assert {nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.MaxPool2d} <= set(kinds)
    assert outputs_equal(loaded, source, (1, 10, 10), atol=1e-6)
    pool = next(m for m in loaded.modules() if isinstance(m, nn.MaxPool2d))
    assert (pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode) == ((3, 3), (2, 2), (1, 1), True)
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(4, 1, 10, 10, generator=generator)
    eps = 0.02
    with torch.no_grad():
        y = source(x).argmax(1)
        result = verify(loaded, x, y, eps, method="crown")
        box = bounds(loaded, x, eps, method="crown")
        points = (x.unsqueeze(1) + eps * (2 * torch.rand(4, 1000, 1, 10, 10, generator=generator) - 1)).clamp(0, 1)
        out = source(points.reshape(-1, 1, 10, 10)).reshape(4, 1000, 5)
    slack = 1e-5 * (1 + out.abs())
    assert torch.all(out >= box.lower.unsqueeze(1) - slack) and torch.all(out <= box.upper.unsqueeze(1) + slack)
    margins = out.gather(2, y.view(4, 1, 1).expand(-1, 1000, 1)) - out
    assert torch.all(margins >= result.margins_lower.unsqueeze(1) - 1e-5 * (1 + margins.abs()))


def _onnx_max_pool(path, outputs=("y",), **attributes):
    """A one-node ONNX graph: MaxPool of a (1, 1, 4, 4) input with ``attributes``; ``outputs`` names the
    node's outputs, the last of which is the graph's output."""
    onnx = pytest.importorskip("onnx")
    helper = onnx.helper
    node = helper.make_node("MaxPool", ["x"], list(outputs), kernel_shape=[2, 2], **attributes)
    kind = onnx.TensorProto.INT64 if outputs[-1] == "indices" else onnx.TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 4, 4])]
    result = helper.make_tensor_value_info(outputs[-1], kind, [1, 1, None, None])
    graph = helper.make_graph([node], "pool", inputs, [result])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_onnx_max_pool_settings_torch_cannot_match_are_refused(tmp_path):
    good = load_model(_onnx_max_pool(tmp_path / "good.onnx", pads=[1, 1, 1, 1], strides=[2, 2]))
    pool = good[0]
    assert isinstance(pool, nn.MaxPool2d) and pool.padding == (1, 1) and pool.stride == (2, 2)
    with pytest.raises(ModelLoadError, match=r"MaxPool is not supported with asymmetric pads \[0, 0, 1, 1\]"):
        load_model(_onnx_max_pool(tmp_path / "asym.onnx", pads=[0, 0, 1, 1]))
    with pytest.raises(ModelLoadError, match="MaxPool is not supported with storage_order=1"):
        load_model(_onnx_max_pool(tmp_path / "order.onnx", storage_order=1))
    with pytest.raises(ModelLoadError, match="auto_pad"):
        load_model(_onnx_max_pool(tmp_path / "same.onnx", auto_pad="SAME_UPPER"))
    with pytest.raises(ModelLoadError, match="extra output 'indices' is used"):
        load_model(_onnx_max_pool(tmp_path / "indices.onnx", outputs=("y", "indices")))


def test_onnx_unsupported_operators_are_all_listed(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ELU(), nn.Softplus(), nn.Flatten(), nn.Linear(2 * 26 * 26, 3))
    path = tmp_path / "bad.onnx"
    export_onnx(model.eval(), (1, 28, 28), path)
    with pytest.raises(ModelLoadError, match="unsupported operator.*Elu.*Softplus") as info:
        load_model(path)
    assert all(name in str(info.value) for name in ("LeakyRelu", "MaxPool", "Sigmoid", "Tanh"))


def test_onnx_corrupt_file(tmp_path):
    pytest.importorskip("onnx")
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x08\x07garbage-not-protobuf" * 3)
    with pytest.raises(ModelLoadError, match="ONNX"):
        load_model(path)


def test_onnx_checkpoint_combination_is_refused(tmp_path):
    path = tmp_path / "net.onnx"
    export_onnx(trained_like("toy2d"), (1, 1, 2), path)
    with pytest.raises(InputError, match="holds its own weights"):
        load_model(path, checkpoint=path)


FACTORY_SOURCE = """
import torch
from torch import nn

def build():
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))

def broken():
    raise RuntimeError("no weights here")

def not_a_model():
    return 42
"""


def test_factories_from_file_and_module(tmp_path, monkeypatch):
    file = tmp_path / "my_nets.py"
    file.write_text(FACTORY_SOURCE)
    from_file = load_model(f"{file}:build", input_shape=(1, 2, 2), num_classes=3)
    assert isinstance(from_file[1], nn.Linear)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert spec_kind("my_nets:build") == "factory"
    weights = tmp_path / "w.pt"
    torch.save(from_file.state_dict(), weights)
    from_module = load_model("my_nets:build", checkpoint=weights)
    assert outputs_equal(from_module, from_file, (1, 2, 2), atol=0)
    with pytest.raises(ModelLoadError, match="raised RuntimeError: no weights here"):
        load_model("my_nets:broken")
    with pytest.raises(ModelLoadError, match="returned a int"):
        load_model("my_nets:not_a_model")
    with pytest.raises(ModelLoadError, match="no callable 'missing'"):
        load_model("my_nets:missing")
    with pytest.raises(ModelLoadError, match="cannot import 'no_such_module_xyz'"):
        load_model("no_such_module_xyz:build")


def test_mean_std_wrap_and_validation():
    model = load_model("cifar_small", mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], input_shape=(3, 32, 32))
    assert isinstance(model[0], Normalize) and model[0].channels == 3
    with pytest.raises(InputError, match="together"):
        load_model("cifar_small", mean=[0.5])
    with pytest.raises(InputError, match="positive"):
        load_model("cifar_small", mean=[0.5], std=[0.0])


def test_probe_catches_wrong_input_shape_and_classes():
    with pytest.raises(ModelLoadError, match=r"^model mnist_small does not take cifar10's 3x32x32 inputs: it takes "
                                             r"1x28x28 inputs \(RuntimeError: "):
        load_model("mnist_small", input_shape=(3, 32, 32), dataset="cifar10")
    with pytest.raises(ModelLoadError, match="returns 10 logits but the dataset has 200"):
        load_model("mnist_small", input_shape=(1, 28, 28), num_classes=200)


def test_unknown_specs_and_devices(tmp_path):
    with pytest.raises(UnknownNameError, match="Did you mean 'mnist_small'"):
        load_model("mnist-small")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing.onnx"))
    with pytest.raises(InputError, match="invalid device"):
        load_model("toy2d", device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            load_model("toy2d", device="cuda")
