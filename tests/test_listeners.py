"""The draining listener: a burst of connections is accepted together, not one per round."""

from __future__ import annotations

import trio
import trio.testing

from resizer.web.listeners import DrainingListener, use_draining_listeners


async def open_listener() -> tuple[DrainingListener, int]:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    return DrainingListener(sock), port


async def test_a_burst_of_connections_is_handed_out_without_waiting() -> None:
    """After one wait, every queued connection comes back with no checkpoint in between."""
    listener, port = await open_listener()
    clients = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(50)]
    await trio.sleep(0.05)  # the kernel completes the handshakes
    accepted = [await listener.accept()]
    with trio.testing.assert_no_checkpoints():
        accepted += [await listener.accept() for _ in range(49)]
    for stream in accepted:
        await stream.aclose()
    for client in clients:
        await client.aclose()
    await listener.aclose()


async def test_accepted_streams_talk_to_their_clients() -> None:
    """Bytes flow both ways on a stream the listener accepted."""
    listener, port = await open_listener()
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listener.accept()
    await client.send_all(b"hello")
    assert await server.receive_some(5) == b"hello"
    await server.send_all(b"world")
    assert await client.receive_some(5) == b"world"
    await server.aclose()
    await client.aclose()
    await listener.aclose()


async def test_closing_the_listener_closes_connections_not_yet_handed_out() -> None:
    """Connections accepted in a batch but never handed out are closed with the listener."""
    listener, port = await open_listener()
    clients = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
    await trio.sleep(0.05)
    first = await listener.accept()  # accepts all three, hands out one
    await listener.aclose()
    for client in clients[1:]:  # the two left pending see the connection closed
        with trio.fail_after(2):
            assert await client.receive_some(10) == b""
    await first.aclose()
    for client in clients:
        await client.aclose()


def test_hypercorn_builds_draining_listeners() -> None:
    """hypercorn's trio worker sees DrainingListener as trio.SocketListener (idempotent)."""
    import hypercorn.trio.run as hypercorn_run

    use_draining_listeners()
    use_draining_listeners()
    assert getattr(hypercorn_run, "trio").SocketListener is DrainingListener  # noqa: B009
    assert getattr(hypercorn_run, "trio").open_nursery is trio.open_nursery  # noqa: B009
