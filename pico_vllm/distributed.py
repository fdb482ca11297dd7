"""Tensor parallelism over ``mx.distributed``: one engine across the ranks of ``mlx.launch``
(pipeline parallelism, by layers, is ``pipeline.py``; both share the launch and the lockstep).

Every rank loads the whole checkpoint, then keeps only its slice (``Model.shard``, built on MLX's
``shard_linear``): q/k/v and gate/up are split by output features, o_proj and down by input
features followed by one ``all_sum`` each; embeddings, norms and the LM head are replicated. So
each rank holds ``1/N`` of the attention and MLP weights and a KV pool with ``1/N`` of the KV
heads, and after each layer's ``all_sum`` every rank has the same hidden state, hence the same
logits and — with the same seed — the same samples.

No scheduling state is exchanged. Every rank runs the same scheduler and block manager over the
same requests (an offline run gives every rank the same prompts; the server's rank 0 ships each
new request and abort to the others, ``share``), so their block tables agree without messages.
What must not differ is checked: the pool size (the smallest any rank can hold) and, with
``PICO_VLLM_CHECK_TP=1``, the sampled ids of every step.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import pickle
import socket
import time

import mlx.core as mx
import numpy as np

CHECK_SAMPLES_ENV = "PICO_VLLM_CHECK_TP"
DOORBELL_CONNECT_S = 60.0  # how long rank 0 waits for every other rank to connect its doorbell

log = logging.getLogger("pico_vllm")


def launched_group(size: int, setting: str = "tensor_parallel_size") -> mx.distributed.Group:
    """The ``mx.distributed`` group of ``size`` ranks this process was launched into (for the
    tensor or pipeline parallel ``setting`` that asked for it)."""
    group = mx.distributed.init()
    if group.size() == 1:
        raise ValueError(
            f"{setting} {size} needs {size} processes started by mlx.launch (e.g. "
            f"`mlx.launch --backend ring -n {size} ...`); this process has no distributed group"
        )
    if group.size() != size:
        raise ValueError(f"{setting} {size} does not match the {group.size()} ranks launched")
    return group


def check_shardable(num_heads: int, num_kv_heads: int, intermediate_size: int, size: int) -> None:
    """Each rank must get whole attention heads, whole KV heads and an equal MLP slice."""
    for name, value in (("num_attention_heads", num_heads), ("num_key_value_heads", num_kv_heads),
                        ("intermediate_size", intermediate_size)):
        if value < size:
            raise ValueError(f"tensor_parallel_size {size} is more than the model's {name} ({value})")
        if value % size:
            raise ValueError(f"tensor_parallel_size {size} does not divide the model's {name} ({value})")


def smallest(value: int, group: mx.distributed.Group) -> int:
    """The smallest ``value`` over all ranks (e.g. the pool size every rank can hold)."""
    return int(mx.distributed.all_min(mx.array(value), group=group, stream=mx.cpu).item())


def share(obj: object, group: mx.distributed.Group) -> object:
    """Rank 0's ``obj`` on every rank (pickled bytes, summed with zeros from the others): how a
    tensor-parallel server ships each loop's new requests and aborts to the other ranks."""
    data = pickle.dumps(obj) if group.rank() == 0 else b""
    size = int(mx.distributed.all_sum(mx.array(len(data)), group=group, stream=mx.cpu).item())
    buffer = mx.array(np.frombuffer(data, np.uint8)) if data else mx.zeros(size, mx.uint8)
    return pickle.loads(np.array(mx.distributed.all_sum(buffer, group=group, stream=mx.cpu)).tobytes())


def check_samples_enabled() -> bool:
    return os.environ.get(CHECK_SAMPLES_ENV, "") not in ("", "0")


def check_same_tokens(token_ids: list[int], group: mx.distributed.Group) -> None:
    """Fail loudly unless every rank sampled exactly these ids this step (debug mode)."""
    mine = mx.array(token_ids or [0], dtype=mx.int32)
    low = mx.distributed.all_min(mine, group=group, stream=mx.cpu)
    high = mx.distributed.all_max(mine, group=group, stream=mx.cpu)
    if not (mx.array_equal(low, mine) and mx.array_equal(high, mine)).item():
        raise RuntimeError(
            f"tensor-parallel ranks sampled different tokens: rank {group.rank()} has {token_ids}, "
            f"the ranks' minimum is {low.tolist()} and maximum {high.tolist()}"
        )


def rank0_address() -> str | None:
    """The address rank 0 is reached at, as the launch gave it (the ring's hostfile, JACCL's
    coordinator), or None when the environment does not say."""
    try:
        if os.environ.get("MLX_HOSTFILE"):
            with open(os.environ["MLX_HOSTFILE"]) as f:
                return json.load(f)[0][0].rsplit(":", 1)[0]
        if os.environ.get("MLX_JACCL_COORDINATOR"):
            return os.environ["MLX_JACCL_COORDINATOR"].rsplit(":", 1)[0]
    except (OSError, ValueError, IndexError, KeyError, TypeError):
        pass
    return None


class Doorbell:
    """Rank 0 rings before each :func:`share`; the other ranks wait for the ring in the kernel.

    MLX's ring backend busy-polls its non-blocking sockets while a collective waits, so a rank
    parked inside ``share`` while rank 0 has nothing to send spins a core: an idle 2-rank server's
    follower burnt 9.9 CPU-seconds per 10 s. A follower instead blocks on a plain TCP socket from
    rank 0 (one byte per ring) and enters ``share`` only when rank 0 is entering it too. Made
    collectively: rank 0 listens on its launch address and shares (address, port, secret); each
    other rank connects and proves it holds the secret. Where the launch names no address for
    rank 0, there is no doorbell (rank 0 warns) and idle followers spin as before.
    """

    def __init__(self, group: mx.distributed.Group) -> None:
        self._peers: list[socket.socket] = []
        self._bell: socket.socket | None = None
        address = rank0_address() if group.rank() == 0 else None
        listener = socket.create_server((address, 0)) if address else None
        secret = os.urandom(16).hex()
        offer = share((address, listener.getsockname()[1], secret) if listener else None, group)
        if offer is None:
            if group.rank() == 0:
                log.warning("pico-vllm: the launch names no address for rank 0, so idle ranks wait "
                            "inside MLX's collectives, which busy-poll (a core each)")
            return
        if group.rank() == 0:
            self._accept(listener, secret, group.size() - 1)
        else:
            self._bell = socket.create_connection(offer[:2], timeout=DOORBELL_CONNECT_S)
            self._bell.settimeout(None)
            self._bell.sendall(offer[2].encode())

    def _accept(self, listener: socket.socket, secret: str, count: int) -> None:
        deadline = time.monotonic() + DOORBELL_CONNECT_S
        with listener:
            while len(self._peers) < count:
                listener.settimeout(max(0.1, deadline - time.monotonic()))
                peer, _ = listener.accept()  # socket.timeout past the deadline: start-up fails
                peer.settimeout(5)
                try:
                    proof = peer.recv(len(secret)).decode(errors="replace")
                except OSError:
                    proof = ""
                if not hmac.compare_digest(proof, secret):
                    peer.close()  # not one of our ranks
                    continue
                peer.settimeout(None)
                peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._peers.append(peer)

    def ring(self) -> None:
        """Rank 0: the others may enter ``share`` now."""
        for peer in self._peers:
            peer.sendall(b"\x01")

    def wait(self) -> None:
        """Any other rank: block (no CPU) until rank 0 rings; a closed bell also returns (rank 0
        is gone: the ``share`` that follows fails loudly)."""
        if self._bell is not None:
            self._bell.recv(1)
