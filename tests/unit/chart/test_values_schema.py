"""values.schema.json refuses every value the chart does not know, and values.yaml is
documented line by line. Helm applies the same schema at install (checked for real in
tests/integration/chart); here it is applied with jsonschema, as plain data."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema
import pytest
import yaml

from dexorder.devenv.paths import REPO_ROOT

CHART = REPO_ROOT / "charts" / "dexorder"
SCHEMA: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
DEFAULTS: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())


def merged(overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` over the defaults, merged as Helm merges ``-f`` files."""

    def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        result = copy.deepcopy(base)
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(result.get(key), dict):
                result[key] = merge(result[key], value)
            else:
                result[key] = value
        return result

    return merge(DEFAULTS, overrides)


def problems(values: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(SCHEMA)
    return [
        f"/{'/'.join(str(part) for part in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(values)
    ]


def test_the_schema_is_a_valid_draft_7_schema() -> None:
    jsonschema.Draft7Validator.check_schema(SCHEMA)


def test_the_defaults_are_valid() -> None:
    assert problems(DEFAULTS) == []


def test_the_every_option_on_values_are_valid() -> None:
    everything = yaml.safe_load((CHART / "ci" / "all-options-values.yaml").read_text())
    assert problems(merged(everything)) == []


def _object_schemas(node: Any, where: str = "#") -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        if "properties" in node:
            found.append((where, node))
        for key, value in node.items():
            found += _object_schemas(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _object_schemas(value, f"{where}/{index}")
    return found


def test_every_object_with_known_keys_refuses_unknown_ones() -> None:
    loose = [
        where
        for where, node in _object_schemas(SCHEMA)
        if node.get("additionalProperties") is not False
        # An EnvVar is Kubernetes' own type: only its name is checked here.
        and not where.startswith("#/definitions/envList")
        # if/then only narrow the ollama object, which is strict itself.
        and "/then" not in where
        and "/if" not in where
    ]
    assert loose == []


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"gatway": {}}, "'gatway' was unexpected"),
        ({"gateway": {"replicaz": 3}}, "'replicaz' was unexpected"),
        ({"gateway": {"replicas": "two"}}, "/gateway/replicas: 'two' is not of type 'integer'"),
        ({"gateway": {"replicas": 0}}, "/gateway/replicas: 0 is less than the minimum of 1"),
        ({"ollama": {"mode": "kubernetes"}}, "/ollama/mode: 'kubernetes' is not one of"),
        ({"ollama": {"mode": "external"}}, "/ollama/externalUrl: '' should be non-empty"),
        ({"agents": {"namespace": {"podSecurity": "lax"}}}, "/agents/namespace/podSecurity"),
        ({"agents": {"namespace": {"name": "Agents_NS"}}}, "/agents/namespace/name"),
        ({"agents": {"port": 70000}}, "/agents/port: 70000 is greater than the maximum"),
        ({"gateway": {"existingSecret": ""}}, "/gateway/existingSecret: '' should be non-empty"),
        ({"gateway": {"auth": {"jwksUrl": "ftp://keys"}}}, "/gateway/auth/jwksUrl"),
        ({"gateway": {"service": {"type": "ExternalName"}}}, "/gateway/service/type"),
        ({"operator": {"image": {"digest": "latest"}}}, "/operator/image/digest"),
        ({"operator": {"resources": {"requests": {"memory": "lots"}}}}, "/operator/resources"),
        (
            {"agents": {"networkPolicy": {"egressAllowList": [{"cidr": "example.com"}]}}},
            "/agents/networkPolicy/egressAllowList/0/cidr",
        ),
        ({"crds": {"install": "yes"}}, "/crds/install: 'yes' is not of type 'boolean'"),
    ],
    ids=lambda value: json.dumps(value) if isinstance(value, dict) else "",
)
def test_a_bad_value_is_refused_with_its_path(overrides: dict[str, Any], expected: str) -> None:
    found = problems(merged(overrides))
    assert any(expected in problem for problem in found), found


@pytest.mark.parametrize(
    "secret_as_value",
    [
        {"gateway": {"databaseUrl": "postgresql://user:password@db/dexorder"}},
        {"gateway": {"env": {"ANTHROPIC_API_KEY": "sk-ant-..."}}},
        {"gateway": {"auth": {"hs256Secret": "x" * 32}}},
    ],
)
def test_a_secret_cannot_be_given_as_a_value(secret_as_value: dict[str, Any]) -> None:
    # Secrets are referenced by name only (gateway.existingSecret): there is no key to
    # put a secret value in, so it can never end up in a rendered manifest.
    assert any("was unexpected" in problem for problem in problems(merged(secret_as_value)))


def _undocumented_keys(text: str) -> list[str]:
    """Keys of values.yaml that have no comment above them and no documented ancestor.
    A key that opens a section (a nested mapping) needs none of its own."""
    lines = text.splitlines()
    undocumented: list[str] = []
    # (indent, documented) of the enclosing keys
    ancestors: list[tuple[int, bool]] = []
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "- ")) or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        while ancestors and ancestors[-1][0] >= indent:
            ancestors.pop()
        previous = next((p for p in reversed(lines[:number]) if p.strip()), "")
        commented = previous.strip().startswith("#") and (
            len(previous) - len(previous.lstrip()) == indent
        )
        documented = commented or any(flag for _, flag in ancestors)
        following = next(
            (p for p in lines[number + 1 :] if p.strip() and not p.strip().startswith("#")), ""
        )
        opens_section = stripped.endswith(":") and (
            len(following) - len(following.lstrip()) > indent
        )
        if not documented and not opens_section:
            undocumented.append(f"line {number + 1}: {stripped}")
        ancestors.append((indent, documented))
    return undocumented


def test_every_value_is_documented() -> None:
    assert _undocumented_keys((CHART / "values.yaml").read_text()) == []


def test_the_documentation_check_finds_an_undocumented_key() -> None:
    text = "gateway:\n  # -- Replicas.\n  replicas: 2\n  port: 80\n"
    assert _undocumented_keys(text) == ["line 4: port: 80"]


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = SCHEMA["definitions"][node["$ref"].rsplit("/", 1)[1]]
    return node


def _keys_missing_from_schema(values: Any, node: dict[str, Any], where: str = "") -> list[str]:
    node = _resolve(node)
    if not isinstance(values, dict) or "properties" not in node:
        return []
    missing = []
    for key, value in values.items():
        if key in node["properties"]:
            missing += _keys_missing_from_schema(value, node["properties"][key], f"{where}/{key}")
        else:
            missing.append(f"{where}/{key}")
    return missing


def test_every_default_is_declared_in_the_schema() -> None:
    assert _keys_missing_from_schema(DEFAULTS, SCHEMA) == []
