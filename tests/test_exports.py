"""The public namespaces export each name once, and every exported name exists (the
shared __init__ files are merged line-wise, see .gitattributes)."""

import importlib

import pytest


@pytest.mark.parametrize("module", ["mmfast", "mmfast.ops", "mmfast.nn", "mmfast.models", "mmfast.integrations"])
def test_exports_are_unique_and_resolve(module):
    namespace = importlib.import_module(module)
    names = namespace.__all__
    assert len(names) == len(set(names)), sorted(n for n in set(names) if names.count(n) > 1)
    missing = [n for n in names if not hasattr(namespace, n)]
    assert not missing, missing


def test_suite_registry_names_are_unique_and_import():
    from mmfast.bench import suites

    assert len(suites.names()) == len(set(suites.names()))
    for name in suites.names():
        assert suites.get(name).name == name
