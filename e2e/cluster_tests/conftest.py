"""Fixtures of the node's end-to-end tests: they run against `make cluster`'s cluster
(e2e/test-cluster.sh starts it), with the chart installed by `helm install` and no --set."""

from __future__ import annotations

import uuid

import pytest
from support import IMAGES, RELEASE_BIN, kubectl

from controlplane.node import Node


@pytest.fixture(scope="session")
def node() -> Node:
    """The cluster of `make cluster`, all of it running (what is not is started again)."""
    n = Node(RELEASE_BIN, [IMAGES / "kubekms.tar", IMAGES / "pause.tar"])
    if not n.process("kube-apiserver").alive():
        pytest.fail("the cluster is not running: make cluster (or make test-cluster)")
    n.up()
    return n


@pytest.fixture
def namespace():
    name = f"t-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


