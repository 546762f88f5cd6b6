"""Docstrings of the public API: numpydoc, as scikit-learn writes it.

Every public class, function and method of ``skpatchcore`` and its public
modules documents exactly the parameters of its signature, in order; public
classes and functions have the sections scikit-learn gives them; and the
Attributes of the estimators are the attributes that ``fit`` sets.
"""

import importlib
import inspect
import warnings

import numpy as np
import pytest
import torch
from numpydoc.docscrape import ClassDoc, FunctionDoc
from numpydoc.validate import validate
from sklearn.base import BaseEstimator

from skpatchcore import PatchCoreDetector, PatchCoreEnsemble, PatchFeatureExtractor

PUBLIC_MODULES = [
    "skpatchcore",
    "skpatchcore.datasets",
    "skpatchcore.export",
    "skpatchcore.metrics",
    "skpatchcore.model_selection",
    "skpatchcore.plotting",
]

# numpydoc checks that scikit-learn's own docstrings do not follow either:
# RT02 flags the named returns ("self : object") of its style; extended
# summaries, See Also and Examples are given for classes and functions (see
# the section tests below), not for every method.
IGNORED_NUMPYDOC_CHECKS = {"RT02", "ES01", "SA01", "EX01"}


def _public_names(module):
    """``__all__``, or the public names defined in the module itself."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return sorted(
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and getattr(obj, "__module__", None) == module.__name__
    )


def _methods(cls):
    """Public methods of ``cls`` written in skpatchcore, by name."""
    for name in sorted(dir(cls)):
        if name.startswith("_"):
            continue
        attribute = inspect.getattr_static(cls, name)
        # available_if hides a method behind a descriptor holding it as `fn`.
        function = getattr(attribute, "fn", attribute)
        if isinstance(function, (staticmethod, classmethod)):
            function = function.__func__
        if inspect.isfunction(function) and function.__module__.startswith(
            "skpatchcore"
        ):
            yield name, function


def _public_api():
    classes, functions, methods = {}, {}, {}
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in _public_names(module):
            obj = getattr(module, name)
            path = f"{module_name}.{name}"
            if inspect.isclass(obj):
                classes[path] = obj
                for method_name, method in _methods(obj):
                    methods[f"{path}.{method_name}"] = method
            elif inspect.isfunction(obj):
                functions[path] = obj
            # Other public objects (e.g. the ready-made scorer
            # metrics.image_auroc_scorer) have no signature of their own.
    return classes, functions, methods


CLASSES, FUNCTIONS, METHODS = _public_api()


def _parse(obj):
    """numpydoc's parse of ``obj``; its warnings (bad sections...) are errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        if inspect.isclass(obj):
            return ClassDoc(obj, config={"show_class_members": False})
        return FunctionDoc(obj)


def _signature_parameters(obj):
    """Names of the parameters in the signature, without self, *args, **kw."""
    function = obj.__init__ if inspect.isclass(obj) else obj
    parameters = inspect.signature(function).parameters.values()
    names = [
        p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    return names[1:] if names[:1] == ["self"] else names


def _documented_parameters(doc):
    names = []
    for parameter in doc["Parameters"]:
        assert parameter.type.strip(), f"parameter {parameter.name!r} has no type"
        # numpydoc allows "x1, x2 : int" for parameters sharing a description.
        names.extend(name.strip() for name in parameter.name.split(","))
    return [name for name in names if not name.startswith("*")]


@pytest.mark.parametrize(
    "path, obj",
    [*CLASSES.items(), *FUNCTIONS.items(), *METHODS.items()],
    ids=[*CLASSES, *FUNCTIONS, *METHODS],
)
def test_docstring_parameters_match_signature(path, obj):
    """The equivalent of sklearn.utils._testing.check_docstring_parameters.

    That helper only looks at objects under ``sklearn.``, so it is written out
    here for skpatchcore.
    """
    assert obj.__doc__, f"{path} has no docstring"
    documented = _documented_parameters(_parse(obj))
    expected = _signature_parameters(obj)
    assert documented == expected, (
        f"{path}: the Parameters section lists {documented}, the signature "
        f"has {expected}"
    )


@pytest.mark.parametrize("path", [*CLASSES, *FUNCTIONS, *METHODS])
def test_numpydoc_validation(path):
    errors = [
        f"{code}: {message}"
        for code, message in validate(path)["errors"]
        if code not in IGNORED_NUMPYDOC_CHECKS
    ]
    assert not errors, f"{path}:\n" + "\n".join(errors)


def _sections(obj):
    doc = _parse(obj)
    return {
        section
        for section in (
            "Parameters",
            "Attributes",
            "Returns",
            "Yields",
            "See Also",
            "Examples",
        )
        if doc[section]
    }


@pytest.mark.parametrize("path, cls", CLASSES.items(), ids=list(CLASSES))
def test_class_sections(path, cls):
    """Like scikit-learn: estimators also document their fitted attributes."""
    required = {"See Also", "Examples"}
    if _signature_parameters(cls):
        required.add("Parameters")
    if issubclass(cls, BaseEstimator):
        required.add("Attributes")
    missing = required - _sections(cls)
    assert not missing, f"{path} lacks the sections {sorted(missing)}"


@pytest.mark.parametrize("path, function", FUNCTIONS.items(), ids=list(FUNCTIONS))
def test_function_sections(path, function):
    required = {"Examples"}
    if _signature_parameters(function):
        required.add("Parameters")
    required.add("Yields" if inspect.isgeneratorfunction(function) else "Returns")
    missing = required - _sections(function)
    assert not missing, f"{path} lacks the sections {sorted(missing)}"


def _documented_attributes(cls):
    names = []
    for attribute in _parse(cls)["Attributes"]:
        names.extend(name.strip() for name in attribute.name.split(","))
    return names


def _fitted_attributes(estimator):
    return {
        name
        for name in vars(estimator)
        if name.endswith("_") and not name.startswith("_")
    }


def _tiny_estimators():
    """A fitted detector, extractor and ensemble: 1x1 convolution, 4x4 images."""
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, kernel_size=1))
    params = dict(
        backbone=module,
        layers=("0",),
        patch_size=1,
        feature_dim=4,
        image_size=4,
        resize=None,
        device="cpu",
    )
    images = np.random.RandomState(0).rand(3, 4, 4)
    detector = PatchCoreDetector(**params, coreset_ratio=0.5, random_state=0)
    ensemble = PatchCoreEnsemble(
        [("a", detector), ("b", PatchCoreDetector(**dict(params, patch_size=3)))],
        random_state=0,
    )
    return (
        detector.fit(images),
        PatchFeatureExtractor(**params).fit(),
        ensemble.fit(images),
    )


@pytest.mark.parametrize("which", [0, 1, 2], ids=["detector", "extractor", "ensemble"])
def test_documented_attributes_are_the_fitted_ones(which):
    estimator = _tiny_estimators()[which]
    documented = _documented_attributes(type(estimator))
    assert all(name.endswith("_") for name in documented), documented
    assert sorted(documented) == sorted(_fitted_attributes(estimator))
