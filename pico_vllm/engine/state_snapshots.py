"""Prefix caching for hybrid models: snapshots of a sequence's linear-layer state at block boundaries.

A cached KV prefix resumes attention layers, not linear ones: a recurrence's state after ``k``
blocks is a function of every token before, and mlx-lm's layers only hand out the state at the
end of the tokens they ran. So where a sequence's step ends on a block boundary, the engine
copies its state slot into a *snapshot* slot of the same state pool, filed under the digest of
the block that ends there (``BlockManager``'s chained digest: equal digests, equal prefixes). A
later prompt resumes from the longest cached prefix that has one, and its first chunk starts from
a copy of that snapshot; a prefix without one is computed again, never approximated.

```
 seq A  | block 0 | block 1 | block 2 | ...      KV blocks cached as usual (every full block)
                            ^ snapshot slot 7    its state after block 1, under block 1's digest
 seq B  = A's first 2 blocks + its own tokens  -> hit of 2 blocks: K/V shared, slot 7 copied into
                                                  B's own state slot, B computes from token 32 on
```

Snapshots are a bounded set of slots (``EngineConfig.num_state_snapshots``), recycled least
recently used first, and dropped with their block when the KV prefix cache evicts it. A step's
state is copied before the host knows the step's input token (asynchronous scheduling), so a
snapshot is *pending* until its block's digest is known, then filed, or given back if the
prefix is filed already.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from pico_vllm.engine.sequence import Sequence


class StateSnapshots:
    """Which snapshot slots of the state pool hold which prefix's state (see the module
    docstring). ``slots`` are the pool slots set aside for snapshots."""

    def __init__(self, slots: range) -> None:
        self.capacity = len(slots)
        self._free = list(reversed(slots))
        self._filed: OrderedDict[bytes, int] = OrderedDict()  # digest -> slot, least recent first
        # Per sequence, (block index, slot) of the snapshots copied whose digest is not known yet.
        self._pending: dict[Sequence, list[tuple[int, int]]] = {}

    @property
    def num_filed(self) -> int:
        """Snapshots a prompt can resume from now."""
        return len(self._filed)

    def has(self, digest: bytes) -> bool:
        return digest in self._filed

    def resume(self, digest: bytes) -> int:
        """The slot holding the state after the prefix ``digest`` ends, now the most recently used."""
        self._filed.move_to_end(digest)
        return self._filed[digest]

    def take(self, seq: Sequence, block_index: int) -> int | None:
        """A slot for ``seq``'s state after block ``block_index`` (the step being scheduled ends
        there): a free one, else the least recently used snapshot's. None if that prefix has a
        snapshot already, or every slot waits for its digest."""
        if block_index < len(seq.block_hashes) and seq.block_hashes[block_index] in self._filed:
            return None
        if self._free:
            slot = self._free.pop()
        elif self._filed:
            _, slot = self._filed.popitem(last=False)
        else:
            return None
        self._pending.setdefault(seq, []).append((block_index, slot))
        return slot

    def file(self, seq: Sequence, is_cached: Callable[[bytes], bool]) -> None:
        """File ``seq``'s pending snapshots whose block digest is now known, under it; one whose
        prefix has a snapshot already, or whose block the KV cache does not hold, is given back."""
        still = []
        for block_index, slot in self._pending.pop(seq, []):
            if block_index >= len(seq.block_hashes):
                still.append((block_index, slot))
                continue
            digest = seq.block_hashes[block_index]
            if digest in self._filed or not is_cached(digest):
                self._free.append(slot)
            else:
                self._filed[digest] = slot
        if still:
            self._pending[seq] = still

    def forget(self, seq: Sequence) -> None:
        """``seq`` stopped running: its snapshots still pending are given back."""
        self._free += [slot for _, slot in self._pending.pop(seq, [])]

    def drop(self, digest: bytes) -> None:
        """The KV prefix cache evicted the block ``digest`` ends: its snapshot goes with it."""
        slot = self._filed.pop(digest, None)
        if slot is not None:
            self._free.append(slot)

    def check_invariants(self, cached: set[bytes]) -> None:
        """Every slot is free, filed or pending exactly once; every filed digest is ``cached``."""
        pending = [slot for taken in self._pending.values() for _, slot in taken]
        slots = [*self._free, *self._filed.values(), *pending]
        assert len(slots) == len(set(slots)) == self.capacity, (self._free, self._filed, self._pending)
        assert set(self._filed) <= cached, "a snapshot outlived its block"
