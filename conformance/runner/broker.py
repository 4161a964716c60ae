"""The conformance node: RabbitMQ through its management API (urllib), and the node itself
through scripts/test-broker.sh. The runner's only way to see and change the broker."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "test-broker.sh"


def q(segment: str) -> str:
    """Percent-encodes one path segment (vhost or object name)."""
    return urllib.parse.quote(segment, safe="")


class BrokerError(Exception):
    pass


@dataclass
class Node:
    """A RabbitMQ node of scripts/test-broker.sh: AMQP on `port`, management on port + 10000."""

    name: str = "msgpipe-conformance"
    port: int = 5705
    user: str = "guest"
    password: str = "guest"

    @property
    def mgmt(self) -> str:
        return f"http://127.0.0.1:{self.port + 10000}"

    def amqp_uri(self, vhost: str) -> str:
        return f"amqp://{self.user}:{self.password}@127.0.0.1:{self.port}/{q(vhost)}"

    def redacted_uri(self, vhost: str) -> str:
        return f"amqp://{self.user}:***@127.0.0.1:{self.port}/{q(vhost)}"

    # --- the node ---------------------------------------------------------------------------

    def script(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(SCRIPT), args[0], self.name, str(self.port), *args[1:]],
            cwd=REPO, capture_output=True, text=True, timeout=timeout,
        )

    def ensure(self) -> str:
        done = self.script("ensure")
        if done.returncode != 0:
            raise BrokerError(f"scripts/test-broker.sh ensure {self.name} {self.port} failed: "
                              f"{done.stderr.strip()[-500:]}")
        return self.request("GET", "/api/overview")["rabbitmq_version"]

    def restart(self) -> None:
        """Stops and starts the RabbitMQ application (the Erlang VM stays): every connection
        drops, the listener is closed meanwhile, durable queues and persistent messages stay."""
        for command in ("stop_app", "start_app"):
            done = self.script("ctl", command, timeout=120)
            if done.returncode != 0:
                raise BrokerError(f"rabbitmqctl {command} failed: {done.stderr.strip()[-300:]}")
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.request("GET", "/api/overview")
                return
            except (BrokerError, OSError):
                time.sleep(0.3)
        raise BrokerError("the management API did not come back")

    # --- management API ---------------------------------------------------------------------

    def request(self, method: str, path: str, body=None, ok=(200, 201, 204), timeout=15):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.mgmt + path, data=data, method=method)
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        request.add_header("authorization", f"Basic {token}")
        if data is not None:
            request.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                text = response.read().decode()
                status = response.status
        except urllib.error.HTTPError as error:
            text = error.read().decode(errors="replace")
            status = error.code
        except urllib.error.URLError as error:
            raise BrokerError(f"{method} {path}: {error.reason}") from None
        if status not in ok:
            raise BrokerError(f"{method} {path} -> {status}: {text[:300]}")
        return json.loads(text) if text.strip() else None

    def create_vhost(self, vhost: str) -> None:
        self.delete_vhost(vhost)
        self.request("PUT", f"/api/vhosts/{q(vhost)}", {"default_queue_type": "classic"})
        self.request("PUT", f"/api/permissions/{q(vhost)}/{q(self.user)}",
                     {"configure": ".*", "write": ".*", "read": ".*"})

    def delete_vhost(self, vhost: str) -> None:
        self.request("DELETE", f"/api/vhosts/{q(vhost)}", ok=(200, 204, 404))

    def queue_names(self, vhost: str) -> list[str]:
        queues = self.request("GET", f"/api/queues/{q(vhost)}?columns=name")
        return sorted(item["name"] for item in queues)

    def queue_info(self, vhost: str, queue: str):
        return self.request("GET", f"/api/queues/{q(vhost)}/{q(queue)}", ok=(200, 404))

    def peek(self, vhost: str, queue: str, count: int = 500) -> list[dict]:
        """Up to `count` messages from the head, requeued (`ack_requeue_true`): what the queue
        holds, in order. On a quorum queue with a delivery limit each peek counts as a
        delivery, so cases peek work queues only at the end."""
        body = {"count": count, "ackmode": "ack_requeue_true", "encoding": "auto",
                "truncate": 100000}
        return self.request("POST", f"/api/queues/{q(vhost)}/{q(queue)}/get", body,
                            ok=(200,)) or []

    def publish_raw(self, vhost: str, exchange: str, routing_key: str, body: str,
                    properties: dict) -> bool:
        name = exchange or "amq.default"
        answer = self.request("POST", f"/api/exchanges/{q(vhost)}/{q(name)}/publish", {
            "properties": properties, "routing_key": routing_key,
            "payload": body, "payload_encoding": "string"})
        return bool(answer and answer.get("routed"))

    def delete_exchange(self, vhost: str, exchange: str) -> None:
        self.request("DELETE", f"/api/exchanges/{q(vhost)}/{q(exchange)}", ok=(200, 204, 404))

    def delete_queue(self, vhost: str, queue: str) -> None:
        self.request("DELETE", f"/api/queues/{q(vhost)}/{q(queue)}", ok=(200, 204, 404))

    def delete_bindings(self, vhost: str, exchange: str, queue: str) -> int:
        path = f"/api/bindings/{q(vhost)}/e/{q(exchange)}/q/{q(queue)}"
        bindings = self.request("GET", path, ok=(200, 404)) or []
        for binding in bindings:
            self.request("DELETE", f"{path}/{q(binding['properties_key'])}", ok=(200, 204, 404))
        return len(bindings)

    def connections(self, vhost: str) -> list[dict]:
        return self.request("GET", f"/api/vhosts/{q(vhost)}/connections", ok=(200, 404)) or []

    def link_down(self, vhost: str) -> None:
        """An outage for one vhost: no new connection is admitted (a vhost connection limit of
        0), and the open ones are closed (rabbitmqctl: the management API lists connections
        from statistics, which miss one opened a moment ago). Other vhosts are untouched."""
        self.request("PUT", f"/api/vhost-limits/{q(vhost)}/max-connections", {"value": 0})
        done = self.script("ctl", "close_all_connections", "-p", vhost, "conformance outage",
                           timeout=60)
        if done.returncode != 0:
            raise BrokerError(f"rabbitmqctl close_all_connections failed: {done.stderr[-300:]}")

    def link_up(self, vhost: str) -> None:
        self.request("DELETE", f"/api/vhost-limits/{q(vhost)}/max-connections",
                     ok=(200, 204, 404))
