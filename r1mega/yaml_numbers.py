"""YAML as users write numbers.

PyYAML reads YAML 1.1, where a float needs a dot: ``1e-6`` and ``3e4`` load as strings, and a
config's ``lr: 1e-6`` would be refused. This loader also reads them (and ``-2E+3``) as floats, as
YAML 1.2 does; everything else is PyYAML's safe loading.
"""
from __future__ import annotations

import re
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_load(stream) -> Any:
    return yaml.load(stream, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
