"""Saving detectors with skops.io: same scores, few trusted types, no code run."""

import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from conftest import FAST_PARAMS, odd_one_out_images, tiny_detector

from skpatchcore import PatchCoreDetector, PatchFeatureExtractor
from skpatchcore._persistence import PortableModule, TensorDict

sio = pytest.importorskip("skops.io")
UntrustedTypesFoundException = sio.exceptions.UntrustedTypesFoundException

# The types docs/user_guide.rst ("Sharing detectors safely") lists: a
# detector whose backbone is given by name stores only these.
SKPATCHCORE_TYPES = [
    "skpatchcore._detector.PatchCoreDetector",
    "skpatchcore._feature_extractor.PatchFeatureExtractor",
    "skpatchcore._persistence.TensorDict",
]


class TinyBackbone(torch.nn.Module):
    """A user's backbone: a class of its own, with required arguments."""

    def __init__(self, width):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, width, 3, padding=1)
        self.act = torch.nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x))


# A module backbone adds its wrapper and every module class in it.
MODULE_TYPES = sorted(
    SKPATCHCORE_TYPES
    + [
        "skpatchcore._persistence.PortableModule",
        f"{TinyBackbone.__module__}.TinyBackbone",
        "torch.nn.modules.activation.ReLU",
        "torch.nn.modules.conv.Conv2d",
    ]
)

LOADED = []


class Payload:
    """What a tampered file asks the loader to create; it only records it."""

    def __init__(self):
        self.command = "rm -rf ~"

    def __setstate__(self, state):
        LOADED.append(state["command"])


def _tiny_module():
    torch.manual_seed(0)
    return TinyBackbone(8)


@pytest.fixture(
    params=[
        "efficientnet_lite0",
        "pynndescent",
        "ivf",
        "resnet18",
        "module",
        "keep_aspect",
    ],
)
def fitted(request, fast_detector, cell_arrays):
    """A fitted detector of each backbone kind and search, with its types."""
    if request.param == "efficientnet_lite0":
        return fast_detector, SKPATCHCORE_TYPES
    if request.param in ("pynndescent", "ivf"):
        params = dict(FAST_PARAMS, nn_algorithm=request.param)
        types = SKPATCHCORE_TYPES
    elif request.param == "keep_aspect":
        # Fitted state of its own: the stride probe and the patch count.
        params = dict(FAST_PARAMS, resize="keep_aspect")
        types = SKPATCHCORE_TYPES
    elif request.param == "resnet18":
        params = dict(
            FAST_PARAMS, backbone="resnet18", weights=None, layers=("layer2", "layer3")
        )
        types = SKPATCHCORE_TYPES
    else:
        params = dict(FAST_PARAMS, backbone=_tiny_module(), layers=("conv", "act"))
        types = MODULE_TYPES
    return PatchCoreDetector(**params).fit(cell_arrays[:4]), types


def test_skops_round_trip_is_identical(fitted, elpv_small, tmp_path):
    detector, types = fitted
    path = tmp_path / "detector.skops"
    sio.dump(detector, path)
    assert sio.get_untrusted_types(file=path) == types
    loaded = sio.load(path, trusted=types)

    X = elpv_small.test_images
    np.testing.assert_array_equal(loaded.score_samples(X), detector.score_samples(X))
    np.testing.assert_array_equal(loaded.predict(X), detector.predict(X))
    for a, b in zip(loaded.anomaly_maps(X[:2]), detector.anomaly_maps(X[:2])):
        np.testing.assert_array_equal(a, b)
    assert loaded.offset_ == detector.offset_
    assert loaded.pixel_threshold_ == detector.pixel_threshold_
    np.testing.assert_array_equal(loaded.memory_bank_, detector.memory_bank_)
    assert loaded._model.search.features is loaded.memory_bank_
    assert loaded.nn_algorithm_ == detector.nn_algorithm_
    assert (loaded._model.search._index is None) == (detector.nn_algorithm_ == "exact")
    assert loaded.device_ == torch.device("cpu")


def test_loaded_module_backbone_is_one_module_with_its_state(cell_arrays, tmp_path):
    module = _tiny_module()
    module.conv.bias.requires_grad_(False)
    detector = PatchCoreDetector(
        **dict(FAST_PARAMS, backbone=module, layers=("conv", "act"))
    ).fit(cell_arrays[:4])
    path = tmp_path / "detector.skops"
    sio.dump(detector, path)
    loaded = sio.load(path, trusted=MODULE_TYPES)

    backbone = loaded.backbone
    assert type(backbone) is TinyBackbone
    assert backbone is loaded.feature_extractor_.backbone
    assert backbone is loaded._fitted_params["backbone"]
    assert backbone.training == module.training
    assert backbone.conv.weight.requires_grad
    assert not backbone.conv.bias.requires_grad
    for name, tensor in module.state_dict().items():
        torch.testing.assert_close(backbone.state_dict()[name], tensor, rtol=0, atol=0)
    # One module, stored once: partial_fit sees no changed parameter.
    loaded.partial_fit(cell_arrays[4:6])
    detector.partial_fit(cell_arrays[4:6])
    np.testing.assert_array_equal(loaded.memory_bank_, detector.memory_bank_)


def test_extractor_round_trip(cell_arrays, tmp_path):
    extractor = PatchFeatureExtractor(
        "resnet18", weights=None, image_size=64, resize=None, feature_dim=32
    ).fit()
    path = tmp_path / "extractor.skops"
    sio.dump(extractor, path)
    types = [t for t in SKPATCHCORE_TYPES if "_detector." not in t]
    assert sio.get_untrusted_types(file=path) == types
    loaded = sio.load(path, trusted=types)
    np.testing.assert_array_equal(
        loaded.transform(cell_arrays[:2]), extractor.transform(cell_arrays[:2])
    )


def test_fitted_on_cuda_loads_on_cpu(fast_detector, elpv_small, monkeypatch, tmp_path):
    # The state a CUDA fit leaves (device_ says cuda), as in test_detector.
    detector = pickle.loads(pickle.dumps(fast_detector))
    detector.device_ = detector.feature_extractor_.device_ = torch.device("cuda")
    path = tmp_path / "detector.skops"
    sio.dump(detector, path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loaded = sio.load(path, trusted=SKPATCHCORE_TYPES)
    assert loaded.device_ == torch.device("cpu")
    X = elpv_small.test_images
    np.testing.assert_array_equal(
        loaded.score_samples(X), fast_detector.score_samples(X)
    )


def _node(obj):
    """The skops schema node of ``obj``, without the ids of this process."""

    def strip_ids(node):
        if isinstance(node, dict):
            return {k: strip_ids(v) for k, v in node.items() if k != "__id__"}
        if isinstance(node, list):
            return [strip_ids(v) for v in node]
        return node

    schema = json.loads(zipfile.ZipFile(io.BytesIO(sio.dumps(obj))).read("schema.json"))
    del schema["protocol"], schema["_skops_version"]
    return strip_ids(schema)


def _tamper(path, attribute, node):
    """Rewrite the skops file ``path`` with the detector's ``attribute`` as ``node``."""
    with zipfile.ZipFile(path) as original:
        entries = {name: original.read(name) for name in original.namelist()}
    schema = json.loads(entries["schema.json"])
    schema["content"]["content"][attribute] = node
    entries["schema.json"] = json.dumps(schema).encode()
    with zipfile.ZipFile(path, "w") as tampered:
        for name, data in entries.items():
            tampered.writestr(name, data)


def test_tampered_file_runs_no_code(fast_detector, tmp_path):
    path = tmp_path / "detector.skops"
    sio.dump(fast_detector, path)
    _tamper(path, "offset_", _node(Payload()))
    injected = f"{Payload.__module__}.Payload"
    assert sio.get_untrusted_types(file=path) == sorted(SKPATCHCORE_TYPES + [injected])

    LOADED.clear()
    with pytest.raises(UntrustedTypesFoundException, match="Payload"):
        sio.load(path, trusted=SKPATCHCORE_TYPES)
    assert LOADED == []
    # The payload is live: trusting its type, as the list warns against, runs it.
    sio.load(path, trusted=SKPATCHCORE_TYPES + [injected])
    assert LOADED == ["rm -rf ~"]


def test_tampered_function_is_refused(fast_detector, tmp_path):
    path = tmp_path / "detector.skops"
    sio.dump(fast_detector, path)
    _tamper(path, "_random_state", _node(os.system))
    assert f"{os.system.__module__}.system" in sio.get_untrusted_types(file=path)
    with pytest.raises(UntrustedTypesFoundException, match="system"):
        sio.load(path, trusted=SKPATCHCORE_TYPES)


def test_portable_module_keeps_dtypes_flags_and_shared_submodules():
    shared = torch.nn.Linear(2, 2)
    module = torch.nn.Sequential(shared, torch.nn.BatchNorm1d(2), shared).eval()
    module[0].to(torch.bfloat16)
    module[0].bias.requires_grad_(False)
    module.scale = torch.arange(3.0)  # Neither a parameter nor a buffer.
    restored = pickle.loads(pickle.dumps(PortableModule(module))).module

    assert restored[0] is restored[2]
    assert not restored.training
    assert restored[0].weight.dtype == torch.bfloat16
    assert restored[0].weight.requires_grad and not restored[0].bias.requires_grad
    for name, tensor in module.state_dict().items():
        assert restored.state_dict()[name].dtype == tensor.dtype
        torch.testing.assert_close(restored.state_dict()[name], tensor, rtol=0, atol=0)
    torch.testing.assert_close(restored.scale, module.scale, rtol=0, atol=0)


@pytest.mark.parametrize(
    "state, error, match",
    [
        ([1, 2], TypeError, "mapping of names"),
        ({"w": "not an array"}, TypeError, "stored tensor"),
        ({"w": ([1.0], None)}, TypeError, "NumPy array"),
        ({"w": (np.zeros(2, np.int16), "no_such_dtype")}, ValueError, "Unknown torch"),
    ],
)
def test_bad_stored_tensors_are_named(state, error, match):
    weights = TensorDict.__new__(TensorDict)
    with pytest.raises(error, match=match):
        weights.__setstate__(state)


def test_bad_stored_module_is_named():
    state = PortableModule(torch.nn.ReLU()).__getstate__()
    wrapper = PortableModule.__new__(PortableModule)
    with pytest.raises(TypeError, match="torch.nn.Module subclass"):
        wrapper.__setstate__(dict(state, type=dict))
    with pytest.raises(TypeError, match="submodule 'x'"):
        wrapper.__setstate__(dict(state, modules={"x": torch.nn.ReLU()}))


def test_normalization_is_saved_and_used(cell_arrays, elpv_small, tmp_path):
    normalization = ((0.4, 0.5, 0.6), (0.2, 0.3, 0.25))
    detector = PatchCoreDetector(**dict(FAST_PARAMS, normalization=normalization)).fit(
        cell_arrays[:4]
    )
    extractor = detector.feature_extractor_
    assert (extractor.mean_, extractor.std_) == normalization
    path = tmp_path / "detector.skops"
    sio.dump(detector, path)
    # Plain tuples of floats: no type to trust beyond a named backbone's.
    assert sio.get_untrusted_types(file=path) == SKPATCHCORE_TYPES
    X = elpv_small.test_images[:4]
    expected = detector.score_samples(X)

    for loaded in (
        sio.load(path, trusted=SKPATCHCORE_TYPES),
        pickle.loads(pickle.dumps(detector)),
    ):
        assert loaded.get_params()["normalization"] == normalization
        assert (loaded.feature_extractor_.mean_, loaded.feature_extractor_.std_) == (
            normalization
        )
        np.testing.assert_array_equal(loaded.score_samples(X), expected)


def test_tiny_module_detector_round_trips_through_skops(tmp_path):
    # Fast: a 1x1-convolution backbone on synthetic images; the file asks
    # for the module's own classes besides skpatchcore's.
    train, test = odd_one_out_images()
    detector = tiny_detector().fit(train)
    path = tmp_path / "detector.skops"
    sio.dump(detector, path)
    untrusted = sio.get_untrusted_types(file=path)
    assert sorted(untrusted) == sorted(
        SKPATCHCORE_TYPES
        + [
            "skpatchcore._persistence.PortableModule",
            "torch.nn.modules.container.Sequential",
            "torch.nn.modules.conv.Conv2d",
        ]
    )
    loaded = sio.load(path, trusted=untrusted)
    np.testing.assert_array_equal(
        loaded.score_samples(test), detector.score_samples(test)
    )
    assert loaded.offset_ == detector.offset_
