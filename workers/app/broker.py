"""The Redis broker transport, with a guard for a reconnect crash in kombu 5.7.

When Redis drops the connection while a worker holds unacknowledged messages, Celery's
``Consumer.on_connection_error_after_connected`` calls ``Connection.collect()`` and then
``Connection.close()``. ``collect()`` detaches the transport (``transport.client = None``)
but leaves the default channel open when its first close fails on the dead socket; the
second close then restores the unacknowledged messages through a new Redis pool, whose
parameters kombu reads from ``transport.client``: ``AttributeError: 'NoneType' object has
no attribute 'hostname'`` in ``_connparams``. An ``AttributeError`` is not a connection
error, so it escapes Celery's ``ignore_errors`` and the worker exits ("Unrecoverable
error"). celery/celery#9250 (open) is the same failure with RabbitMQ; kombu's main branch
has no fix (docs/operations.md).

The channel below remembers the connection parameters it computed while attached and
reuses them once detached, so the restore, ack or reject of a message delivered on that
channel goes to Redis like any other command: it succeeds if Redis is back and raises a
Redis connection error if not, which Celery ignores before it reconnects."""

from __future__ import annotations

from typing import Any

from kombu import connection as kombu_connection
from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError

__all__ = ["TRANSPORT", "Channel", "Transport", "transport_for"]

#: What ``broker_transport`` names for a ``redis://`` broker URL.
TRANSPORT = "workers.app.broker:Transport"

# kombu's table of transport names shown under another scheme (pyamqp shows as amqp): the
# banner, the logs and Flower's broker page keep reading ``redis://`` URLs.
kombu_connection.resolve_aliases[TRANSPORT] = "redis"


class Channel(kombu_redis.Channel):
    """kombu's Redis channel, usable for its own messages after its transport is detached."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Keyed by kombu's ``asynchronous`` flag: the BRPOP pool and the command pool.
        self._attached_connparams: dict[bool, dict[str, Any]] = {}
        super().__init__(*args, **kwargs)

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection.client is not None:
            params: dict[str, Any] = super()._connparams(asynchronous=asynchronous)
            self._attached_connparams[asynchronous] = dict(params)
            return params
        if asynchronous not in self._attached_connparams:
            # No pool of this kind was ever opened, so no message of this channel needs it.
            raise RedisConnectionError("the broker connection of this channel is closed")
        return dict(self._attached_connparams[asynchronous])


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with the channel above."""

    Channel = Channel


def transport_for(broker_url: str) -> str | None:
    """The transport for ``broker_url``: this module's for plain ``redis://``, else kombu's own.

    ``rediss://`` keeps kombu's transport, which turns TLS on from the scheme name, and
    ``sentinel://`` has a transport of its own; both go without the guard."""
    return TRANSPORT if broker_url.startswith("redis://") else None
