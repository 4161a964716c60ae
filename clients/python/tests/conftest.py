"""Test support: the RabbitMQ 4.3 node of ``scripts/test-broker.sh`` (``msgpipe-python`` on
port 5701, management on 15701), one vhost per test, and pipelines provisioned with the real
``msgpipe apply`` (their ``pipeline.json`` from ``msgpipe render``, as the operator writes it).

Unit tests need none of it: only tests that take the ``broker`` fixture (directly or through
``vhost`` / ``pipeline``) start the node.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from msgpipe import PipelineConfig

REPO = Path(__file__).resolve().parents[3]
PORT = int(os.environ.get("MSGPIPE_PYTHON_TEST_PORT", "5701"))
NODE = os.environ.get("MSGPIPE_PYTHON_TEST_NODE", "msgpipe-python")
MGMT_URL = f"http://127.0.0.1:{PORT + 10000}"
MSGPIPE = Path(os.environ.get("MSGPIPE_BIN", REPO / "target" / "debug" / "msgpipe"))
BROKER_SCRIPT = REPO / "scripts" / "test-broker.sh"
_AUTH = "Basic " + base64.b64encode(b"guest:guest").decode()


def quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def mgmt(method: str, path: str, body: Any = None, *, ok: tuple[int, ...] = ()) -> Any:
    """One management API call (guest:guest); raises unless 2xx or in ``ok``."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(  # noqa: S310 - a fixed http URL of the test node
        f"{MGMT_URL}/api{path}", data=data, method=method
    )
    request.add_header("authorization", _AUTH)
    request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            text = response.read().decode()
    except urllib.error.HTTPError as error:
        if error.code in ok:
            return None
        raise AssertionError(f"{method} {path} -> {error.code}: {error.read()!r}") from error
    return json.loads(text) if text else None


TLS_PORT = PORT + 1
CERTS = Path(os.environ.get("MSGPIPE_TEST_BROKER_DIR", "/tmp")) / NODE / "certs"  # noqa: S108
"""A CA and a server certificate for 127.0.0.1 (made with openssl), in the node's data
directory, which test-broker.sh hands to the rabbitmq user when the node starts."""


def tls_conf() -> str:
    return "\n".join(
        [
            f"listeners.ssl.default = 127.0.0.1:{TLS_PORT}",
            f"ssl_options.cacertfile = {CERTS / 'ca.crt'}",
            f"ssl_options.certfile = {CERTS / 'server.crt'}",
            f"ssl_options.keyfile = {CERTS / 'server.key'}",
            "ssl_options.verify = verify_none",
            "ssl_options.fail_if_no_peer_cert = false",
        ]
    )


def broker_script(command: str) -> None:
    """``scripts/test-broker.sh COMMAND`` for the node, with its TLS listener."""
    subprocess.run(  # noqa: S603
        [str(BROKER_SCRIPT), command, NODE, str(PORT)],
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=300,
        env=dict(os.environ, MSGPIPE_TEST_BROKER_EXTRA_CONF=tls_conf()),
    )


def make_certificates() -> None:
    """A self-signed CA, and a server certificate it signs for 127.0.0.1 and localhost."""
    CERTS.mkdir(parents=True, exist_ok=True)
    (CERTS / "server.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
    )
    for command in (
        "req -x509 -newkey rsa:2048 -nodes -days 3650 -keyout ca.key -out ca.crt"
        " -subj /CN=msgpipe-python-test-CA -addext basicConstraints=critical,CA:TRUE"
        " -addext keyUsage=critical,keyCertSign,cRLSign",
        "req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost",
        "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650"
        " -extfile server.ext -out server.crt",
    ):
        subprocess.run(  # noqa: S603
            ["openssl", *command.split()],  # noqa: S607 - the Debian package openssl
            cwd=CERTS,
            check=True,
            capture_output=True,
        )


def tls_listening() -> bool:
    try:
        socket.create_connection(("127.0.0.1", TLS_PORT), timeout=2).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="session")
def broker() -> str:
    """Starts (or finds running) the RabbitMQ node, with a TLS listener on port + 1; returns
    its management URL."""
    if not (CERTS / "server.crt").exists():
        broker_script("stop")  # the next start hands the new files to the rabbitmq user
        make_certificates()
    broker_script("ensure")
    if not tls_listening():  # a node started without the TLS listener
        broker_script("stop")
        broker_script("ensure")
    version = mgmt("GET", "/overview")["rabbitmq_version"]
    assert version.startswith("4.3"), f"the test node runs RabbitMQ {version}, not 4.3"
    assert MSGPIPE.exists(), f"{MSGPIPE} is missing: run `cargo build --bin msgpipe`"
    return MGMT_URL


@pytest.fixture
def vhost(broker: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A vhost for this test only, deleted afterwards."""
    name = f"py-{request.node.name[:80]}-{os.getpid()}"
    mgmt("DELETE", f"/vhosts/{quote(name)}", ok=(404,))
    mgmt("PUT", f"/vhosts/{quote(name)}")
    mgmt(
        "PUT",
        f"/permissions/{quote(name)}/guest",
        {"configure": ".*", "write": ".*", "read": ".*"},
    )
    yield name
    mgmt("DELETE", f"/vhosts/{quote(name)}", ok=(404,))


def amqp_uri(vhost: str, port: int = PORT) -> str:
    return f"amqp://guest:guest@127.0.0.1:{port}/{quote(vhost)}"


@dataclass
class Pipeline:
    """A pipeline manifest in a test's vhost, its ``pipeline.json``, and how to apply it."""

    vhost: str
    manifest: Path
    config_path: Path
    config: PipelineConfig

    @property
    def uri(self) -> str:
        return amqp_uri(self.vhost)

    def apply_command(self) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ, MSGPIPE_BROKER_URI=self.uri)
        command = [str(MSGPIPE), "apply", "-f", str(self.manifest), "--management-uri", MGMT_URL]
        return command, env

    def apply(self) -> None:
        command, env = self.apply_command()
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=60)  # noqa: S603

    async def apply_async(self) -> None:
        """``msgpipe apply`` without blocking the event loop (clients keep running)."""
        command, env = self.apply_command()
        process = await asyncio.create_subprocess_exec(
            *command, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await process.communicate()
        assert process.returncode == 0, f"msgpipe apply failed: {out!r} {err!r}"

    def write_features(self, *, retry_pending: bool, retry_interval_seconds: int) -> None:
        """Rewrites pipeline.json the way the kubelet does (new file, atomic rename)."""
        data = json.loads(self.config_path.read_text())
        data["features"] = {
            "retry_pending": retry_pending,
            "retry_interval_seconds": retry_interval_seconds,
        }
        scratch = self.config_path.with_suffix(".tmp")
        scratch.write_text(json.dumps(data, indent=2))
        scratch.replace(self.config_path)


MakePipeline = Callable[..., Pipeline]


@pytest.fixture
def make_pipeline(vhost: str, tmp_path: Path) -> MakePipeline:
    """Writes a notes pipeline manifest for the test's vhost and its pipeline.json (rendered
    by ``msgpipe render``); applies it unless ``apply=False``."""

    def make(
        *,
        max_attempts: int = 3,
        initial_delay: str = "100ms",
        retry_pending: bool = True,
        retry_interval_seconds: int = 60,
        apply: bool = True,
    ) -> Pipeline:
        manifest = tmp_path / "pipeline.yaml"
        manifest.write_text(
            f"""apiVersion: msgpipe.io/v1alpha1
kind: MessagePipeline
metadata: {{name: notes, namespace: py}}
spec:
  broker: {{secretRef: {{name: rabbitmq}}, vhost: "{vhost}"}}
  queue: {{name: notes_queue, type: quorum, exchange: notes, routingKey: notes}}
  retry:
    maxAttempts: {max_attempts}
    backoff: {{initialDelay: {initial_delay}, multiplier: 2, maxDelay: 1s}}
  deadLetter: {{exchange: notes_dlx, queue: notes_dlq}}
  alerts: {{enabled: false}}
  clientFlags:
    retryPending: {str(retry_pending).lower()}
    retryIntervalSeconds: {retry_interval_seconds}
"""
        )
        rendered = subprocess.run(  # noqa: S603
            [str(MSGPIPE), "render", "-f", str(manifest), "-o", "json"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        docs = json.loads(rendered.stdout)
        docs = docs if isinstance(docs, list) else [docs]
        config_map = next(d for d in docs if d.get("kind") == "ConfigMap")
        config_path = tmp_path / "pipeline.json"
        config_path.write_text(config_map["data"]["pipeline.json"])
        pipeline = Pipeline(vhost, manifest, config_path, PipelineConfig.from_path(config_path))
        if apply:
            pipeline.apply()
        return pipeline

    return make


@pytest.fixture
def pipeline(make_pipeline: MakePipeline) -> Pipeline:
    """The notes pipeline, applied: 3 attempts, tiers of 100 ms and 200 ms."""
    return make_pipeline()


class Amqp:
    """A plain aio-pika connection for the test's own publishes and reads."""

    def __init__(self, connection: AbstractConnection, channel: AbstractChannel) -> None:
        self.connection = connection
        self.channel = channel

    async def publish(
        self, body: bytes, *, exchange: str = "notes", routing_key: str = "notes", **properties: Any
    ) -> None:
        target = await self.channel.get_exchange(exchange, ensure=False)
        properties.setdefault("delivery_mode", aio_pika.DeliveryMode.PERSISTENT)
        await target.publish(aio_pika.Message(body, **properties), routing_key, mandatory=True)

    async def depth(self, queue: str) -> int:
        """Ready messages, by a passive declare (no management-API lag)."""
        channel = await self.connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
            return int(declared.declaration_result.message_count or 0)
        finally:
            await channel.close()

    async def drain(self, queue: str) -> list[AbstractIncomingMessage]:
        """Takes (and acks) every ready message of ``queue``."""
        channel = await self.connection.channel()
        try:
            source = await channel.declare_queue(queue, passive=True)
            taken = []
            while (message := await source.get(fail=False)) is not None:
                await message.ack()
                taken.append(message)
            return taken
        finally:
            await channel.close()


@pytest.fixture
async def amqp(vhost: str) -> AsyncIterator[Amqp]:
    connection = await aio_pika.connect(amqp_uri(vhost))
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    yield Amqp(connection, channel)
    await connection.close()


async def eventually(
    check: Callable[[], Awaitable[object] | object], *, within: float, what: str
) -> float:
    """Waits until ``check()`` (awaited if it returns an awaitable) is truthy; returns the
    seconds it took."""
    started = time.monotonic()
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > within:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.05)
