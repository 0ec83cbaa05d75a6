"""Reading what `helm template` rendered: the documents, by kind and name."""

from __future__ import annotations

from typing import Any

import yaml

Manifest = dict[str, Any]


def documents(rendered: str) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


def of_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [doc for doc in manifests if doc["kind"] == kind]


def one(manifests: list[Manifest], kind: str, name_suffix: str = "") -> Manifest:
    found = [
        doc for doc in of_kind(manifests, kind) if doc["metadata"]["name"].endswith(name_suffix)
    ]
    assert len(found) == 1, f"expected one {kind} named *{name_suffix}, found {len(found)}"
    return found[0]


def container(deployment: Manifest, name: str) -> Manifest:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == name)


def env(container_spec: Manifest) -> dict[str, str]:
    return {item["name"]: item.get("value", "") for item in container_spec.get("env", [])}
